package translate

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/model"
)

// Routes are translated for waypoints (GAMMA: parentRefs to a Service). A
// route is kept in the model with its status per parent (model.RouteParent
// Conditions) for a status writer; only parents whose Accepted condition is
// True are programmed. Routes fail closed, as Gateway API asks:
//   - a backendRef that cannot be used (not a Service, not found, no such
//     port, in another namespace) stays in the rule, marked invalid, and its
//     share of requests is answered with 500; ResolvedRefs is False;
//   - a rule with a filter ambit does not support, or an invalid value (a
//     prefix rewrite without a prefix match, a bad timeout), answers every
//     request it matches with 500; PartiallyInvalid is True;
//   - an invalid match (a bad regular expression) is dropped, and a rule
//     left with none is dropped (it matches nothing rather than
//     everything); PartiallyInvalid is True.
//
// Each of these is also reported as a Problem (a Warning Event).

// routeRule is the part of an HTTPRoute or GRPCRoute rule that both
// translate alike.
type routeRule struct {
	name     *gwv1.SectionName
	matches  []model.HTTPMatch
	badMatch []string // why matches were dropped
	allBad   bool     // every match was invalid: the rule matches nothing
	filters  []gwv1.HTTPRouteFilter
	backends []routeBackend
	timeouts *gwv1.HTTPRouteTimeouts
	retry    *gwv1.HTTPRouteRetry
	session  bool
}

// addMatch adds a match, or drops an invalid one (it cannot be programmed:
// a proxy would refuse the whole config). A rule whose every match is
// invalid is dropped, not widened to match everything.
func (rr *routeRule) addMatch(m model.HTTPMatch, err error) {
	if err != nil {
		rr.badMatch = append(rr.badMatch, err.Error())
		rr.allBad = len(rr.matches) == 0
		return
	}
	rr.matches = append(rr.matches, m)
	rr.allBad = false
}

type routeBackend struct {
	ref     gwv1.BackendRef
	filters []gwv1.HTTPRouteFilter
}

// route translates an HTTPRoute.
func (t *translator) route(r *gwv1.HTTPRoute) *model.HTTPRoute {
	rules := make([]routeRule, 0, len(r.Spec.Rules))
	for _, rule := range r.Spec.Rules {
		rr := routeRule{name: rule.Name, filters: rule.Filters, timeouts: rule.Timeouts, retry: rule.Retry, session: rule.SessionPersistence != nil}
		for _, m := range rule.Matches {
			hm, err := httpMatch(m)
			rr.addMatch(hm, err)
		}
		for _, b := range rule.BackendRefs {
			rr.backends = append(rr.backends, routeBackend{ref: b.BackendRef, filters: b.Filters})
		}
		rules = append(rules, rr)
	}
	return t.translateRoute(model.KindHTTPRoute, r.ObjectMeta, r.Spec.CommonRouteSpec, r.Spec.Hostnames, rules)
}

// grpcRoute translates a GRPCRoute: method matches become path matches on
// "/<service>/<method>", and the route requires a gRPC content type.
func (t *translator) grpcRoute(r *gwv1.GRPCRoute) *model.HTTPRoute {
	rules := make([]routeRule, 0, len(r.Spec.Rules))
	for _, rule := range r.Spec.Rules {
		rr := routeRule{name: rule.Name, session: rule.SessionPersistence != nil}
		for _, m := range rule.Matches {
			hm, err := grpcMatch(m)
			rr.addMatch(hm, err)
		}
		for _, f := range rule.Filters {
			rr.filters = append(rr.filters, grpcFilter(f))
		}
		for _, b := range rule.BackendRefs {
			rb := routeBackend{ref: b.BackendRef}
			for _, f := range b.Filters {
				rb.filters = append(rb.filters, grpcFilter(f))
			}
			rr.backends = append(rr.backends, rb)
		}
		rules = append(rules, rr)
	}
	return t.translateRoute(model.KindGRPCRoute, r.ObjectMeta, r.Spec.CommonRouteSpec, r.Spec.Hostnames, rules)
}

func grpcFilter(f gwv1.GRPCRouteFilter) gwv1.HTTPRouteFilter {
	return gwv1.HTTPRouteFilter{
		Type:                   gwv1.HTTPRouteFilterType(f.Type),
		RequestHeaderModifier:  f.RequestHeaderModifier,
		ResponseHeaderModifier: f.ResponseHeaderModifier,
		RequestMirror:          f.RequestMirror,
		ExtensionRef:           f.ExtensionRef,
	}
}

func (t *translator) translateRoute(kind string, meta metav1.ObjectMeta, spec gwv1.CommonRouteSpec, hostnames []gwv1.Hostname, rules []routeRule) *model.HTTPRoute {
	out := &model.HTTPRoute{Kind: kind, Name: meta.Name, Namespace: meta.Namespace, Created: meta.CreationTimestamp.UTC()}
	if kind == model.KindHTTPRoute {
		out.Kind = "" // the zero value is an HTTPRoute (older snapshots)
	}
	for _, h := range hostnames {
		out.Hostnames = append(out.Hostnames, string(h))
	}
	report := func(reason, format string, args ...any) {
		t.report(kind, meta.Namespace, meta.Name, reason, format, args...)
	}
	resolved := model.Condition{Type: model.ConditionResolvedRefs, Status: true, Reason: model.ReasonResolvedRefs}
	var partial []string
	out.Rules = []model.HTTPRouteRule{}
	for i, rr := range rules {
		if len(rr.badMatch) > 0 {
			what := "the invalid matches are dropped"
			if rr.allBad {
				what = "the rule is dropped"
			}
			partial = append(partial, fmt.Sprintf("rules[%d]: %s (%s)", i, strings.Join(rr.badMatch, "; "), what))
			report(ReasonInvalidRoute, "rules[%d]: %s: %s", i, strings.Join(rr.badMatch, "; "), what)
			if rr.allBad {
				continue
			}
		}
		mr := t.routeRule(meta.Namespace, rr, func(reason, msg string) {
			if resolved.Status {
				resolved = model.Condition{Type: model.ConditionResolvedRefs, Status: false, Reason: reason, Message: fmt.Sprintf("rules[%d]: %s", i, msg)}
			}
			if strings.HasPrefix(msg, "requestMirror: ") {
				report(reason, "rules[%d]: %s", i, msg)
				return
			}
			report(reason, "rules[%d]: %s: its share of requests is answered with 500", i, msg)
		})
		if mr.Invalid != "" {
			partial = append(partial, fmt.Sprintf("rules[%d]: %s (answered with 500)", i, mr.Invalid))
			report(ReasonInvalidRoute, "rules[%d]: %s: the rule answers 500", i, mr.Invalid)
		}
		if rr.session {
			report(ReasonUnsupported, "rules[%d]: sessionPersistence is not supported; ignored", i)
		}
		out.Rules = append(out.Rules, mr)
	}
	for _, p := range spec.ParentRefs {
		rp := model.RouteParent{Kind: "Gateway", Namespace: meta.Namespace, Name: string(p.Name)}
		if p.Kind != nil {
			rp.Kind = string(*p.Kind)
		}
		if p.Namespace != nil {
			rp.Namespace = string(*p.Namespace)
		}
		if p.Port != nil {
			rp.Port = uint16(*p.Port)
		}
		if rp.Kind == "Service" && (p.Group == nil || *p.Group == "" || *p.Group == "core") {
			accepted := t.routeParentAccepted(meta.Namespace, rp)
			if !accepted.Status {
				report(accepted.Reason, "parentRef Service %s: %s", Key(rp.Namespace, rp.Name), accepted.Message)
			}
			rp.Conditions = []model.Condition{accepted, resolved}
			if len(partial) > 0 && accepted.Status {
				rp.Conditions = append(rp.Conditions, model.Condition{Type: model.ConditionPartiallyInvalid, Status: true, Reason: model.ReasonUnsupportedValue, Message: strings.Join(partial, "; ")})
			}
		}
		// Other parents (Gateways) are not ambit's: no status for them.
		out.Parents = append(out.Parents, rp)
	}
	return out
}

// routeParentAccepted computes the Accepted condition of a Service parent.
func (t *translator) routeParentAccepted(routeNS string, p model.RouteParent) model.Condition {
	no := func(reason, format string, args ...any) model.Condition {
		return model.Condition{Type: model.ConditionAccepted, Status: false, Reason: reason, Message: fmt.Sprintf(format, args...)}
	}
	svc := t.o.Services[Key(p.Namespace, p.Name)]
	if svc == nil {
		return no(model.ReasonNoMatchingParent, "the Service does not exist")
	}
	if p.Namespace != routeNS {
		return no(model.ReasonNotAllowed, "consumer routes (in another namespace than the Service) are not supported; only producer routes are")
	}
	if p.Port != 0 {
		found := false
		for _, sp := range svc.Spec.Ports {
			found = found || sp.Port == int32(p.Port)
		}
		if !found {
			return no(model.ReasonNoMatchingParent, "the Service has no port %d", p.Port)
		}
	}
	return model.Condition{Type: model.ConditionAccepted, Status: true, Reason: model.ReasonAccepted}
}

// routeRule translates one rule. badRef is called for each backendRef
// that cannot be resolved, with a Gateway API ResolvedRefs reason.
func (t *translator) routeRule(ns string, rr routeRule, badRef func(reason, msg string)) model.HTTPRouteRule {
	mr := model.HTTPRouteRule{Matches: rr.matches, Backends: []model.WeightedBackend{}}
	if rr.name != nil {
		mr.Name = string(*rr.name)
	}
	invalid := func(format string, args ...any) {
		if mr.Invalid == "" {
			mr.Invalid = fmt.Sprintf(format, args...)
		}
	}
	if to := rr.timeouts; to != nil {
		var err error
		if mr.Timeout, err = parseDuration(to.Request); err != nil {
			invalid("timeouts.request: %v", err)
		}
		if mr.BackendTimeout, err = parseDuration(to.BackendRequest); err != nil {
			invalid("timeouts.backendRequest: %v", err)
		}
		if mr.Timeout > 0 && mr.BackendTimeout > mr.Timeout {
			invalid("timeouts.backendRequest %s is longer than timeouts.request %s", mr.BackendTimeout, mr.Timeout)
		}
	}
	if r := rr.retry; r != nil {
		mr.Retry = &model.Retry{Attempts: model.DefaultRetry.Attempts}
		if r.Attempts != nil {
			mr.Retry.Attempts = *r.Attempts
		}
		for _, c := range r.Codes {
			mr.Retry.Codes = append(mr.Retry.Codes, int(c))
		}
		var err error
		if mr.Retry.Backoff, err = parseDuration(r.Backoff); err != nil {
			invalid("retry.backoff: %v", err)
		}
		if mr.Retry.Attempts < 0 {
			invalid("retry.attempts %d is negative", mr.Retry.Attempts)
		}
	}
	seen := map[gwv1.HTTPRouteFilterType]bool{}
	for _, f := range rr.filters {
		if seen[f.Type] && f.Type != gwv1.HTTPRouteFilterRequestMirror {
			invalid("filter %s appears twice", f.Type)
		}
		seen[f.Type] = true
		switch f.Type {
		case gwv1.HTTPRouteFilterRequestHeaderModifier:
			mr.RequestHeaders = headerModifier(f.RequestHeaderModifier)
		case gwv1.HTTPRouteFilterResponseHeaderModifier:
			mr.ResponseHeaders = headerModifier(f.ResponseHeaderModifier)
		case gwv1.HTTPRouteFilterRequestRedirect:
			rd, err := redirect(f.RequestRedirect)
			if err != nil {
				invalid("requestRedirect: %v", err)
			}
			mr.Redirect = rd
		case gwv1.HTTPRouteFilterURLRewrite:
			rw, err := rewrite(f.URLRewrite, rr.matches)
			if err != nil {
				invalid("urlRewrite: %v", err)
			}
			mr.Rewrite = rw
		case gwv1.HTTPRouteFilterRequestMirror:
			m := f.RequestMirror
			if m == nil {
				invalid("requestMirror is empty")
				continue
			}
			svc, port, reason, msg := t.backend(ns, m.BackendRef)
			if reason != "" {
				// Gateway API: an unresolved mirror backend is not
				// configured (ResolvedRefs False); the request is served.
				badRef(reason, "requestMirror: "+msg+" (not mirrored)")
				continue
			}
			pct := 100.0
			switch {
			case m.Percent != nil:
				pct = float64(*m.Percent)
			case m.Fraction != nil:
				den := int32(100)
				if m.Fraction.Denominator != nil {
					den = *m.Fraction.Denominator
				}
				if den <= 0 || m.Fraction.Numerator < 0 || m.Fraction.Numerator > den {
					invalid("requestMirror.fraction %d/%d is not a fraction", m.Fraction.Numerator, den)
					continue
				}
				pct = 100 * float64(m.Fraction.Numerator) / float64(den)
			}
			if pct < 0 || pct > 100 {
				invalid("requestMirror.percent %v is out of range", pct)
				continue
			}
			mr.Mirrors = append(mr.Mirrors, model.Mirror{Service: svc, Port: port, Percent: pct})
		default:
			invalid("filter %s is not supported", f.Type)
		}
	}
	if mr.Redirect != nil && mr.Rewrite != nil {
		invalid("requestRedirect and urlRewrite cannot be used together")
	}
	if mr.Redirect != nil && len(rr.backends) > 0 {
		invalid("requestRedirect cannot be used with backendRefs")
	}
	if mr.Redirect != nil && mr.Redirect.PrefixPath != "" && !allPrefix(rr.matches) {
		invalid("requestRedirect.path ReplacePrefixMatch needs PathPrefix matches")
	}
	for _, b := range rr.backends {
		wb := model.WeightedBackend{Weight: 1}
		if b.ref.Weight != nil {
			wb.Weight = *b.ref.Weight
		}
		svc, port, reason, msg := t.backend(ns, b.ref.BackendObjectReference)
		wb.Service, wb.Port = svc, port
		if reason != "" {
			wb.Invalid = reason
			badRef(reason, msg)
		}
		for _, f := range b.filters {
			switch f.Type {
			case gwv1.HTTPRouteFilterRequestHeaderModifier:
				wb.RequestHeaders = headerModifier(f.RequestHeaderModifier)
			case gwv1.HTTPRouteFilterResponseHeaderModifier:
				wb.ResponseHeaders = headerModifier(f.ResponseHeaderModifier)
			default:
				if wb.Invalid == "" {
					wb.Invalid = model.ReasonUnsupportedValue
					badRef(model.ReasonUnsupportedValue, fmt.Sprintf("backendRef %s: filter %s is not supported on a backendRef", b.ref.Name, f.Type))
				}
			}
		}
		mr.Backends = append(mr.Backends, wb)
	}
	return mr
}

// backend resolves a backendRef to a model service key and port; reason
// (a Gateway API ResolvedRefs reason) and msg are set when it cannot be
// used. The key is still returned when it can be named.
func (t *translator) backend(routeNS string, b gwv1.BackendObjectReference) (svc string, port uint16, reason, msg string) {
	ns := routeNS
	if b.Namespace != nil {
		ns = string(*b.Namespace)
	}
	name := string(b.Name)
	svc = ns + "/" + name + "." + ns + ".svc." + t.opts.DomainSuffix
	if b.Port != nil {
		port = uint16(*b.Port)
	}
	if (b.Group != nil && *b.Group != "" && *b.Group != "core") || (b.Kind != nil && *b.Kind != "Service") {
		kind := "Service"
		if b.Kind != nil {
			kind = string(*b.Kind)
		}
		return svc, port, model.ReasonInvalidKind, fmt.Sprintf("backendRef %s is a %s, not a Service", name, kind)
	}
	if ns != routeNS {
		return svc, port, model.ReasonRefNotPermitted, fmt.Sprintf("backendRef %s is in namespace %s (ReferenceGrants are not supported)", name, ns)
	}
	s := t.o.Services[Key(ns, name)]
	if s == nil {
		return svc, port, model.ReasonBackendNotFound, fmt.Sprintf("backend Service %s does not exist", Key(ns, name))
	}
	if b.Port == nil {
		return svc, port, model.ReasonBackendNotFound, fmt.Sprintf("backendRef %s has no port", name)
	}
	for _, sp := range s.Spec.Ports {
		if sp.Port == int32(*b.Port) {
			return svc, port, "", ""
		}
	}
	return svc, port, model.ReasonBackendNotFound, fmt.Sprintf("backend Service %s has no port %d", Key(ns, name), *b.Port)
}

func parseDuration(d *gwv1.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	v, err := time.ParseDuration(string(*d))
	if err != nil {
		return 0, err
	}
	if v < 0 {
		return 0, fmt.Errorf("%s is negative", *d)
	}
	return v, nil
}

func httpMatch(m gwv1.HTTPRouteMatch) (model.HTTPMatch, error) {
	hm := model.HTTPMatch{}
	var err error
	keep := func(e error) {
		if err == nil {
			err = e
		}
	}
	if m.Path != nil {
		hm.PathType = model.PathPrefix
		if m.Path.Type != nil {
			hm.PathType = string(*m.Path.Type)
		}
		hm.Path = "/"
		if m.Path.Value != nil {
			hm.Path = *m.Path.Value
		}
		switch hm.PathType {
		case model.PathExact, model.PathPrefix:
			if !strings.HasPrefix(hm.Path, "/") {
				keep(fmt.Errorf("path %q does not start with /", hm.Path))
			}
		case model.PathRegex:
			keep(checkRegex("path", hm.Path))
		default:
			keep(fmt.Errorf("path match type %s is not supported", hm.PathType))
		}
	}
	if m.Method != nil {
		hm.Method = string(*m.Method)
	}
	for _, h := range m.Headers {
		typ := model.MatchExact
		if h.Type != nil {
			typ = string(*h.Type)
		}
		keep(checkMatch("header "+string(h.Name), typ, h.Value))
		hm.Headers = append(hm.Headers, model.StringMatch{Name: strings.ToLower(string(h.Name)), Type: typ, Value: h.Value})
	}
	for _, q := range m.QueryParams {
		typ := model.MatchExact
		if q.Type != nil {
			typ = string(*q.Type)
		}
		keep(checkMatch("query parameter "+string(q.Name), typ, q.Value))
		hm.QueryParams = append(hm.QueryParams, model.StringMatch{Name: string(q.Name), Type: typ, Value: q.Value})
	}
	return hm, err
}

func grpcMatch(m gwv1.GRPCRouteMatch) (model.HTTPMatch, error) {
	hm := model.HTTPMatch{}
	var err error
	keep := func(e error) {
		if err == nil {
			err = e
		}
	}
	if mm := m.Method; mm != nil && (mm.Service != nil || mm.Method != nil) {
		typ := gwv1.GRPCMethodMatchExact
		if mm.Type != nil {
			typ = *mm.Type
		}
		svc, method := "", ""
		if mm.Service != nil {
			svc = *mm.Service
		}
		if mm.Method != nil {
			method = *mm.Method
		}
		switch typ {
		case gwv1.GRPCMethodMatchExact:
			switch {
			case svc != "" && method != "":
				hm.PathType, hm.Path = model.PathExact, "/"+svc+"/"+method
			case svc != "":
				hm.PathType, hm.Path = model.PathRegex, "/"+regexp.QuoteMeta(svc)+"/[^/]+"
			default:
				hm.PathType, hm.Path = model.PathRegex, "/[^/]+/"+regexp.QuoteMeta(method)
			}
		case gwv1.GRPCMethodMatchRegularExpression:
			if svc == "" {
				svc = "[^/]+"
			}
			if method == "" {
				method = "[^/]+"
			}
			hm.PathType, hm.Path = model.PathRegex, "/"+svc+"/"+method
			keep(checkRegex("method", hm.Path))
		default:
			keep(fmt.Errorf("method match type %s is not supported", typ))
		}
	}
	for _, h := range m.Headers {
		typ := model.MatchExact
		if h.Type != nil {
			typ = string(*h.Type)
		}
		keep(checkMatch("header "+string(h.Name), typ, h.Value))
		hm.Headers = append(hm.Headers, model.StringMatch{Name: strings.ToLower(string(h.Name)), Type: typ, Value: h.Value})
	}
	return hm, err
}

func checkMatch(what, typ, value string) error {
	switch typ {
	case model.MatchExact:
		return nil
	case model.MatchRegex:
		return checkRegex(what, value)
	}
	return fmt.Errorf("%s: match type %s is not supported", what, typ)
}

// checkRegex checks an RE2 expression (Go's regexp is RE2).
func checkRegex(what, re string) error {
	if _, err := regexp.Compile(re); err != nil {
		return fmt.Errorf("%s: %q is not an RE2 expression: %w", what, re, err)
	}
	return nil
}

func headerModifier(f *gwv1.HTTPHeaderFilter) *model.HeaderModifier {
	if f == nil {
		return nil
	}
	m := &model.HeaderModifier{}
	for _, h := range f.Set {
		m.Set = append(m.Set, model.Header{Name: strings.ToLower(string(h.Name)), Value: h.Value})
	}
	for _, h := range f.Add {
		m.Add = append(m.Add, model.Header{Name: strings.ToLower(string(h.Name)), Value: h.Value})
	}
	for _, h := range f.Remove {
		m.Remove = append(m.Remove, strings.ToLower(h))
	}
	return m
}

func redirect(f *gwv1.HTTPRequestRedirectFilter) (*model.Redirect, error) {
	if f == nil {
		return nil, fmt.Errorf("empty")
	}
	r := &model.Redirect{StatusCode: 302}
	if f.Scheme != nil {
		r.Scheme = *f.Scheme
		if r.Scheme != "http" && r.Scheme != "https" {
			return r, fmt.Errorf("scheme %q is not http or https", r.Scheme)
		}
	}
	if f.Hostname != nil {
		r.Hostname = string(*f.Hostname)
	}
	if f.Port != nil {
		r.Port = uint16(*f.Port)
	}
	if f.StatusCode != nil {
		r.StatusCode = *f.StatusCode
	}
	switch r.StatusCode {
	case 301, 302, 303, 307, 308:
	default:
		return r, fmt.Errorf("status code %d is not a redirect code", r.StatusCode)
	}
	if p := f.Path; p != nil {
		switch {
		case p.Type == gwv1.FullPathHTTPPathModifier && p.ReplaceFullPath != nil:
			r.FullPath = *p.ReplaceFullPath
		case p.Type == gwv1.PrefixMatchHTTPPathModifier && p.ReplacePrefixMatch != nil:
			r.PrefixPath = *p.ReplacePrefixMatch
		default:
			return r, fmt.Errorf("path modifier %s has no value", p.Type)
		}
	}
	return r, nil
}

func rewrite(f *gwv1.HTTPURLRewriteFilter, matches []model.HTTPMatch) (*model.Rewrite, error) {
	if f == nil {
		return nil, fmt.Errorf("empty")
	}
	r := &model.Rewrite{}
	if f.Hostname != nil {
		r.Hostname = string(*f.Hostname)
	}
	if p := f.Path; p != nil {
		switch {
		case p.Type == gwv1.FullPathHTTPPathModifier && p.ReplaceFullPath != nil:
			v := *p.ReplaceFullPath
			r.FullPath = &v
		case p.Type == gwv1.PrefixMatchHTTPPathModifier && p.ReplacePrefixMatch != nil:
			v := *p.ReplacePrefixMatch
			r.PrefixPath = &v
			if !allPrefix(matches) {
				return r, fmt.Errorf("path ReplacePrefixMatch needs PathPrefix matches")
			}
		default:
			return r, fmt.Errorf("path modifier %s has no value", p.Type)
		}
	}
	return r, nil
}

// allPrefix reports whether every match is a path prefix match (no
// matches: the implicit prefix "/").
func allPrefix(ms []model.HTTPMatch) bool {
	for _, m := range ms {
		if m.PathType != model.PathPrefix && m.PathType != "" {
			return false
		}
	}
	return true
}
