package telemetry

import (
	"cmp"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Istio's label sets. TCPLabels are those of Istio's ztunnel on the
// istio_tcp_* families (its CommonTrafficLabels, in its order);
// RequestLabels those of istio_requests_total and the request histograms
// (Istio's standard metrics, as its waypoints report them).
var (
	TCPLabels = []string{
		"reporter",
		"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
		"source_principal", "source_app", "source_version", "source_cluster",
		"destination_service", "destination_service_namespace", "destination_service_name",
		"destination_workload", "destination_canonical_service", "destination_canonical_revision",
		"destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
		"destination_cluster",
		"request_protocol", "response_flags", "connection_security_policy",
	}
	RequestLabels = []string{
		"reporter",
		"source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
		"source_cluster", "source_canonical_service", "source_canonical_revision",
		"destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
		"destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
		"destination_cluster", "destination_canonical_service", "destination_canonical_revision",
		"request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
	}
)

// Unknown is the value of a label whose value is not known (Istio's word).
const Unknown = "unknown"

// Labels Istio derives the canonical service and revision from, in order.
var (
	canonicalServiceLabels  = []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"}
	canonicalRevisionLabels = []string{"service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"}
)

// CanonicalService is a workload's canonical service as Istio derives it
// from its pod's labels: service.istio.io/canonical-name, else
// app.kubernetes.io/name, else app, else the workload's name.
func CanonicalService(labels map[string]string, workload string) string {
	if v := firstLabel(labels, canonicalServiceLabels); v != "" {
		return v
	}
	return workload
}

// CanonicalRevision is a workload's canonical revision as Istio derives it:
// service.istio.io/canonical-revision, else app.kubernetes.io/version, else
// version, else "latest".
func CanonicalRevision(labels map[string]string) string {
	if v := firstLabel(labels, canonicalRevisionLabels); v != "" {
		return v
	}
	return "latest"
}

func firstLabel(l map[string]string, keys []string) string {
	for _, k := range keys {
		if v := l[k]; v != "" {
			return v
		}
	}
	return ""
}

// Peer is one end of a connection or request as telemetry names it. Only
// Workload, Namespace, the canonical names, Cluster and Principal become
// metric labels: values bounded by the mesh's config, never addresses.
type Peer struct {
	// UID identifies the workload (for matching connections to a workload
	// that leaves; not a label). Empty: unknown.
	UID string
	// Pod is the workload instance's name (logs and flows only).
	Pod string
	// Workload is the owning controller's name (e.g. the Deployment) and
	// Namespace its namespace; an empty Workload makes every label of the
	// peer but its principal "unknown".
	Workload, Namespace string
	// CanonicalService and CanonicalRevision, when empty, are the
	// workload's name and "latest" (see CanonicalService to derive them
	// from labels).
	CanonicalService, CanonicalRevision string
	// Cluster is the workload's cluster ("unknown" if empty).
	Cluster string
	// Principal is its SPIFFE ID (zero: "unknown").
	Principal spiffeid.ID
}

// PrincipalLabel is the principal as a label value.
func (p Peer) PrincipalLabel() string {
	if p.Principal.IsZero() {
		return Unknown
	}
	return p.Principal.String()
}

// peerValues are a peer's label values, derived the way Istio's ztunnel
// does: app and version are the canonical service and revision.
type peerValues struct {
	workload, namespace, principal, canonical, revision, app, version, cluster string
}

func (p Peer) values() peerValues {
	v := peerValues{workload: Unknown, namespace: Unknown, principal: p.PrincipalLabel(),
		canonical: Unknown, revision: Unknown, app: Unknown, version: Unknown, cluster: Unknown}
	if p.Workload == "" {
		return v
	}
	v.workload, v.namespace = Bound(p.Workload), Bound(p.Namespace)
	v.canonical = Bound(cmp.Or(p.CanonicalService, p.Workload))
	v.revision = Bound(cmp.Or(p.CanonicalRevision, "latest"))
	v.app, v.version = v.canonical, v.revision
	v.cluster = cmp.Or(Bound(p.Cluster), Unknown)
	return v
}

// Service is the destination service as telemetry names it.
type Service struct {
	Hostname, Name, Namespace string
}

// ServiceFromHost names a service by its hostname alone: name and
// namespace are its first two labels when it is <name>.<namespace>.svc...
func ServiceFromHost(host string) Service {
	s := Service{Hostname: host}
	parts := strings.SplitN(host, ".", 4)
	if len(parts) >= 3 && parts[2] == "svc" {
		s.Name, s.Namespace = parts[0], parts[1]
	}
	return s
}

func (s Service) values() (host, namespace, name string) {
	if s.Hostname == "" {
		return Unknown, Unknown, Unknown
	}
	return Bound(s.Hostname), Bound(s.Namespace), Bound(s.Name)
}

// Traffic is what the label sets of one connection or request say.
type Traffic struct {
	Reporter            string // source, destination or waypoint
	Source, Destination Peer
	Service             Service
	// Protocol is request_protocol: "tcp" (empty means tcp), "http" or "grpc".
	Protocol string
	// ResponseCode and GRPCStatus are the request families' (ignored by
	// TCPValues); a GRPCStatus that is not a gRPC code is dropped.
	ResponseCode int
	GRPCStatus   string
	Flags        string // response_flags ("-": none)
	MTLS         bool   // connection_security_policy mutual_tls (else none)
}

func (t *Traffic) common() (src, dst peerValues, proto, flags, security string) {
	src, dst = t.Source.values(), t.Destination.values()
	proto = cmp.Or(t.Protocol, "tcp")
	flags = cmp.Or(Bound(t.Flags), FlagNone)
	security = "none" // plaintext (Envoy's word; Istio's ztunnel says unknown)
	if t.MTLS {
		security = "mutual_tls"
	}
	return
}

// TCPValues returns t's values in TCPLabels' order.
func (t *Traffic) TCPValues() []string {
	src, dst, proto, flags, security := t.common()
	host, svcNS, svcName := t.Service.values()
	return []string{
		cmp.Or(t.Reporter, Unknown),
		src.workload, src.canonical, src.revision, src.namespace, src.principal, src.app, src.version, src.cluster,
		host, svcNS, svcName,
		dst.workload, dst.canonical, dst.revision, dst.namespace, dst.principal, dst.app, dst.version, dst.cluster,
		proto, flags, security,
	}
}

// RequestValues returns t's values in RequestLabels' order.
func (t *Traffic) RequestValues() []string {
	src, dst, proto, flags, security := t.common()
	host, svcNS, svcName := t.Service.values()
	code := "0"
	if t.ResponseCode >= 100 && t.ResponseCode <= 599 {
		code = strconv.Itoa(t.ResponseCode)
	}
	return []string{
		cmp.Or(t.Reporter, Unknown),
		src.workload, src.namespace, src.principal, src.app, src.version, src.cluster, src.canonical, src.revision,
		dst.workload, dst.namespace, dst.principal, dst.app, dst.version, host, svcName, svcNS, dst.cluster,
		dst.canonical, dst.revision,
		proto, code, grpcStatus(t.GRPCStatus), flags, security,
	}
}

// grpcStatus keeps only gRPC's status codes (0-16): the header comes from
// an upstream, and a label value must not be whatever it sends.
func grpcStatus(s string) string {
	if s == "" {
		return ""
	}
	if len(s) <= 2 {
		n := 0
		for _, c := range []byte(s) {
			if c < '0' || c > '9' {
				return Unknown
			}
			n = n*10 + int(c-'0')
		}
		if n <= 16 {
			return s
		}
	}
	return Unknown
}

// MaxLabelLen bounds a label value: longer values are cut (Kubernetes names
// and DNS names fit).
const MaxLabelLen = 253

// Bound makes s a label value Prometheus accepts and a scraper can store:
// valid UTF-8 ("unknown" otherwise) of at most MaxLabelLen bytes.
func Bound(s string) string {
	if !utf8.ValidString(s) {
		return Unknown
	}
	if len(s) > MaxLabelLen {
		s = s[:MaxLabelLen]
		for !utf8.ValidString(s) {
			s = s[:len(s)-1]
		}
	}
	return s
}

// Claims bounds what the peers of a proxy may claim about themselves (the
// baggage header's workload, canonical names, cluster): each verified
// principal may name at most PerPrincipal distinct peers, and only in its
// own namespace; beyond that the claim is dropped (the peer is known by its
// principal and namespace only). So the label values a client can create
// are bounded by the number of identities in the mesh. The zero value
// allows DefaultClaimsPerPrincipal per principal and at most
// DefaultClaimsPrincipals principals.
type Claims struct {
	PerPrincipal int // default DefaultClaimsPerPrincipal
	Principals   int // default DefaultClaimsPrincipals

	mu   sync.Mutex // guards seen
	seen map[spiffeid.ID][]Peer
}

// Defaults of Claims.
const (
	DefaultClaimsPerPrincipal = 8
	DefaultClaimsPrincipals   = 10000
)

// Peer returns the peer claimed with the verified principal: the claim when
// it is in the principal's namespace and within the bounds, else only the
// principal and its namespace.
func (c *Claims) Peer(principal spiffeid.ID, claimed Peer) Peer {
	claimed.Principal = principal
	ns := namespaceOf(principal)
	plain := Peer{Principal: principal, Namespace: ns, UID: claimed.UID, Pod: claimed.Pod}
	if principal.IsZero() || claimed.Workload == "" || claimed.Namespace != ns {
		return plain
	}
	for _, s := range []*string{&claimed.Workload, &claimed.Namespace, &claimed.CanonicalService, &claimed.CanonicalRevision, &claimed.Cluster} {
		*s = Bound(*s)
	}
	key := claimed
	key.UID, key.Pod = "", ""
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seen == nil {
		c.seen = map[spiffeid.ID][]Peer{}
	}
	known := c.seen[principal]
	for _, k := range known {
		if k == key {
			return claimed
		}
	}
	if len(known) >= positiveOr(c.PerPrincipal, DefaultClaimsPerPrincipal) ||
		(known == nil && len(c.seen) >= positiveOr(c.Principals, DefaultClaimsPrincipals)) {
		return plain
	}
	c.seen[principal] = append(known, key)
	return claimed
}

// namespaceOf is the namespace of an Istio-style SPIFFE ID
// (/ns/<ns>/sa/<sa>), or "".
func namespaceOf(id spiffeid.ID) string {
	parts := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(parts) == 4 && parts[0] == "ns" && parts[2] == "sa" {
		return parts[1]
	}
	return ""
}

func positiveOr(n, def int) int {
	if n > 0 {
		return n
	}
	return def
}
