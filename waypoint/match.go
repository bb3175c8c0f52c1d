package waypoint

import (
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// stringMatch is a compiled envoy.type.matcher.v3.StringMatcher.
type stringMatch struct {
	kind  int // matchExact...
	value string
	fold  bool
	re    *regexp.Regexp
}

const (
	matchExact = iota
	matchPrefix
	matchSuffix
	matchContains
	matchRegex
)

func compileRegex(r *matcherv3.RegexMatcher, path string) (*regexp.Regexp, error) {
	// RE2 semantics: Go's regexp is RE2. Envoy's safe_regex must match the
	// whole value.
	re, err := regexp.Compile(`^(?:` + r.GetRegex() + `)$`)
	if err != nil {
		return nil, fieldError(path+".regex", "%v", err)
	}
	return re, nil
}

func compileStringMatch(m *matcherv3.StringMatcher, path string) (*stringMatch, error) {
	sm := &stringMatch{fold: m.GetIgnoreCase()}
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		sm.kind, sm.value = matchExact, p.Exact
	case *matcherv3.StringMatcher_Prefix:
		sm.kind, sm.value = matchPrefix, p.Prefix
	case *matcherv3.StringMatcher_Suffix:
		sm.kind, sm.value = matchSuffix, p.Suffix
	case *matcherv3.StringMatcher_Contains:
		sm.kind, sm.value = matchContains, p.Contains
	case *matcherv3.StringMatcher_SafeRegex:
		re, err := compileRegex(p.SafeRegex, path+".safe_regex")
		if err != nil {
			return nil, err
		}
		sm.kind, sm.re = matchRegex, re
	default:
		return nil, fieldError(path, "no supported match pattern")
	}
	if sm.fold {
		sm.value = strings.ToLower(sm.value)
	}
	return sm, nil
}

func (m *stringMatch) match(s string) bool {
	if m.kind == matchRegex { // ignore_case does not apply to regexes (Envoy)
		return m.re.MatchString(s)
	}
	if m.fold {
		s = strings.ToLower(s)
	}
	switch m.kind {
	case matchExact:
		return s == m.value
	case matchPrefix:
		return strings.HasPrefix(s, m.value)
	case matchSuffix:
		return strings.HasSuffix(s, m.value)
	default:
		return strings.Contains(s, m.value)
	}
}

// headerMatch is a compiled envoy.config.route.v3.HeaderMatcher.
type headerMatch struct {
	name           string // canonical, or a pseudo-header (":method", ...)
	str            *stringMatch
	present        *bool
	invert         bool
	missingAsEmpty bool
}

func compileHeaderMatch(h *routev3.HeaderMatcher, path string) (*headerMatch, error) {
	hm := &headerMatch{name: h.GetName(), invert: h.GetInvertMatch(), missingAsEmpty: h.GetTreatMissingHeaderAsEmpty()}
	if !strings.HasPrefix(hm.name, ":") {
		hm.name = http.CanonicalHeaderKey(hm.name)
	}
	var err error
	switch s := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_StringMatch:
		hm.str, err = compileStringMatch(s.StringMatch, path+".string_match")
	case *routev3.HeaderMatcher_PresentMatch:
		v := s.PresentMatch
		hm.present = &v
	case nil:
		t := true // no specifier: presence (Envoy)
		hm.present = &t
	default:
		return nil, fieldError(path, "header match specifier %T not supported", s)
	}
	return hm, err
}

// headerValue returns the value Envoy matches for name: pseudo-headers from
// the request line, others joined with "," when repeated.
func headerValue(r *http.Request, name string) (string, bool) {
	switch name {
	case ":method":
		return r.Method, true
	case ":authority", "Host":
		return r.Host, true
	case ":path":
		return r.URL.RequestURI(), true
	case ":scheme":
		return "http", true
	}
	vs, ok := r.Header[name]
	if !ok {
		return "", false
	}
	return strings.Join(vs, ","), true
}

func (h *headerMatch) match(r *http.Request) bool {
	v, ok := headerValue(r, h.name)
	if !ok && h.missingAsEmpty {
		v, ok = "", true
	}
	var res bool
	switch {
	case h.present != nil:
		res = ok == *h.present
	case !ok:
		return false // a missing header matches no value matcher, inverted or not (Envoy)
	default:
		res = h.str.match(v)
	}
	return res != h.invert
}

// routeMatch is a compiled envoy.config.route.v3.RouteMatch.
type routeMatch struct {
	kind     int // pathPrefix...
	value    string
	fold     bool
	re       *regexp.Regexp
	headers  []*headerMatch
	queries  []*queryMatch
	grpcOnly bool
}

const (
	pathPrefix = iota
	pathExact
	pathRegex
	pathSeparatedPrefix
)

type queryMatch struct {
	name    string
	str     *stringMatch
	present bool
}

func compileRouteMatch(m *routev3.RouteMatch, path string) (*routeMatch, error) {
	rm := &routeMatch{fold: m.GetCaseSensitive() != nil && !m.GetCaseSensitive().GetValue()}
	switch p := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix:
		rm.kind, rm.value = pathPrefix, p.Prefix
	case *routev3.RouteMatch_Path:
		rm.kind, rm.value = pathExact, p.Path
	case *routev3.RouteMatch_SafeRegex:
		re, err := compileRegex(p.SafeRegex, path+".safe_regex")
		if err != nil {
			return nil, err
		}
		rm.kind, rm.re = pathRegex, re
	case *routev3.RouteMatch_PathSeparatedPrefix:
		rm.kind, rm.value = pathSeparatedPrefix, p.PathSeparatedPrefix
	default:
		return nil, fieldError(path, "path specifier %T not supported", p)
	}
	for i, h := range m.GetHeaders() {
		hm, err := compileHeaderMatch(h, fmt.Sprintf("%s.headers[%d]", path, i))
		if err != nil {
			return nil, err
		}
		rm.headers = append(rm.headers, hm)
	}
	for i, q := range m.GetQueryParameters() {
		p := fmt.Sprintf("%s.query_parameters[%d]", path, i)
		qm := &queryMatch{name: q.GetName()}
		switch s := q.GetQueryParameterMatchSpecifier().(type) {
		case *routev3.QueryParameterMatcher_StringMatch:
			sm, err := compileStringMatch(s.StringMatch, p+".string_match")
			if err != nil {
				return nil, err
			}
			qm.str = sm
		case *routev3.QueryParameterMatcher_PresentMatch:
			qm.present = s.PresentMatch
		default:
			return nil, fieldError(p, "query parameter match specifier missing")
		}
		rm.queries = append(rm.queries, qm)
	}
	rm.grpcOnly = m.GetGrpc() != nil
	return rm, nil
}

// matchPath matches the request's path; rest is what follows a matched
// prefix (for prefix_rewrite).
func (m *routeMatch) match(r *http.Request) bool {
	full := r.URL.RequestURI() // :path, query included
	pathOnly, _, _ := strings.Cut(full, "?")
	switch m.kind {
	case pathPrefix:
		if _, ok := trimPrefixFold(full, m.value, m.fold); !ok {
			return false
		}
	case pathExact:
		if m.fold {
			if !strings.EqualFold(pathOnly, m.value) {
				return false
			}
		} else if pathOnly != m.value {
			return false
		}
	case pathRegex:
		if !m.re.MatchString(pathOnly) {
			return false
		}
	case pathSeparatedPrefix:
		rest, ok := trimPrefixFold(pathOnly, m.value, m.fold)
		if !ok || (rest != "" && rest[0] != '/') {
			return false
		}
	}
	if m.grpcOnly && !isGRPC(r) {
		return false
	}
	for _, h := range m.headers {
		if !h.match(r) {
			return false
		}
	}
	if len(m.queries) > 0 {
		q, _ := url.ParseQuery(r.URL.RawQuery)
		for _, qm := range m.queries {
			vs, ok := q[qm.name]
			switch {
			case qm.str == nil:
				if !ok {
					return false
				}
			case !ok || !qm.str.match(vs[0]):
				return false
			}
		}
	}
	return true
}

func isGRPC(r *http.Request) bool {
	return strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")
}
