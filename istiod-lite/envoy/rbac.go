package envoy

import (
	"fmt"
	"regexp"
	"strings"

	rbac "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/ambit-mesh/ambit/model"
)

type rbacRules struct{ rules *rbac.RBAC }

// makeRBAC returns the RBAC rules of the policies of one action, or nil
// when there are none. Each rule of each policy is one Envoy policy named
// ns[<ns>]-policy[<name>]-rule[<i>]; an ALLOW filter whose policies have no
// rule left denies everything (fail closed), as in Istio.
//
// For a TCP chain (tcp), HTTP attributes cannot be evaluated: an ALLOW rule
// using them (in every to, or in when) matches nothing and is left out; a
// DENY rule loses them (it denies more), as Istio does.
func makeRBAC(action model.Action, ps []*model.WaypointPolicy, tcp bool) *rbacRules {
	if len(ps) == 0 {
		return nil
	}
	out := &rbac.RBAC{Action: rbac.RBAC_ALLOW, Policies: map[string]*rbac.Policy{}}
	if action == model.ActionDeny {
		out.Action = rbac.RBAC_DENY
	}
	for _, p := range ps {
		for i, r := range p.Rules {
			pol := makePolicy(action, r, tcp)
			if pol == nil {
				continue
			}
			out.Policies[fmt.Sprintf("ns[%s]-policy[%s]-rule[%d]", p.Namespace, p.Name, i)] = pol
		}
	}
	return &rbacRules{rules: out}
}

func makePolicy(action model.Action, r model.L7Rule, tcp bool) *rbac.Policy {
	pol := &rbac.Policy{}
	for _, to := range r.To {
		if tcp && len(to.Methods)+len(to.NotMethods)+len(to.Paths)+len(to.NotPaths)+len(to.Hosts)+len(to.NotHosts) > 0 {
			if action == model.ActionAllow {
				continue // never matches a TCP connection
			}
			to = model.L7Operation{Ports: to.Ports, NotPorts: to.NotPorts}
		}
		pol.Permissions = append(pol.Permissions, makePermission(to))
	}
	if len(r.To) > 0 && len(pol.Permissions) == 0 {
		return nil
	}
	if len(pol.Permissions) == 0 {
		pol.Permissions = []*rbac.Permission{anyPermission()}
	}
	var when []*rbac.Principal
	if len(r.When) > 0 && tcp {
		if action == model.ActionAllow {
			return nil
		}
	} else {
		for _, c := range r.When {
			when = append(when, makeCondition(c))
		}
	}
	for _, from := range r.From {
		pol.Principals = append(pol.Principals, andIDs(append(sourceIDs(from), when...)))
	}
	if len(pol.Principals) == 0 {
		if len(when) > 0 {
			pol.Principals = []*rbac.Principal{andIDs(when)}
		} else {
			pol.Principals = []*rbac.Principal{{Identifier: &rbac.Principal_Any{Any: true}}}
		}
	}
	return pol
}

func anyPermission() *rbac.Permission { return &rbac.Permission{Rule: &rbac.Permission_Any{Any: true}} }

func makePermission(op model.L7Operation) *rbac.Permission {
	var and []*rbac.Permission
	add := func(vals []string, not bool, one func(string) *rbac.Permission) {
		if len(vals) == 0 {
			return
		}
		var or []*rbac.Permission
		for _, v := range vals {
			or = append(or, one(v))
		}
		p := orRules(or)
		if not {
			p = &rbac.Permission{Rule: &rbac.Permission_NotRule{NotRule: p}}
		}
		and = append(and, p)
	}
	method := func(m string) *rbac.Permission {
		return &rbac.Permission{Rule: &rbac.Permission_Header{Header: headerMatcher(":method", exact(m))}}
	}
	path := func(p string) *rbac.Permission {
		return &rbac.Permission{Rule: &rbac.Permission_UrlPath{UrlPath: &matcher.PathMatcher{Rule: &matcher.PathMatcher_Path{Path: pathMatcher(p)}}}}
	}
	host := func(h string) *rbac.Permission {
		return &rbac.Permission{Rule: &rbac.Permission_Header{Header: headerMatcher(":authority", hostMatcher(h))}}
	}
	add(op.Hosts, false, host)
	add(op.NotHosts, true, host)
	add(portStrings(op.Ports), false, portPermission)
	add(portStrings(op.NotPorts), true, portPermission)
	add(op.Methods, false, method)
	add(op.NotMethods, true, method)
	add(op.Paths, false, path)
	add(op.NotPaths, true, path)
	switch len(and) {
	case 0:
		return anyPermission()
	case 1:
		return and[0]
	}
	return &rbac.Permission{Rule: &rbac.Permission_AndRules{AndRules: &rbac.Permission_Set{Rules: and}}}
}

func portStrings(ps []uint16) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = fmt.Sprint(p)
	}
	return out
}

func portPermission(s string) *rbac.Permission {
	var p uint32
	fmt.Sscan(s, &p)
	return &rbac.Permission{Rule: &rbac.Permission_DestinationPort{DestinationPort: p}}
}

func orRules(ps []*rbac.Permission) *rbac.Permission {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbac.Permission{Rule: &rbac.Permission_OrRules{OrRules: &rbac.Permission_Set{Rules: ps}}}
}

func sourceIDs(s model.L7Source) []*rbac.Principal {
	var and []*rbac.Principal
	add := func(vals []string, not bool, one func(string) *rbac.Principal) {
		if len(vals) == 0 {
			return
		}
		var or []*rbac.Principal
		for _, v := range vals {
			or = append(or, one(v))
		}
		p := orIDs(or)
		if not {
			p = &rbac.Principal{Identifier: &rbac.Principal_NotId{NotId: p}}
		}
		and = append(and, p)
	}
	principal := func(p string) *rbac.Principal {
		return authenticated(principalMatcher(p))
	}
	namespace := func(ns string) *rbac.Principal {
		return authenticated(safeRegex(`spiffe://[^/]+/ns/` + wildcardRegex(ns, `[^/]*`) + `/sa/[^/]+`))
	}
	add(s.Principals, false, principal)
	add(s.NotPrincipals, true, principal)
	add(s.Namespaces, false, namespace)
	add(s.NotNamespaces, true, namespace)
	return and
}

func authenticated(m *matcher.StringMatcher) *rbac.Principal {
	return &rbac.Principal{Identifier: &rbac.Principal_Authenticated_{Authenticated: &rbac.Principal_Authenticated{PrincipalName: m}}}
}

func makeCondition(c model.L7Condition) *rbac.Principal {
	one := func(v string) *rbac.Principal {
		return &rbac.Principal{Identifier: &rbac.Principal_Header{Header: headerMatcher(c.Header, valueMatcher(v))}}
	}
	var and []*rbac.Principal
	if len(c.Values) > 0 {
		var or []*rbac.Principal
		for _, v := range c.Values {
			or = append(or, one(v))
		}
		and = append(and, orIDs(or))
	}
	if len(c.NotValues) > 0 {
		var or []*rbac.Principal
		for _, v := range c.NotValues {
			or = append(or, one(v))
		}
		and = append(and, &rbac.Principal{Identifier: &rbac.Principal_NotId{NotId: orIDs(or)}})
	}
	return andIDs(and)
}

func orIDs(ps []*rbac.Principal) *rbac.Principal {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbac.Principal{Identifier: &rbac.Principal_OrIds{OrIds: &rbac.Principal_Set{Ids: ps}}}
}

func andIDs(ps []*rbac.Principal) *rbac.Principal {
	switch len(ps) {
	case 0:
		return &rbac.Principal{Identifier: &rbac.Principal_Any{Any: true}}
	case 1:
		return ps[0]
	}
	return &rbac.Principal{Identifier: &rbac.Principal_AndIds{AndIds: &rbac.Principal_Set{Ids: ps}}}
}

func headerMatcher(name string, m *matcher.StringMatcher) *route.HeaderMatcher {
	return &route.HeaderMatcher{Name: name, HeaderMatchSpecifier: &route.HeaderMatcher_StringMatch{StringMatch: m}}
}

func exact(s string) *matcher.StringMatcher {
	return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: s}}
}

func safeRegex(re string) *matcher.StringMatcher {
	return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: re}}}
}

// valueMatcher is Istio's string match: "*" any value (present), "x*"
// prefix, "*x" suffix, else exact.
func valueMatcher(v string) *matcher.StringMatcher {
	switch {
	case v == "*":
		return safeRegex(`.+`)
	case strings.HasSuffix(v, "*"):
		return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: strings.TrimSuffix(v, "*")}}
	case strings.HasPrefix(v, "*"):
		return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Suffix{Suffix: strings.TrimPrefix(v, "*")}}
	}
	return exact(v)
}

// principalMatcher matches a peer's SPIFFE URI against an Istio principal
// (written without "spiffe://").
func principalMatcher(p string) *matcher.StringMatcher {
	p = strings.TrimPrefix(p, "spiffe://")
	switch {
	case p == "*":
		return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://"}}
	case strings.HasSuffix(p, "*"):
		return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: "spiffe://" + strings.TrimSuffix(p, "*")}}
	case strings.HasPrefix(p, "*"):
		return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Suffix{Suffix: strings.TrimPrefix(p, "*")}}
	}
	return exact("spiffe://" + p)
}

// pathMatcher is Istio's path match: exact, "prefix*", "*suffix", "*",
// or a template with {*} (one segment) and {**} (the rest) segments.
func pathMatcher(p string) *matcher.StringMatcher {
	if strings.Contains(p, "{") {
		var b strings.Builder
		for i, seg := range strings.Split(p, "/") {
			if i > 0 {
				b.WriteString("/")
			}
			switch seg {
			case "{*}":
				b.WriteString(`[^/]+`)
			case "{**}":
				b.WriteString(`.+`)
			default:
				b.WriteString(regexp.QuoteMeta(seg))
			}
		}
		return safeRegex(b.String())
	}
	if p == "*" {
		return safeRegex(`.*`)
	}
	return valueMatcher(p)
}

// hostMatcher matches :authority against an Istio host, case-insensitively
// and with or without a port: exact, "*.suffix", "prefix.*" or "*".
func hostMatcher(h string) *matcher.StringMatcher {
	const port = `(:[0-9]+)?`
	switch {
	case h == "*":
		return safeRegex(`.+`)
	case strings.HasPrefix(h, "*"):
		return safeRegex(`(?i).*` + regexp.QuoteMeta(strings.TrimPrefix(h, "*")) + port)
	case strings.HasSuffix(h, "*"):
		return safeRegex(`(?i)` + regexp.QuoteMeta(strings.TrimSuffix(h, "*")) + `.*`)
	}
	return safeRegex(`(?i)` + regexp.QuoteMeta(h) + port)
}

// wildcardRegex turns an Istio value with an optional leading or trailing
// "*" into a regular expression; wild replaces the "*".
func wildcardRegex(v, wild string) string {
	switch {
	case v == "*":
		return wild
	case strings.HasSuffix(v, "*"):
		return regexp.QuoteMeta(strings.TrimSuffix(v, "*")) + wild
	case strings.HasPrefix(v, "*"):
		return wild + regexp.QuoteMeta(strings.TrimPrefix(v, "*"))
	}
	return regexp.QuoteMeta(v)
}
