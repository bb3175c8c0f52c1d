package model

import (
	"net/netip"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/identity"
)

// Well-known labels, as in Istio ambient.
const (
	LabelDataplaneMode = "istio.io/dataplane-mode" // "ambient" on a namespace enrolls it; "none" on a pod opts out
	DataplaneAmbient   = "ambient"
	DataplaneNone      = "none"
	LabelUseWaypoint   = "istio.io/use-waypoint" // on a namespace, service or pod: the waypoint's name
	LabelWaypointFor   = "istio.io/waypoint-for" // on a waypoint Gateway: service|workload|all|none
)

// Enrolled reports whether a pod is in the mesh, as Istio ambient decides:
// its namespace is labelled istio.io/dataplane-mode=ambient and the pod does
// not opt out with istio.io/dataplane-mode=none; a pod labelled ambient is
// enrolled whatever its namespace says. Values are case-sensitive.
func Enrolled(nsLabels, podLabels map[string]string) bool {
	switch podLabels[LabelDataplaneMode] {
	case DataplaneNone:
		return false
	case DataplaneAmbient:
		return true
	}
	return nsLabels[LabelDataplaneMode] == DataplaneAmbient
}

// LabelHBONEQUIC, "enabled" on a pod or its namespace ("disabled" on the
// pod overrides the namespace), advertises that the pod's ztunnel accepts
// HBONE over HTTP/3 (QUIC) on UDP 15008 (Workload.QUIC).
const LabelHBONEQUIC = "ambit.dev/hbone-quic"

// QUICAdvertised reports whether a pod with podLabels in a namespace with
// nsLabels advertises HBONE over QUIC (LabelHBONEQUIC).
func QUICAdvertised(nsLabels, podLabels map[string]string) bool {
	if v, ok := podLabels[LabelHBONEQUIC]; ok {
		return v == "enabled"
	}
	return nsLabels[LabelHBONEQUIC] == "enabled"
}

// LabelWaypointBypass, "allow" on a pod or its namespace (any other value
// on the pod, e.g. "deny", overrides the namespace), opts the pod out of
// ambit's no-bypass default for its Services' waypoints, for Istio's
// behaviour: a waypoint bound to a Service (istio.io/waypoint-for: service,
// the default) takes the traffic addressed to the Service, and a connection
// addressed to the pod's own IP goes straight to the pod, through its L4
// policy only. It does not lift a waypoint the pod itself uses
// (waypoint-for: workload or all). See Workload.WaypointBypass.
const LabelWaypointBypass = "ambit.dev/waypoint-bypass"

// WaypointBypassAllow is LabelWaypointBypass's opt-out value.
const WaypointBypassAllow = "allow"

// WaypointBypassAllowed reports whether a pod with podLabels in a namespace
// with nsLabels opts out of the no-bypass default (LabelWaypointBypass).
func WaypointBypassAllowed(nsLabels, podLabels map[string]string) bool {
	if v, ok := podLabels[LabelWaypointBypass]; ok {
		return v == WaypointBypassAllow
	}
	return nsLabels[LabelWaypointBypass] == WaypointBypassAllow
}

// Ports of the data plane (see the design brief).
const (
	PortOutbound = 15001
	PortInbound  = 15006 // inbound plaintext capture
	PortHBONE    = 15008
	PortSOCKS5   = 15080
	PortAdmin    = 15000
	PortMetrics  = 15020
	PortReady    = 15021
	PortXDS      = 15012
)

// Workload is one pod (or VM / host process) that can send and receive
// traffic. UID is its stable key: "<cluster>/<kind>/<namespace>/<name>".
type Workload struct {
	UID            string            `json:"uid"`
	Name           string            `json:"name"`
	Namespace      string            `json:"namespace"`
	ServiceAccount string            `json:"serviceAccount"`
	TrustDomain    string            `json:"trustDomain,omitempty"` // empty means identity.DefaultTrustDomain
	Node           string            `json:"node,omitempty"`
	Addresses      []netip.Addr      `json:"addresses"`
	Labels         map[string]string `json:"labels,omitempty"`
	// Enrolled means the workload is in the mesh: its traffic is captured and
	// it speaks HBONE on 15008. Not enrolled workloads are plain TCP peers.
	Enrolled bool `json:"enrolled"`
	Ready    bool `json:"ready"`
	// Waypoint, when set, receives traffic addressed to this workload.
	Waypoint *WaypointRef `json:"waypoint,omitempty"`
	// CanonicalName and CanonicalRevision feed the baggage header
	// (service.name, service.version) and metrics labels.
	CanonicalName     string `json:"canonicalName,omitempty"`
	CanonicalRevision string `json:"canonicalRevision,omitempty"`
	// WorkloadName is the owning controller's name (e.g. the Deployment), for
	// metrics; it defaults to Name.
	WorkloadName string `json:"workloadName,omitempty"`
	// ClusterID names the cluster, for baggage (k8s.cluster.name).
	ClusterID string `json:"clusterId,omitempty"`
	// QUIC means the workload's ztunnel also accepts HBONE over HTTP/3 on
	// UDP 15008 (package hbone/h3); sources with QUIC enabled try it first.
	QUIC bool `json:"quic,omitempty"`
	// WaypointBypass means the workload's ztunnel accepts a direct connection
	// (not from the waypoint) to a port its Services' waypoints bind, as
	// Istio does (LabelWaypointBypass). L4 policy still applies; the
	// workload's own Waypoint is still enforced.
	WaypointBypass bool `json:"waypointBypass,omitempty"`
}

// Identity returns the workload's SPIFFE ID. A proxy asks for it several
// times per connection (its principal, the peers to accept, waypoint
// checks), so IDs are kept by (trust domain, namespace, service account):
// building one parses and validates a URI (4 allocations).
func (w *Workload) Identity() spiffeid.ID {
	k := idKey{w.TrustDomain, w.Namespace, w.ServiceAccount}
	idCache.RLock()
	id, ok := idCache.m[k]
	idCache.RUnlock()
	if ok {
		return id
	}
	id = w.buildIdentity()
	idCache.Lock()
	if len(idCache.m) >= idCacheMax { // bounded: start over
		clear(idCache.m)
	}
	idCache.m[k] = id
	idCache.Unlock()
	return id
}

// buildIdentity is Identity without the cache.
func (w *Workload) buildIdentity() spiffeid.ID {
	td := identity.DefaultTrustDomain
	if w.TrustDomain != "" {
		if t, err := spiffeid.TrustDomainFromString(w.TrustDomain); err == nil {
			td = t
		}
	}
	sa := w.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	id, err := identity.Workload(td, w.Namespace, sa)
	if err != nil {
		return spiffeid.ID{}
	}
	return id
}

// idKey is what a workload's identity is built from.
type idKey struct{ trustDomain, namespace, serviceAccount string }

// idCacheMax bounds idCache: past it, the cache is emptied.
const idCacheMax = 1 << 14

// idCache holds the identities Identity built; its RWMutex guards m.
var idCache = struct {
	sync.RWMutex
	m map[idKey]spiffeid.ID
}{m: make(map[idKey]spiffeid.ID)}

// WaypointRef points at a waypoint proxy: its HBONE address and identity.
//
// A WaypointRef whose Address is not valid (the zero AddrPort) means the
// object asks for a waypoint that does not exist or has no address yet. That
// fails closed, as in Istio: traffic that must go through the waypoint is
// dropped rather than sent around it (which would skip its L7 policy).
type WaypointRef struct {
	Name      string         `json:"name"`
	Namespace string         `json:"namespace"`
	Address   netip.AddrPort `json:"address"` // the waypoint's HBONE address (port 15008)
}

// Resolved reports whether the waypoint has an address to send traffic to.
// A nil or unresolved reference returns false; callers check for nil first
// (no waypoint at all) and drop traffic when it is non-nil but unresolved.
func (w *WaypointRef) Resolved() bool { return w != nil && w.Address.IsValid() }

// Service is a named set of endpoints behind one or more virtual IPs.
// Key: "<namespace>/<hostname>".
type Service struct {
	Name      string        `json:"name"`
	Namespace string        `json:"namespace"`
	Hostname  string        `json:"hostname"` // e.g. reviews.shop.svc.cluster.local
	VIPs      []netip.Addr  `json:"vips"`
	Ports     []ServicePort `json:"ports"`
	// Endpoints are the workloads behind the service (ready or not: Ready is
	// on the workload), each with its service port -> target port map.
	Endpoints []Endpoint   `json:"endpoints"`
	Waypoint  *WaypointRef `json:"waypoint,omitempty"`
}

// Key returns the service's store key.
func (s *Service) Key() string { return s.Namespace + "/" + s.Hostname }

// ServicePort is one port of a service.
type ServicePort struct {
	Name       string `json:"name,omitempty"`
	Port       uint16 `json:"port"`
	TargetPort uint16 `json:"targetPort"` // 0 means same as Port (or a named port resolved per endpoint)
	Protocol   string `json:"protocol,omitempty"`
}

// Endpoint is one workload behind a service.
type Endpoint struct {
	WorkloadUID string            `json:"workloadUid"`
	Ports       map[uint16]uint16 `json:"ports,omitempty"` // service port -> target port, when it differs per endpoint
}

// Action is an authorization policy's action.
type Action string

// Policy actions.
const (
	ActionAllow Action = "ALLOW"
	ActionDeny  Action = "DENY"
)

// Policy is an L4 authorization policy (security.istio.io/v1
// AuthorizationPolicy subset). Key: "<namespace>/<name>".
//
// Semantics (Istio's): a request matches a policy when it matches any rule; a
// rule matches when every one of its From, To clauses matches (an absent
// clause matches); a From or To list matches when any entry matches; inside an
// entry every non-empty field must match and its Not* counterpart must not.
type Policy struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	// Selector selects workloads in Namespace by labels; nil selects the whole
	// namespace (or the whole mesh when Namespace is the root namespace).
	Selector map[string]string `json:"selector,omitempty"`
	Action   Action            `json:"action"`
	Rules    []Rule            `json:"rules"`
	// RootNamespace marks a mesh-wide policy.
	MeshWide bool `json:"meshWide,omitempty"`
}

// Key returns the policy's store key.
func (p *Policy) Key() string { return p.Namespace + "/" + p.Name }

// Rule is one rule of a policy.
type Rule struct {
	From []Source `json:"from,omitempty"`
	To   []Target `json:"to,omitempty"`
}

// Source matches the peer.
type Source struct {
	Principals    []string       `json:"principals,omitempty"` // SPIFFE IDs without "spiffe://", Istio style; "*" and prefix/suffix "*" allowed
	NotPrincipals []string       `json:"notPrincipals,omitempty"`
	Namespaces    []string       `json:"namespaces,omitempty"`
	NotNamespaces []string       `json:"notNamespaces,omitempty"`
	IPBlocks      []netip.Prefix `json:"ipBlocks,omitempty"`
	NotIPBlocks   []netip.Prefix `json:"notIpBlocks,omitempty"`
}

// Target matches the destination.
type Target struct {
	Ports    []uint16 `json:"ports,omitempty"`
	NotPorts []uint16 `json:"notPorts,omitempty"`
}

// PeerAuthnMode is a PeerAuthentication mTLS mode.
type PeerAuthnMode string

// PeerAuthentication modes.
const (
	MTLSUnset      PeerAuthnMode = ""
	MTLSStrict     PeerAuthnMode = "STRICT"
	MTLSPermissive PeerAuthnMode = "PERMISSIVE"
	MTLSDisable    PeerAuthnMode = "DISABLE"
)

// PeerAuthentication sets whether plaintext inbound is accepted for the
// selected workloads. Key: "<namespace>/<name>".
type PeerAuthentication struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Selector  map[string]string `json:"selector,omitempty"`
	Mode      PeerAuthnMode     `json:"mode"`
	MeshWide  bool              `json:"meshWide,omitempty"`
}

// Key returns the store key.
func (p *PeerAuthentication) Key() string { return p.Namespace + "/" + p.Name }
