package envoy

import (
	"cmp"
	"fmt"
	"math"
	"regexp"
	"slices"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	previoushosts "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ambit-mesh/ambit/model"
)

// Istio's default retry conditions (with DefaultRetry's attempts).
const defaultRetryOn = "connect-failure,refused-stream,unavailable,cancelled"

// hostSelectionRetryMaxAttempts is Istio's.
const hostSelectionRetryMaxAttempts = 5

// attachedRoutes returns the HTTPRoutes and GRPCRoutes with an accepted
// parentRef to svc (on port, or on every port).
func (b *builder) attachedRoutes(svc *model.Service, port uint16) []*model.HTTPRoute {
	var out []*model.HTTPRoute
	for _, r := range b.routes[svc.Namespace+"/"+svc.Name] {
		for i := range r.Parents {
			p := &r.Parents[i]
			if p.Kind == "Service" && p.Namespace == svc.Namespace && p.Name == svc.Name && (p.Port == 0 || p.Port == port) && p.Accepted() {
				out = append(out, r)
				break
			}
		}
	}
	return out
}

// routeEntry is one match of one rule: the unit Gateway API orders.
type routeEntry struct {
	route   *model.HTTPRoute
	ruleIdx int
	rule    *model.HTTPRouteRule
	match   model.HTTPMatch
	matchIx int
}

// sortEntries orders entries by Gateway API precedence: exact path, then
// the longest prefix (regular expressions after prefixes), then a method,
// then the most header matches, then the most query parameter matches;
// ties go to the oldest route, then by namespace/name, then rule and match
// order.
func sortEntries(es []routeEntry) {
	rank := func(m model.HTTPMatch) int {
		switch m.PathType {
		case model.PathExact:
			return 0
		case model.PathRegex:
			return 2
		}
		return 1
	}
	plen := func(m model.HTTPMatch) int {
		if m.PathType == "" {
			return 1 // "/"
		}
		return len(m.Path)
	}
	slices.SortStableFunc(es, func(a, b routeEntry) int {
		if c := cmp.Compare(rank(a.match), rank(b.match)); c != 0 {
			return c
		}
		if c := cmp.Compare(plen(b.match), plen(a.match)); c != 0 {
			return c
		}
		if c := cmp.Compare(b2i(b.match.Method != ""), b2i(a.match.Method != "")); c != 0 {
			return c
		}
		if c := cmp.Compare(len(b.match.Headers), len(a.match.Headers)); c != 0 {
			return c
		}
		if c := cmp.Compare(len(b.match.QueryParams), len(a.match.QueryParams)); c != 0 {
			return c
		}
		if c := a.route.Created.Compare(b.route.Created); c != 0 {
			return c
		}
		if c := cmp.Compare(a.route.Key(), b.route.Key()); c != 0 {
			return c
		}
		if c := cmp.Compare(a.route.Kind, b.route.Kind); c != 0 {
			return c
		}
		if c := cmp.Compare(a.ruleIdx, b.ruleIdx); c != 0 {
			return c
		}
		return cmp.Compare(a.matchIx, b.matchIx)
	})
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// makeDefaultRouteConfig is the route config of a chain no route attaches
// to: every request to cluster, with Istio's default retries and no
// timeout.
func makeDefaultRouteConfig(name, cluster string) *route.RouteConfiguration {
	vh := &route.VirtualHost{Name: name, Domains: []string{"*"}, Routes: []*route.Route{{
		Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
		Action: &route.Route_Route{Route: &route.RouteAction{
			ClusterSpecifier: &route.RouteAction_Cluster{Cluster: cluster},
			Timeout:          durationpb.New(0),
			RetryPolicy:      makeRetryPolicy(nil, 0),
		}},
	}}}
	return &route.RouteConfiguration{Name: name, VirtualHosts: []*route.VirtualHost{vh}}
}

// makeRouteConfig returns the route config of an HTTP chain with routes
// attached, in precedence order; unmatched requests get 404 (GAMMA).
func (b *builder) makeRouteConfig(name string, routes []*model.HTTPRoute) *route.RouteConfiguration {
	vh := &route.VirtualHost{Name: name, Domains: []string{"*"}}
	var es []routeEntry
	for _, r := range routes {
		for i := range r.Rules {
			rule := &r.Rules[i]
			if len(rule.Matches) == 0 {
				es = append(es, routeEntry{route: r, ruleIdx: i, rule: rule})
			}
			for j, m := range rule.Matches {
				es = append(es, routeEntry{route: r, ruleIdx: i, rule: rule, match: m, matchIx: j})
			}
		}
	}
	sortEntries(es)
	for _, e := range es {
		vh.Routes = append(vh.Routes, b.makeRoute(e))
	}
	return &route.RouteConfiguration{Name: name, VirtualHosts: []*route.VirtualHost{vh}}
}

func (b *builder) makeRoute(e routeEntry) *route.Route {
	rule := e.rule
	r := &route.Route{Match: makeMatch(e.match, e.route.IsGRPC())}
	if m := rule.RequestHeaders; m != nil {
		r.RequestHeadersToAdd, r.RequestHeadersToRemove = makeHeaderMods(m), m.Remove
	}
	if m := rule.ResponseHeaders; m != nil {
		r.ResponseHeadersToAdd, r.ResponseHeadersToRemove = makeHeaderMods(m), m.Remove
	}
	switch {
	case rule.Invalid != "":
		r.Action = internalError()
	case rule.Redirect != nil:
		r.Action = &route.Route_Redirect{Redirect: makeRedirect(rule.Redirect)}
	default:
		ra := b.makeRouteAction(rule, e.match)
		if ra == nil {
			r.Action = internalError()
		} else {
			r.Action = &route.Route_Route{Route: ra}
		}
	}
	return r
}

func internalError() *route.Route_DirectResponse {
	return &route.Route_DirectResponse{DirectResponse: &route.DirectResponseAction{Status: 500}}
}

func makeMatch(m model.HTTPMatch, grpc bool) *route.RouteMatch {
	rm := &route.RouteMatch{}
	switch m.PathType {
	case model.PathExact:
		rm.PathSpecifier = &route.RouteMatch_Path{Path: m.Path}
	case model.PathRegex:
		rm.PathSpecifier = &route.RouteMatch_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: m.Path}}
	default:
		// Gateway API prefixes match whole path segments; a trailing
		// slash is not significant.
		if p := strings.TrimRight(m.Path, "/"); p != "" {
			rm.PathSpecifier = &route.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: p}
		} else {
			rm.PathSpecifier = &route.RouteMatch_Prefix{Prefix: "/"}
		}
	}
	if m.Method != "" {
		rm.Headers = append(rm.Headers, headerMatcher(":method", exact(m.Method)))
	}
	for _, h := range m.Headers {
		rm.Headers = append(rm.Headers, headerMatcher(h.Name, stringMatch(h)))
	}
	for _, q := range m.QueryParams {
		rm.QueryParameters = append(rm.QueryParameters, &route.QueryParameterMatcher{
			Name: q.Name, QueryParameterMatchSpecifier: &route.QueryParameterMatcher_StringMatch{StringMatch: stringMatch(q)},
		})
	}
	if grpc {
		rm.Grpc = &route.RouteMatch_GrpcRouteMatchOptions{}
	}
	return rm
}

func stringMatch(m model.StringMatch) *matcher.StringMatcher {
	if m.Type == model.MatchRegex {
		return safeRegex(m.Value)
	}
	return exact(m.Value)
}

// makeRouteAction returns the forwarding action of a rule; nil when no
// backend has weight (Gateway API: 500).
func (b *builder) makeRouteAction(rule *model.HTTPRouteRule, m model.HTTPMatch) *route.RouteAction {
	ra := &route.RouteAction{
		Timeout:     durationpb.New(rule.Timeout),
		RetryPolicy: makeRetryPolicy(rule.Retry, rule.BackendTimeout),
	}
	var wcs []*route.WeightedCluster_ClusterWeight
	invalid, mods := false, false
	for _, be := range rule.Backends {
		if be.Weight <= 0 {
			continue
		}
		name, ok := "", be.Invalid == ""
		if ok {
			name, ok = b.useCluster(be.Service, be.Port)
		}
		if !ok {
			// A cluster that is never defined: Envoy answers
			// cluster_not_found_response_code, 500.
			name = fmt.Sprintf("invalid|%d||%s", be.Port, be.Service)
			invalid = true
		}
		cw := &route.WeightedCluster_ClusterWeight{Name: name, Weight: wrapperspb.UInt32(uint32(be.Weight))}
		if h := be.RequestHeaders; h != nil {
			cw.RequestHeadersToAdd, cw.RequestHeadersToRemove, mods = makeHeaderMods(h), h.Remove, true
		}
		if h := be.ResponseHeaders; h != nil {
			cw.ResponseHeadersToAdd, cw.ResponseHeadersToRemove, mods = makeHeaderMods(h), h.Remove, true
		}
		wcs = append(wcs, cw)
	}
	switch {
	case len(wcs) == 0:
		return nil
	case len(wcs) == 1 && !mods:
		ra.ClusterSpecifier = &route.RouteAction_Cluster{Cluster: wcs[0].Name}
	default:
		ra.ClusterSpecifier = &route.RouteAction_WeightedClusters{WeightedClusters: &route.WeightedCluster{Clusters: wcs}}
	}
	if invalid {
		ra.ClusterNotFoundResponseCode = route.RouteAction_INTERNAL_SERVER_ERROR
	}
	for _, mi := range rule.Mirrors {
		cl, ok := b.useCluster(mi.Service, mi.Port)
		if !ok {
			continue // translation checked it; a mirror never fails a request
		}
		ra.RequestMirrorPolicies = append(ra.RequestMirrorPolicies, &route.RouteAction_RequestMirrorPolicy{
			Cluster:         cl,
			RuntimeFraction: &core.RuntimeFractionalPercent{DefaultValue: makePercent(mi.Percent)},
		})
	}
	if rw := rule.Rewrite; rw != nil {
		if rw.Hostname != "" {
			ra.HostRewriteSpecifier = &route.RouteAction_HostRewriteLiteral{HostRewriteLiteral: rw.Hostname}
		}
		switch {
		case rw.FullPath != nil:
			ra.RegexRewrite = &matcher.RegexMatchAndSubstitute{Pattern: &matcher.RegexMatcher{Regex: `^/.*$`}, Substitution: *rw.FullPath}
		case rw.PrefixPath != nil:
			prefix := strings.TrimRight(m.Path, "/")
			repl := *rw.PrefixPath
			if repl == "/" && prefix != "" {
				// "/prefix/rest" -> "/rest", not "//rest".
				ra.RegexRewrite = &matcher.RegexMatchAndSubstitute{Pattern: &matcher.RegexMatcher{Regex: `^` + regexp.QuoteMeta(prefix) + `/*`}, Substitution: "/"}
			} else {
				ra.PrefixRewrite = repl
			}
		}
	}
	return ra
}

// makePercent is a percentage as a fraction of a hundred, or of a million
// when it is not whole.
func makePercent(p float64) *typev3.FractionalPercent {
	if p == math.Trunc(p) {
		return &typev3.FractionalPercent{Numerator: uint32(p), Denominator: typev3.FractionalPercent_HUNDRED}
	}
	return &typev3.FractionalPercent{Numerator: uint32(math.Round(p * 10000)), Denominator: typev3.FractionalPercent_MILLION}
}

// makeRetryPolicy maps a rule's retry (nil: Istio's default) and per-try
// timeout. Attempts 0 disables retries: no policy, unless a per-try
// timeout needs one.
func makeRetryPolicy(r *model.Retry, perTry time.Duration) *route.RetryPolicy {
	if r == nil {
		r = &model.DefaultRetry
	}
	if r.Attempts == 0 && perTry == 0 {
		return nil
	}
	p := &route.RetryPolicy{
		RetryOn:    defaultRetryOn,
		NumRetries: wrapperspb.UInt32(uint32(r.Attempts)),
		RetryHostPredicate: []*route.RetryPolicy_RetryHostPredicate{{
			Name:       "envoy.retry_host_predicates.previous_hosts",
			ConfigType: &route.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: mustAny(&previoushosts.PreviousHostsPredicate{})},
		}},
		HostSelectionRetryMaxAttempts: hostSelectionRetryMaxAttempts,
	}
	if perTry > 0 {
		p.PerTryTimeout = durationpb.New(perTry)
	}
	if len(r.Codes) > 0 {
		p.RetryOn += ",retriable-status-codes"
		for _, c := range r.Codes {
			p.RetriableStatusCodes = append(p.RetriableStatusCodes, uint32(c))
		}
	}
	if r.Backoff > 0 {
		p.RetryBackOff = &route.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(r.Backoff)}
	}
	return p
}

func makeHeaderMods(m *model.HeaderModifier) []*core.HeaderValueOption {
	var out []*core.HeaderValueOption
	for _, h := range m.Set {
		out = append(out, &core.HeaderValueOption{Header: &core.HeaderValue{Key: h.Name, Value: h.Value}, AppendAction: core.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD})
	}
	for _, h := range m.Add {
		out = append(out, &core.HeaderValueOption{Header: &core.HeaderValue{Key: h.Name, Value: h.Value}, AppendAction: core.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD})
	}
	return out
}

func makeRedirect(rd *model.Redirect) *route.RedirectAction {
	a := &route.RedirectAction{}
	if rd.Scheme != "" {
		a.SchemeRewriteSpecifier = &route.RedirectAction_SchemeRedirect{SchemeRedirect: rd.Scheme}
	}
	if rd.Hostname != "" {
		a.HostRedirect = rd.Hostname
	}
	if rd.Port != 0 {
		a.PortRedirect = uint32(rd.Port)
	}
	switch {
	case rd.FullPath != "":
		a.PathRewriteSpecifier = &route.RedirectAction_PathRedirect{PathRedirect: rd.FullPath}
	case rd.PrefixPath != "":
		a.PathRewriteSpecifier = &route.RedirectAction_PrefixRewrite{PrefixRewrite: rd.PrefixPath}
	}
	switch rd.StatusCode {
	case 301:
		a.ResponseCode = route.RedirectAction_MOVED_PERMANENTLY
	case 303:
		a.ResponseCode = route.RedirectAction_SEE_OTHER
	case 307:
		a.ResponseCode = route.RedirectAction_TEMPORARY_REDIRECT
	case 308:
		a.ResponseCode = route.RedirectAction_PERMANENT_REDIRECT
	default:
		a.ResponseCode = route.RedirectAction_FOUND
	}
	return a
}
