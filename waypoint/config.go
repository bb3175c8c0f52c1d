package waypoint

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Resource is one xDS resource with its version: a *listenerv3.Listener,
// *routev3.RouteConfiguration, *clusterv3.Cluster or
// *endpointv3.ClusterLoadAssignment.
type Resource struct {
	Version  string
	Resource proto.Message
}

// ErrIncomplete is returned (wrapped) by Apply when the resources are
// valid but not yet a consistent whole (a listener's route configuration or
// an EDS cluster's endpoints are missing): the previous snapshot keeps
// serving, and the set is not an error to NACK.
var ErrIncomplete = errors.New("config incomplete")

// Envoy's defaults for what istiod-lite may leave unset.
const (
	defaultRouteTimeout       = 15 * time.Second
	defaultConnectTimeout     = 5 * time.Second
	defaultMaxHeadersKB       = 60
	defaultStreamIdleTimeout  = 5 * time.Minute
	defaultIdleTimeout        = time.Hour
	defaultRetryBase          = 25 * time.Millisecond
	defaultCBLimit            = 1024
	defaultCBRetries          = 3
	defaultOutlierInterval    = 10 * time.Second
	defaultBaseEjection       = 30 * time.Second
	defaultMaxEjection        = 300 * time.Second
	defaultMaxEjectionPercent = 10
	defaultConsecutive        = 5
)

// snapshot is one immutable, consistent configuration. Requests load it
// once and keep it; Apply swaps in a new one.
type snapshot struct {
	resources []Resource // as applied, for the config dump
	chains    []*filterChain
	routes    map[string]*routeTable
	clusters  map[string]*clusterView
}

type filterChain struct {
	name     string
	prefixes []netip.Prefix
	port     uint32 // 0: any
	http     *httpChain
	tcp      *tcpChain
	service  string // destination service hostname, from the chain name
}

type httpChain struct {
	statPrefix        string
	routeName         string
	routes            *routeTable
	rbac              []*rbacFilter // in order (DENY before ALLOW, as sent)
	maxHeaderBytes    int
	idleTimeout       time.Duration
	streamIdleTimeout time.Duration
	requestTimeout    time.Duration
}

type tcpChain struct {
	statPrefix  string
	cluster     string
	idleTimeout time.Duration
	rbac        []*rbacFilter
}

// chainFor picks the filter chain for a CONNECT target as Envoy's filter
// chain match does: destination port first (exact beats unset), then the
// longest matching prefix.
func (s *snapshot) chainFor(target netip.AddrPort) *filterChain {
	var best *filterChain
	bestPort, bestBits := false, -1
	addr := target.Addr().Unmap()
	for _, c := range s.chains {
		portExact := c.port != 0
		if portExact && c.port != uint32(target.Port()) {
			continue
		}
		bits := -1
		if len(c.prefixes) == 0 {
			bits = 0
		}
		for _, p := range c.prefixes {
			if p.Contains(addr) && p.Bits() > bits {
				bits = p.Bits()
			}
		}
		if bits < 0 {
			continue
		}
		if best == nil || (portExact && !bestPort) || (portExact == bestPort && bits > bestBits) {
			best, bestPort, bestBits = c, portExact, bits
		}
	}
	return best
}

type headerAdd struct {
	name      string
	value     string
	action    corev3.HeaderValueOption_HeaderAppendAction
	keepEmpty bool
}

type headerMods struct {
	reqAdd     []headerAdd
	reqRemove  []string
	respAdd    []headerAdd
	respRemove []string
}

func compileHeaderAdds(opts []*corev3.HeaderValueOption, path string) ([]headerAdd, error) {
	out := make([]headerAdd, 0, len(opts))
	for i, o := range opts {
		p := fmt.Sprintf("%s[%d]", path, i)
		h := headerAdd{name: o.GetHeader().GetKey(), value: o.GetHeader().GetValue(), action: o.GetAppendAction(), keepEmpty: o.GetKeepEmptyValue()}
		if len(o.GetHeader().GetRawValue()) > 0 {
			h.value = string(o.GetHeader().GetRawValue())
		}
		//lint:ignore SA1019 the deprecated form may still be sent; honoured as Envoy does
		if app := o.GetAppend(); app != nil {
			if app.GetValue() {
				h.action = corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD
			} else {
				h.action = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
			}
		}
		if strings.Contains(h.value, "%") {
			return nil, fieldError(p+".header.value", "command operators (%%...%%) are not supported")
		}
		if strings.HasPrefix(h.name, ":") {
			return nil, fieldError(p+".header.key", "pseudo-headers cannot be modified")
		}
		out = append(out, h)
	}
	return out, nil
}

type headerModder interface {
	GetRequestHeadersToAdd() []*corev3.HeaderValueOption
	GetRequestHeadersToRemove() []string
	GetResponseHeadersToAdd() []*corev3.HeaderValueOption
	GetResponseHeadersToRemove() []string
}

func compileHeaderMods(m headerModder, path string) (headerMods, error) {
	var hm headerMods
	var err error
	if hm.reqAdd, err = compileHeaderAdds(m.GetRequestHeadersToAdd(), path+"request_headers_to_add"); err != nil {
		return hm, err
	}
	if hm.respAdd, err = compileHeaderAdds(m.GetResponseHeadersToAdd(), path+"response_headers_to_add"); err != nil {
		return hm, err
	}
	hm.reqRemove = m.GetRequestHeadersToRemove()
	hm.respRemove = m.GetResponseHeadersToRemove()
	return hm, nil
}

// applyHeaders applies removals then additions with Envoy's append actions.
func applyHeaders(h http.Header, remove []string, add []headerAdd) {
	for _, n := range remove {
		h.Del(n)
	}
	for _, a := range add {
		if a.value == "" && !a.keepEmpty {
			continue
		}
		_, exists := h[http.CanonicalHeaderKey(a.name)]
		switch a.action {
		case corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD:
			h.Add(a.name, a.value)
		case corev3.HeaderValueOption_ADD_IF_ABSENT:
			if !exists {
				h.Set(a.name, a.value)
			}
		case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
			h.Set(a.name, a.value)
		case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:
			if exists {
				h.Set(a.name, a.value)
			}
		}
	}
}

type routeTable struct {
	name   string
	vhosts []*vhost
	mods   headerMods
}

type vhost struct {
	name    string
	domains []string
	routes  []*route
	mods    headerMods
}

// pick returns the virtual host for host (Envoy's domain match: exact,
// then suffix wildcard "*.x", then prefix wildcard "x.*", then "*").
func (t *routeTable) pick(host string) *vhost {
	host = strings.ToLower(host)
	hostNoPort := host
	if h, _, ok := strings.Cut(host, ":"); ok && !strings.HasPrefix(host, "[") {
		hostNoPort = h
	}
	var best *vhost
	bestRank, bestLen := 0, -1
	for _, v := range t.vhosts {
		for _, d := range v.domains {
			d = strings.ToLower(d)
			rank := 0
			switch {
			case d == host || d == hostNoPort:
				rank = 4
			case d == "*":
				rank = 1
			case strings.HasPrefix(d, "*") && strings.HasSuffix(hostNoPort, d[1:]):
				rank = 3
			case strings.HasSuffix(d, "*") && strings.HasPrefix(hostNoPort, d[:len(d)-1]):
				rank = 2
			}
			if rank > bestRank || (rank == bestRank && rank > 0 && len(d) > bestLen) {
				best, bestRank, bestLen = v, rank, len(d)
			}
		}
	}
	return best
}

type route struct {
	name     string
	match    *routeMatch
	mods     headerMods
	direct   *directResponse
	redirect *redirectAction
	action   *routeAction
}

type directResponse struct {
	status int
	body   string
}

type redirectAction struct {
	scheme, host string
	port         uint32
	path         string
	prefix       *string
	code         int
	stripQuery   bool
}

type routeAction struct {
	clusters      []weightedCluster
	total         uint64
	seq           atomic.Uint64 // weighted pick sequence
	notFoundCode  int
	timeout       time.Duration // 0: none
	retry         *retryPolicy
	mirrors       []mirrorPolicy
	prefixRewrite *string
	regexRewrite  *regexp.Regexp
	regexSubst    string
	hostRewrite   string
}

type weightedCluster struct {
	name   string
	weight uint64
	mods   headerMods
}

// pickCluster chooses among weighted clusters. It walks a Weyl sequence
// (n * golden ratio mod 1) instead of drawing random numbers: the same
// long-run split as Envoy's random pick, with the observed split within a
// fraction of a percent after a few hundred requests.
func (a *routeAction) pickCluster() *weightedCluster {
	if len(a.clusters) == 1 {
		return &a.clusters[0]
	}
	const phi = 0.6180339887498949
	n := a.seq.Add(1)
	x := float64(n) * phi
	x -= float64(uint64(x))
	v := uint64(x * float64(a.total))
	for i := range a.clusters {
		if v < a.clusters[i].weight {
			return &a.clusters[i]
		}
		v -= a.clusters[i].weight
	}
	return &a.clusters[len(a.clusters)-1]
}

type mirrorPolicy struct {
	cluster  string
	num, den uint64 // fraction of requests mirrored
}

// retryOn bits.
const (
	retry5xx = 1 << iota
	retryGatewayError
	retryReset
	retryConnectFailure
	retryRefusedStream
	retryStatusCodes
	retryGRPCCancelled
	retryGRPCDeadline
	retryGRPCResource
	retryGRPCUnavailable
)

var retryOnNames = map[string]int{
	"5xx": retry5xx, "gateway-error": retryGatewayError, "reset": retryReset,
	"connect-failure": retryConnectFailure, "refused-stream": retryRefusedStream,
	"retriable-status-codes": retryStatusCodes, "cancelled": retryGRPCCancelled,
	"deadline-exceeded": retryGRPCDeadline, "resource-exhausted": retryGRPCResource,
	"unavailable": retryGRPCUnavailable,
}

type retryPolicy struct {
	on            int
	numRetries    int
	perTryTimeout time.Duration
	codes         map[int]bool
	base, max     time.Duration
	previousHosts bool
	hostAttempts  int
}

func dur(d *durationpb.Duration) time.Duration {
	if d == nil {
		return 0
	}
	return d.AsDuration()
}

func compileRouteConfig(rc *routev3.RouteConfiguration) (*routeTable, error) {
	path := fmt.Sprintf("route %q: ", rc.GetName())
	t := &routeTable{name: rc.GetName()}
	var err error
	if t.mods, err = compileHeaderMods(rc, path); err != nil {
		return nil, err
	}
	for i, v := range rc.GetVirtualHosts() {
		vp := fmt.Sprintf("%svirtual_hosts[%d].", path, i)
		vh := &vhost{name: v.GetName(), domains: v.GetDomains()}
		if vh.mods, err = compileHeaderMods(v, vp); err != nil {
			return nil, err
		}
		for j, r := range v.GetRoutes() {
			cr, err := compileRoute(r, fmt.Sprintf("%sroutes[%d]", vp, j))
			if err != nil {
				return nil, err
			}
			vh.routes = append(vh.routes, cr)
		}
		t.vhosts = append(t.vhosts, vh)
	}
	return t, nil
}

func compileRoute(r *routev3.Route, path string) (*route, error) {
	cr := &route{name: r.GetName()}
	var err error
	if cr.match, err = compileRouteMatch(r.GetMatch(), path+".match"); err != nil {
		return nil, err
	}
	if cr.mods, err = compileHeaderMods(r, path+"."); err != nil {
		return nil, err
	}
	switch a := r.GetAction().(type) {
	case *routev3.Route_DirectResponse:
		cr.direct = &directResponse{status: int(a.DirectResponse.GetStatus())}
		if b := a.DirectResponse.GetBody(); b != nil {
			cr.direct.body = b.GetInlineString()
			if len(b.GetInlineBytes()) > 0 {
				cr.direct.body = string(b.GetInlineBytes())
			}
		}
	case *routev3.Route_Redirect:
		cr.redirect, err = compileRedirect(a.Redirect, r.GetMatch(), path+".redirect")
	case *routev3.Route_Route:
		cr.action, err = compileRouteAction(a.Route, r.GetMatch(), path+".route")
	default:
		return nil, fieldError(path, "action %T not supported", a)
	}
	return cr, err
}

var redirectCodes = map[routev3.RedirectAction_RedirectResponseCode]int{
	routev3.RedirectAction_MOVED_PERMANENTLY:  http.StatusMovedPermanently,
	routev3.RedirectAction_FOUND:              http.StatusFound,
	routev3.RedirectAction_SEE_OTHER:          http.StatusSeeOther,
	routev3.RedirectAction_TEMPORARY_REDIRECT: http.StatusTemporaryRedirect,
	routev3.RedirectAction_PERMANENT_REDIRECT: http.StatusPermanentRedirect,
}

func compileRedirect(r *routev3.RedirectAction, m *routev3.RouteMatch, path string) (*redirectAction, error) {
	ra := &redirectAction{scheme: r.GetSchemeRedirect(), host: r.GetHostRedirect(), port: r.GetPortRedirect(),
		path: r.GetPathRedirect(), code: redirectCodes[r.GetResponseCode()], stripQuery: r.GetStripQuery()}
	if r.GetHttpsRedirect() {
		ra.scheme = "https"
	}
	if p, ok := r.GetPathRewriteSpecifier().(*routev3.RedirectAction_PrefixRewrite); ok {
		if m.GetPrefix() == "" && m.GetPathSeparatedPrefix() == "" {
			return nil, fieldError(path+".prefix_rewrite", "needs a prefix match")
		}
		ra.prefix = &p.PrefixRewrite
	}
	return ra, nil
}

func compileRouteAction(a *routev3.RouteAction, m *routev3.RouteMatch, path string) (*routeAction, error) {
	ra := &routeAction{notFoundCode: http.StatusServiceUnavailable, timeout: defaultRouteTimeout}
	switch a.GetClusterNotFoundResponseCode() {
	case routev3.RouteAction_NOT_FOUND:
		ra.notFoundCode = http.StatusNotFound
	case routev3.RouteAction_INTERNAL_SERVER_ERROR:
		ra.notFoundCode = http.StatusInternalServerError
	}
	switch cs := a.GetClusterSpecifier().(type) {
	case *routev3.RouteAction_Cluster:
		ra.clusters = []weightedCluster{{name: cs.Cluster, weight: 1}}
		ra.total = 1
	case *routev3.RouteAction_WeightedClusters:
		for i, c := range cs.WeightedClusters.GetClusters() {
			p := fmt.Sprintf("%s.weighted_clusters.clusters[%d].", path, i)
			wc := weightedCluster{name: c.GetName(), weight: uint64(c.GetWeight().GetValue())}
			var err error
			if wc.mods, err = compileHeaderMods(c, p); err != nil {
				return nil, err
			}
			ra.total += wc.weight
			ra.clusters = append(ra.clusters, wc)
		}
		//lint:ignore SA1019 deprecated but may be sent: it must then agree with the weights
		if tw := cs.WeightedClusters.GetTotalWeight(); tw != nil && uint64(tw.GetValue()) != ra.total {
			return nil, fieldError(path+".weighted_clusters.total_weight", "%d is not the sum of the weights (%d)", tw.GetValue(), ra.total)
		}
		if ra.total == 0 {
			return nil, fieldError(path+".weighted_clusters", "weights sum to zero")
		}
	default:
		return nil, fieldError(path, "cluster specifier %T not supported", cs)
	}
	if a.GetTimeout() != nil {
		ra.timeout = dur(a.GetTimeout())
	}
	if rp := a.GetRetryPolicy(); rp != nil {
		p, err := compileRetry(rp, path+".retry_policy")
		if err != nil {
			return nil, err
		}
		ra.retry = p
	}
	for i, mp := range a.GetRequestMirrorPolicies() {
		mm := mirrorPolicy{cluster: mp.GetCluster(), num: 1, den: 1}
		if f := mp.GetRuntimeFraction(); f != nil {
			mm.num = uint64(f.GetDefaultValue().GetNumerator())
			switch f.GetDefaultValue().GetDenominator() {
			case typev3.FractionalPercent_HUNDRED:
				mm.den = 100
			case typev3.FractionalPercent_TEN_THOUSAND:
				mm.den = 10000
			case typev3.FractionalPercent_MILLION:
				mm.den = 1000000
			}
		}
		if mm.cluster == "" {
			return nil, fieldError(fmt.Sprintf("%s.request_mirror_policies[%d].cluster", path, i), "required")
		}
		ra.mirrors = append(ra.mirrors, mm)
	}
	if a.GetPrefixRewrite() != "" {
		if m.GetPrefix() == "" && m.GetPathSeparatedPrefix() == "" {
			return nil, fieldError(path+".prefix_rewrite", "needs a prefix match")
		}
		s := a.GetPrefixRewrite()
		ra.prefixRewrite = &s
	}
	if rr := a.GetRegexRewrite(); rr != nil {
		re, err := regexp.Compile(rr.GetPattern().GetRegex())
		if err != nil {
			return nil, fieldError(path+".regex_rewrite.pattern", "%v", err)
		}
		ra.regexRewrite = re
		ra.regexSubst = envoySubst(rr.GetSubstitution())
	}
	ra.hostRewrite = a.GetHostRewriteLiteral()
	return ra, nil
}

// envoySubst turns Envoy's \1 capture references into Go's ${1}.
func envoySubst(s string) string {
	return regexp.MustCompile(`\\(\d)`).ReplaceAllString(strings.ReplaceAll(s, "$", "$$"), "$${$1}")
}

func compileRetry(rp *routev3.RetryPolicy, path string) (*retryPolicy, error) {
	p := &retryPolicy{numRetries: 1, base: defaultRetryBase, hostAttempts: 1}
	for _, on := range strings.Split(rp.GetRetryOn(), ",") {
		on = strings.TrimSpace(on)
		if on == "" {
			continue
		}
		bit, ok := retryOnNames[on]
		if !ok {
			return nil, fieldError(path+".retry_on", "condition %q not supported", on)
		}
		p.on |= bit
	}
	if rp.GetNumRetries() != nil {
		p.numRetries = int(rp.GetNumRetries().GetValue())
	}
	p.perTryTimeout = dur(rp.GetPerTryTimeout())
	if len(rp.GetRetriableStatusCodes()) > 0 {
		p.codes = map[int]bool{}
		for _, c := range rp.GetRetriableStatusCodes() {
			p.codes[int(c)] = true
		}
	}
	if b := rp.GetRetryBackOff(); b != nil {
		p.base = dur(b.GetBaseInterval())
		if p.base <= 0 {
			return nil, fieldError(path+".retry_back_off.base_interval", "must be positive")
		}
	}
	p.max = 10 * p.base
	if b := rp.GetRetryBackOff(); b != nil && b.GetMaxInterval() != nil {
		p.max = dur(b.GetMaxInterval())
		if p.max < p.base {
			return nil, fieldError(path+".retry_back_off.max_interval", "less than base_interval")
		}
	}
	for i, hp := range rp.GetRetryHostPredicate() {
		if hp.GetName() != "envoy.retry_host_predicates.previous_hosts" {
			return nil, fieldError(fmt.Sprintf("%s.retry_host_predicate[%d].name", path, i), "%q not supported", hp.GetName())
		}
		p.previousHosts = true
	}
	if n := rp.GetHostSelectionRetryMaxAttempts(); n > 0 {
		p.hostAttempts = int(n)
	}
	return p, nil
}

// compileListener turns a listener's filter chains into chains whose
// route tables are resolved later.
func compileListener(l *listenerv3.Listener) ([]*filterChain, error) {
	var out []*filterChain
	for i, fc := range l.GetFilterChains() {
		path := fmt.Sprintf("listener %q: filter_chains[%d]", l.GetName(), i)
		c := &filterChain{name: fc.GetName(), port: fc.GetFilterChainMatch().GetDestinationPort().GetValue()}
		c.service = serviceFromChain(c.name)
		for j, pr := range fc.GetFilterChainMatch().GetPrefixRanges() {
			a, err := netip.ParseAddr(pr.GetAddressPrefix())
			if err != nil {
				return nil, fieldError(fmt.Sprintf("%s.filter_chain_match.prefix_ranges[%d].address_prefix", path, j), "%v", err)
			}
			bits := a.BitLen()
			if pr.GetPrefixLen() != nil {
				bits = int(pr.GetPrefixLen().GetValue())
			}
			pfx, err := a.Unmap().Prefix(min(bits, a.Unmap().BitLen()))
			if err != nil {
				return nil, fieldError(fmt.Sprintf("%s.filter_chain_match.prefix_ranges[%d].prefix_len", path, j), "%v", err)
			}
			c.prefixes = append(c.prefixes, pfx)
		}
		var netRBAC []*rbacFilter
		filters := fc.GetFilters()
		if len(filters) == 0 {
			return nil, fieldError(path+".filters", "empty")
		}
		for j, f := range filters {
			fp := fmt.Sprintf("%s.filters[%d]", path, j)
			msg, err := unpack(f.GetTypedConfig(), fp+".typed_config")
			if err != nil {
				return nil, err
			}
			last := j == len(filters)-1
			switch m := msg.(type) {
			case *netrbacv3.RBAC:
				if last {
					return nil, fieldError(fp, "network RBAC must precede tcp_proxy")
				}
				if m.GetRules() != nil {
					rf, err := compileRBAC(m.GetRules(), fp+".typed_config.rules")
					if err != nil {
						return nil, err
					}
					netRBAC = append(netRBAC, rf)
				}
			case *tcpproxyv3.TcpProxy:
				if !last {
					return nil, fieldError(fp, "tcp_proxy must be the last filter")
				}
				if m.GetCluster() == "" {
					return nil, fieldError(fp+".typed_config.cluster", "required")
				}
				c.tcp = &tcpChain{statPrefix: m.GetStatPrefix(), cluster: m.GetCluster(), idleTimeout: dur(m.GetIdleTimeout()), rbac: netRBAC}
				if m.GetIdleTimeout() == nil {
					c.tcp.idleTimeout = defaultIdleTimeout
				}
			case *hcmv3.HttpConnectionManager:
				if !last || j != 0 {
					return nil, fieldError(fp, "http_connection_manager must be the only filter")
				}
				h, err := compileHCM(m, fp+".typed_config")
				if err != nil {
					return nil, err
				}
				c.http = h
			default:
				return nil, fieldError(fp+".typed_config", "%T not supported", m)
			}
		}
		if c.http == nil && c.tcp == nil {
			return nil, fieldError(path+".filters", "neither http_connection_manager nor tcp_proxy")
		}
		out = append(out, c)
	}
	return out, nil
}

func compileHCM(m *hcmv3.HttpConnectionManager, path string) (*httpChain, error) {
	h := &httpChain{statPrefix: m.GetStatPrefix(), maxHeaderBytes: defaultMaxHeadersKB << 10,
		idleTimeout: defaultIdleTimeout, streamIdleTimeout: defaultStreamIdleTimeout, requestTimeout: dur(m.GetRequestTimeout())}
	rds, ok := m.GetRouteSpecifier().(*hcmv3.HttpConnectionManager_Rds)
	if !ok || rds.Rds.GetRouteConfigName() == "" {
		return nil, fieldError(path+".rds.route_config_name", "required")
	}
	h.routeName = rds.Rds.GetRouteConfigName()
	if kb := m.GetMaxRequestHeadersKb(); kb != nil {
		h.maxHeaderBytes = int(kb.GetValue()) << 10
	}
	if m.GetStreamIdleTimeout() != nil {
		h.streamIdleTimeout = dur(m.GetStreamIdleTimeout())
	}
	if o := m.GetCommonHttpProtocolOptions(); o != nil && o.GetIdleTimeout() != nil {
		h.idleTimeout = dur(o.GetIdleTimeout())
	}
	if o := m.GetCommonHttpProtocolOptions(); o != nil && o.GetMaxRequestsPerConnection() != nil {
		return nil, fieldError(path+".common_http_protocol_options.max_requests_per_connection", "not supported downstream")
	}
	filters := m.GetHttpFilters()
	for i, f := range filters {
		fp := fmt.Sprintf("%s.http_filters[%d]", path, i)
		msg, err := unpack(f.GetTypedConfig(), fp+".typed_config")
		if err != nil {
			return nil, err
		}
		switch x := msg.(type) {
		case *routerv3.Router:
			if i != len(filters)-1 {
				return nil, fieldError(fp, "the router must be the last HTTP filter")
			}
		case *httprbacv3.RBAC:
			if x.GetRules() == nil { // no rules: no enforcement (Envoy)
				continue
			}
			rf, err := compileRBAC(x.GetRules(), fp+".typed_config.rules")
			if err != nil {
				return nil, err
			}
			h.rbac = append(h.rbac, rf)
		default:
			return nil, fieldError(fp+".typed_config", "%T not supported", x)
		}
	}
	if len(filters) == 0 {
		return nil, fieldError(path+".http_filters", "no router")
	}
	if _, ok := mustUnpack(filters[len(filters)-1].GetTypedConfig()).(*routerv3.Router); !ok {
		return nil, fieldError(path+".http_filters", "the last filter must be envoy.filters.http.router")
	}
	return h, nil
}

func mustUnpack(a *anypb.Any) proto.Message {
	m, _ := a.UnmarshalNew()
	return m
}

// unpack decodes a typed_config, validates it and checks its fields.
func unpack(a *anypb.Any, path string) (proto.Message, error) {
	if a == nil {
		return nil, fieldError(path, "required")
	}
	m, err := a.UnmarshalNew()
	if err != nil {
		return nil, fieldError(path, "%v", err)
	}
	if v, ok := m.(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			return nil, fieldError(path, "%v", err)
		}
	}
	if err := checkFields(m.ProtoReflect(), path); err != nil {
		return nil, err
	}
	return m, nil
}

// serviceFromChain extracts the hostname from "inbound-vip|<port>|http|<host>".
func serviceFromChain(name string) string {
	parts := strings.Split(name, "|")
	if len(parts) == 4 && parts[0] == "inbound-vip" {
		return parts[3]
	}
	return ""
}

// serviceFromCluster extracts the hostname from "outbound|<port>|<subset>|<host>".
func serviceFromCluster(name string) string {
	parts := strings.Split(name, "|")
	if len(parts) == 4 {
		return parts[3]
	}
	return ""
}

// compiled is a validated resource set before cluster state is attached.
type compiled struct {
	resources []Resource
	chains    []*filterChain
	routes    map[string]*routeTable
	clusters  map[string]*clusterSettings
	endpoints map[string][]endpointSpec
}

// compile validates and compiles a full resource set. It is pure.
func compile(rs []Resource) (*compiled, error) {
	c := &compiled{routes: map[string]*routeTable{}, clusters: map[string]*clusterSettings{}, endpoints: map[string][]endpointSpec{}}
	seen := map[string]bool{}
	var listeners []*listenerv3.Listener
	for _, r := range rs {
		var kind, name string
		switch m := r.Resource.(type) {
		case *listenerv3.Listener:
			kind, name = "listener", m.GetName()
		case *routev3.RouteConfiguration:
			kind, name = "route", m.GetName()
		case *clusterv3.Cluster:
			kind, name = "cluster", m.GetName()
		case *endpointv3.ClusterLoadAssignment:
			kind, name = "endpoints", m.GetClusterName()
		default:
			return nil, fmt.Errorf("resource type %T not supported", r.Resource)
		}
		key := kind + " " + name
		if seen[key] {
			return nil, fmt.Errorf("%s %q: duplicate", kind, name)
		}
		seen[key] = true
		if err := r.Resource.(interface{ ValidateAll() error }).ValidateAll(); err != nil {
			return nil, fmt.Errorf("%s %q: %w", kind, name, err)
		}
		if err := checkFields(r.Resource.ProtoReflect(), ""); err != nil {
			return nil, fmt.Errorf("%s %q: %w", kind, name, err)
		}
		switch m := r.Resource.(type) {
		case *listenerv3.Listener:
			listeners = append(listeners, m)
		case *routev3.RouteConfiguration:
			t, err := compileRouteConfig(m)
			if err != nil {
				return nil, err
			}
			c.routes[name] = t
		case *clusterv3.Cluster:
			s, err := compileCluster(m)
			if err != nil {
				return nil, err
			}
			c.clusters[name] = s
		case *endpointv3.ClusterLoadAssignment:
			eps, err := compileEndpoints(m)
			if err != nil {
				return nil, err
			}
			c.endpoints[name] = eps
		}
		c.resources = append(c.resources, r)
	}
	for _, l := range listeners {
		chains, err := compileListener(l)
		if err != nil {
			return nil, err
		}
		c.chains = append(c.chains, chains...)
	}
	var missing []string
	for _, ch := range c.chains {
		if ch.http == nil {
			continue
		}
		t, ok := c.routes[ch.http.routeName]
		if !ok {
			missing = append(missing, fmt.Sprintf("route %q", ch.http.routeName))
			continue
		}
		ch.http.routes = t
	}
	for name, s := range c.clusters {
		if _, ok := c.endpoints[s.edsName]; !ok {
			missing = append(missing, fmt.Sprintf("endpoints %q (cluster %q)", s.edsName, name))
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return nil, fmt.Errorf("%w: missing %s", ErrIncomplete, strings.Join(missing, ", "))
	}
	return c, nil
}
