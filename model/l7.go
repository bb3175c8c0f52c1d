package model

import (
	"net/netip"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/identity"
)

// This file is the L7 part of the model: what waypoints need and ztunnels do
// not receive. istiod-lite/envoy builds a waypoint's Envoy resources from it
// alone, so every Kubernetes field a waypoint honours has a home here, already
// validated and defaulted by translation (istiod-lite/translate).

// Waypoint is a waypoint proxy: a Gateway of class istio-waypoint. Key:
// "<namespace>/<name>". Its identity is its service account's SPIFFE ID (the
// account is named after the Gateway, as in Istio).
type Waypoint struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	// For is the istio.io/waypoint-for label: "service" (default),
	// "workload", "all" or "none".
	For string `json:"for"`
	// Address is the waypoint's address (its HBONE listener is on
	// PortHBONE); invalid until the waypoint has one.
	Address        netip.Addr `json:"address,omitzero"`
	ServiceAccount string     `json:"serviceAccount"`
}

// Key returns the store key.
func (w *Waypoint) Key() string { return w.Namespace + "/" + w.Name }

// Identity returns the waypoint's SPIFFE ID in trust domain td (the zero
// TrustDomain means identity.DefaultTrustDomain): the identity a bound
// target's ztunnel accepts HBONE from, and the one the waypoint presents.
func (w *Waypoint) Identity(td spiffeid.TrustDomain) spiffeid.ID {
	if td.IsZero() {
		td = identity.DefaultTrustDomain
	}
	sa := w.ServiceAccount
	if sa == "" {
		sa = w.Name
	}
	id, err := identity.Workload(td, w.Namespace, sa)
	if err != nil {
		return spiffeid.ID{}
	}
	return id
}

// Ref returns the reference bound objects carry.
func (w *Waypoint) Ref() *WaypointRef {
	r := &WaypointRef{Name: w.Name, Namespace: w.Namespace}
	if w.Address.IsValid() {
		r.Address = netip.AddrPortFrom(w.Address, PortHBONE)
	}
	return r
}

// Route kinds.
const (
	KindHTTPRoute = "HTTPRoute"
	KindGRPCRoute = "GRPCRoute"
)

// HTTPRoute is a Gateway API HTTPRoute or GRPCRoute reduced to what a
// waypoint needs (GAMMA: its parent is a Service). A GRPCRoute's method
// matches are translated to path matches on "/<service>/<method>" and its
// requests must have a gRPC content type. Key: "<namespace>/<name>" (an
// HTTPRoute and a GRPCRoute of one name live in different snapshot maps).
type HTTPRoute struct {
	Kind      string    `json:"kind,omitempty"` // KindHTTPRoute (or empty) or KindGRPCRoute
	Name      string    `json:"name"`
	Namespace string    `json:"namespace"`
	Created   time.Time `json:"created,omitzero"` // creation timestamp: the precedence tie-breaker
	// Parents are the parentRefs, each with the status translation computed
	// for it. Only parents with an Accepted=True condition are programmed.
	Parents   []RouteParent   `json:"parents"`
	Hostnames []string        `json:"hostnames,omitempty"`
	Rules     []HTTPRouteRule `json:"rules"`
}

// Key returns the store key.
func (r *HTTPRoute) Key() string { return r.Namespace + "/" + r.Name }

// IsGRPC reports whether r is a GRPCRoute.
func (r *HTTPRoute) IsGRPC() bool { return r.Kind == KindGRPCRoute }

// RouteParent is a parentRef: a Service (GAMMA) or a Gateway, with the
// route's status for that parent (Gateway API conditions Accepted and
// ResolvedRefs, and PartiallyInvalid when some rules answer 500).
type RouteParent struct {
	Kind       string      `json:"kind"` // "Service" or "Gateway"
	Namespace  string      `json:"namespace"`
	Name       string      `json:"name"`
	Port       uint16      `json:"port,omitempty"`
	Conditions []Condition `json:"conditions,omitempty"`
}

// Accepted reports whether the parent's Accepted condition is True.
func (p *RouteParent) Accepted() bool {
	for _, c := range p.Conditions {
		if c.Type == ConditionAccepted {
			return c.Status
		}
	}
	return false
}

// Condition types and reasons written to route status (Gateway API).
const (
	ConditionAccepted         = "Accepted"
	ConditionResolvedRefs     = "ResolvedRefs"
	ConditionPartiallyInvalid = "PartiallyInvalid"

	ReasonAccepted         = "Accepted"
	ReasonNoMatchingParent = "NoMatchingParent"
	ReasonNotAllowed       = "NotAllowedByListeners"
	ReasonUnsupportedValue = "UnsupportedValue"
	ReasonResolvedRefs     = "ResolvedRefs"
	ReasonBackendNotFound  = "BackendNotFound"
	ReasonInvalidKind      = "InvalidKind"
	ReasonRefNotPermitted  = "RefNotPermitted"
)

// AuthorizationPolicy condition types and reasons (Istio's): which proxy
// enforces the policy and whether as written. WaypointPolicy carries its
// WaypointAccepted condition; a selector policy's ZtunnelAccepted follows
// from the Problems translation reports for it (L7RuleNotEnforcedByZtunnel,
// InvalidPolicy: False, UnsupportedValue; none: True, Accepted).
const (
	ConditionZtunnelAccepted  = "ZtunnelAccepted"
	ConditionWaypointAccepted = "WaypointAccepted"

	ReasonTargetNotFound = "TargetNotFound"
)

// Condition is a status condition computed by translation, for a status
// writer to write (metav1.Condition's Type, Status, Reason, Message).
type Condition struct {
	Type    string `json:"type"`
	Status  bool   `json:"status"`
	Reason  string `json:"reason"`
	Message string `json:"message,omitempty"`
}

// HTTPRouteRule is one rule: its matches (any), its filters, its weighted
// backends, timeouts and retries.
type HTTPRouteRule struct {
	Name    string      `json:"name,omitempty"`
	Matches []HTTPMatch `json:"matches,omitempty"` // none: every request (prefix "/")
	// Backends are the weighted backendRefs, invalid ones included (they
	// get their share of requests answered with 500).
	Backends        []WeightedBackend `json:"backends"`
	RequestHeaders  *HeaderModifier   `json:"requestHeaders,omitempty"`
	ResponseHeaders *HeaderModifier   `json:"responseHeaders,omitempty"`
	Redirect        *Redirect         `json:"redirect,omitempty"`
	Rewrite         *Rewrite          `json:"rewrite,omitempty"`
	Mirrors         []Mirror          `json:"mirrors,omitempty"`
	// Timeout is the request timeout (Gateway API timeouts.request): the
	// whole request, retries included; 0 = none.
	Timeout time.Duration `json:"timeout,omitempty"`
	// BackendTimeout is timeouts.backendRequest: each try; 0 = none.
	BackendTimeout time.Duration `json:"backendTimeout,omitempty"`
	// Retry is the rule's retry policy; nil means Istio's default
	// (DefaultRetry).
	Retry *Retry `json:"retry,omitempty"`
	// Invalid, when set, says why the rule cannot be honoured as written: it
	// answers every request it matches with 500 (fail closed).
	Invalid string `json:"invalid,omitempty"`
}

// Path match types (Gateway API).
const (
	PathExact  = "Exact"
	PathPrefix = "PathPrefix"
	PathRegex  = "RegularExpression"
)

// Header and query match types (Gateway API).
const (
	MatchExact = "Exact"
	MatchRegex = "RegularExpression"
)

// HTTPMatch matches a request; every set field must match.
type HTTPMatch struct {
	PathType    string        `json:"pathType,omitempty"` // PathExact, PathPrefix, PathRegex; empty: any path
	Path        string        `json:"path,omitempty"`
	Method      string        `json:"method,omitempty"`
	Headers     []StringMatch `json:"headers,omitempty"`
	QueryParams []StringMatch `json:"queryParams,omitempty"`
}

// StringMatch matches a header or query parameter by name: its value is
// Value (MatchExact) or matches the RE2 expression Value (MatchRegex).
type StringMatch struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Value string `json:"value"`
}

// WeightedBackend is a backendRef: a service port with a weight.
type WeightedBackend struct {
	Service string `json:"service"` // Service.Key() of the backend
	Port    uint16 `json:"port"`
	Weight  int32  `json:"weight"`
	// Invalid, when set, is the Gateway API reason the backend cannot be
	// used (BackendNotFound, InvalidKind...): its share of requests is
	// answered with 500.
	Invalid         string          `json:"invalid,omitempty"`
	RequestHeaders  *HeaderModifier `json:"requestHeaders,omitempty"`
	ResponseHeaders *HeaderModifier `json:"responseHeaders,omitempty"`
}

// HeaderModifier is a RequestHeaderModifier or ResponseHeaderModifier.
type HeaderModifier struct {
	Set    []Header `json:"set,omitempty"`
	Add    []Header `json:"add,omitempty"`
	Remove []string `json:"remove,omitempty"`
}

// Header is a header name and value.
type Header struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Redirect is a RequestRedirect filter; zero fields keep the request's.
type Redirect struct {
	Scheme   string `json:"scheme,omitempty"`
	Hostname string `json:"hostname,omitempty"`
	Port     uint16 `json:"port,omitempty"`
	// FullPath replaces the path; PrefixPath replaces the matched prefix.
	// At most one is set.
	FullPath   string `json:"fullPath,omitempty"`
	PrefixPath string `json:"prefixPath,omitempty"`
	StatusCode int    `json:"statusCode"` // 301, 302, 303, 307 or 308
}

// Rewrite is a URLRewrite filter.
type Rewrite struct {
	Hostname string `json:"hostname,omitempty"`
	// FullPath replaces the path; PrefixPath replaces the matched prefix
	// (the rule's matches are then all path prefixes). At most one is set;
	// empty strings mean unset, "/" is a valid prefix replacement.
	FullPath   *string `json:"fullPath,omitempty"`
	PrefixPath *string `json:"prefixPath,omitempty"`
}

// Mirror is a RequestMirror filter: a copy of Percent percent of requests
// (fire and forget) goes to the backend.
type Mirror struct {
	Service string  `json:"service"`
	Port    uint16  `json:"port"`
	Percent float64 `json:"percent"` // 0..100
}

// Retry is a rule's retry policy (Gateway API retry, Istio's semantics).
type Retry struct {
	Attempts int           `json:"attempts"` // retries after the first try; 0 disables retries
	Codes    []int         `json:"codes,omitempty"`
	Backoff  time.Duration `json:"backoff,omitempty"` // base interval; 0 = Envoy's 25 ms
}

// DefaultRetry is Istio's retry policy for routes that set none: two
// retries on connect-failure, refused-stream, unavailable, cancelled.
var DefaultRetry = Retry{Attempts: 2}

// DestinationRule is the networking.istio.io/v1 DestinationRule subset
// waypoints apply to a service's clusters. Key: "<namespace>/<name>".
type DestinationRule struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	// Service is the Service.Key() of the host it applies to.
	Service string        `json:"service"`
	Policy  TrafficPolicy `json:"policy"`
	// Ports are the portLevelSettings, each already merged over Policy (a
	// section set at port level replaces the top-level one, as in Istio).
	Ports []PortTrafficPolicy `json:"ports,omitempty"`
}

// Key returns the store key.
func (d *DestinationRule) Key() string { return d.Namespace + "/" + d.Name }

// ForPort returns the policy for a service port.
func (d *DestinationRule) ForPort(port uint16) TrafficPolicy {
	for _, p := range d.Ports {
		if p.Port == port {
			return p.Policy
		}
	}
	return d.Policy
}

// PortTrafficPolicy is a port-level traffic policy.
type PortTrafficPolicy struct {
	Port   uint16        `json:"port"`
	Policy TrafficPolicy `json:"policy"`
}

// TrafficPolicy is a DestinationRule's trafficPolicy subset.
type TrafficPolicy struct {
	ConnectionPool   *ConnectionPool   `json:"connectionPool,omitempty"`
	OutlierDetection *OutlierDetection `json:"outlierDetection,omitempty"`
	// LoadBalancer is loadBalancer.simple: LBRoundRobin (default),
	// LBLeastRequest or LBRandom.
	LoadBalancer string `json:"loadBalancer,omitempty"`
}

// Load-balancing policies.
const (
	LBRoundRobin   = "ROUND_ROBIN"
	LBLeastRequest = "LEAST_REQUEST"
	LBRandom       = "RANDOM"
)

// ConnectionPool is trafficPolicy.connectionPool. Zero fields are unset.
type ConnectionPool struct {
	MaxConnections           int32         `json:"maxConnections,omitempty"`
	ConnectTimeout           time.Duration `json:"connectTimeout,omitempty"`
	MaxPendingRequests       int32         `json:"http1MaxPendingRequests,omitempty"`
	MaxRequests              int32         `json:"http2MaxRequests,omitempty"`
	MaxRequestsPerConnection int32         `json:"maxRequestsPerConnection,omitempty"`
	MaxRetries               int32         `json:"maxRetries,omitempty"`
	IdleTimeout              time.Duration `json:"idleTimeout,omitempty"`
}

// OutlierDetection is trafficPolicy.outlierDetection; nil pointers are
// unset (Istio's defaults apply: 5 consecutive 5xx, interval 10 s, base
// ejection 30 s, at most 10 % ejected).
type OutlierDetection struct {
	Consecutive5xx           *uint32       `json:"consecutive5xxErrors,omitempty"`
	ConsecutiveGatewayErrors *uint32       `json:"consecutiveGatewayErrors,omitempty"`
	Interval                 time.Duration `json:"interval,omitempty"`
	BaseEjectionTime         time.Duration `json:"baseEjectionTime,omitempty"`
	MaxEjectionPercent       int32         `json:"maxEjectionPercent,omitempty"`
}

// WaypointPolicy is an L7 AuthorizationPolicy (security.istio.io/v1) that
// a waypoint enforces: one with targetRefs to a waypoint's Gateway or to a
// Service. Key: "<namespace>/<name>".
//
// Rules use Istio's semantics (see Policy); rules that cannot be enforced
// as written were already made to fail closed by translation (an ALLOW rule
// dropped, a DENY rule widened).
type WaypointPolicy struct {
	Name      string         `json:"name"`
	Namespace string         `json:"namespace"`
	Targets   []PolicyTarget `json:"targets"`
	Action    Action         `json:"action"`
	Rules     []L7Rule       `json:"rules"`
	// Conditions is the policy's status (a WaypointAccepted condition),
	// for a status writer.
	Conditions []Condition `json:"conditions,omitempty"`
}

// Key returns the store key.
func (p *WaypointPolicy) Key() string { return p.Namespace + "/" + p.Name }

// PolicyTarget is a targetRef: a Gateway (the waypoint: every service it
// serves) or a Service, in the policy's namespace.
type PolicyTarget struct {
	Kind string `json:"kind"` // "Gateway" or "Service"
	Name string `json:"name"`
}

// L7Rule is one rule of a WaypointPolicy.
type L7Rule struct {
	From []L7Source    `json:"from,omitempty"`
	To   []L7Operation `json:"to,omitempty"`
	When []L7Condition `json:"when,omitempty"`
}

// L7Source matches the peer (the source workload's identity, as the
// waypoint sees it on the HBONE connection).
type L7Source struct {
	Principals    []string `json:"principals,omitempty"` // Istio style, without "spiffe://"; "*" and prefix/suffix "*" allowed
	NotPrincipals []string `json:"notPrincipals,omitempty"`
	Namespaces    []string `json:"namespaces,omitempty"`
	NotNamespaces []string `json:"notNamespaces,omitempty"`
}

// L7Operation matches the request.
type L7Operation struct {
	Hosts      []string `json:"hosts,omitempty"`
	NotHosts   []string `json:"notHosts,omitempty"`
	Ports      []uint16 `json:"ports,omitempty"`
	NotPorts   []uint16 `json:"notPorts,omitempty"`
	Methods    []string `json:"methods,omitempty"`
	NotMethods []string `json:"notMethods,omitempty"`
	Paths      []string `json:"paths,omitempty"` // Istio's: exact, "prefix*", "*suffix", "*", {*} and {**} templates
	NotPaths   []string `json:"notPaths,omitempty"`
}

// L7Condition is a "when" condition on a request header
// (request.headers[Header]).
type L7Condition struct {
	Header    string   `json:"header"`
	Values    []string `json:"values,omitempty"`
	NotValues []string `json:"notValues,omitempty"`
}
