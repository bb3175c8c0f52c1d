package waypoint

import (
	"fmt"
	"net/http"
	"sort"
	"strings"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
)

// rbacFilter is a compiled envoy.filters.http.rbac: deny reports whether a
// request is denied.
type rbacFilter struct {
	allow    bool // action ALLOW (else DENY)
	policies []rbacPolicy
}

type rbacPolicy struct {
	name string
	// policy is the AuthorizationPolicy the Envoy policy was made from,
	// "<namespace>/<name>" (istiod-lite names Envoy policies
	// ns[<ns>]-policy[<name>]-rule[<i>]; any other name is kept as it is).
	policy      string
	permissions []permission
	principals  []principal
}

// rbacInput is what RBAC looks at.
type rbacInput struct {
	r         *http.Request
	principal string // the peer's SPIFFE URI, "" when unknown
	port      uint32 // destination port
}

type (
	permission func(in *rbacInput) bool
	principal  func(in *rbacInput) bool
)

func compileRBAC(rules *rbacv3.RBAC, path string) (*rbacFilter, error) {
	f := &rbacFilter{}
	switch rules.GetAction() {
	case rbacv3.RBAC_ALLOW:
		f.allow = true
	case rbacv3.RBAC_DENY:
	default:
		return nil, fieldError(path+".action", "%v not supported", rules.GetAction())
	}
	names := make([]string, 0, len(rules.GetPolicies()))
	for n := range rules.GetPolicies() {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		pol := rules.GetPolicies()[n]
		p := fmt.Sprintf("%s.policies[%q]", path, n)
		cp := rbacPolicy{name: n, policy: policyKey(n)}
		for i, perm := range pol.GetPermissions() {
			c, err := compilePermission(perm, fmt.Sprintf("%s.permissions[%d]", p, i))
			if err != nil {
				return nil, err
			}
			cp.permissions = append(cp.permissions, c)
		}
		for i, pr := range pol.GetPrincipals() {
			c, err := compilePrincipal(pr, fmt.Sprintf("%s.principals[%d]", p, i))
			if err != nil {
				return nil, err
			}
			cp.principals = append(cp.principals, c)
		}
		f.policies = append(f.policies, cp)
	}
	return f, nil
}

// matched returns the first policy that in matches, or nil.
func (f *rbacFilter) matched(in *rbacInput) *rbacPolicy {
	for i := range f.policies {
		if p := &f.policies[i]; anyOf(p.permissions, in) && anyOf(p.principals, in) {
			return p
		}
	}
	return nil
}

// denies applies Envoy's semantics: DENY denies on a match, ALLOW denies
// without one.
func (f *rbacFilter) denies(in *rbacInput) bool {
	deny, _ := f.decide(in)
	return deny
}

// decide is denies with the deciding policy ("<namespace>/<name>"): the
// DENY policy that matched, or the ALLOW policy that matched; "" when an
// ALLOW filter denies because none of its policies matched, and when a DENY
// filter lets the request through.
func (f *rbacFilter) decide(in *rbacInput) (deny bool, policy string) {
	if p := f.matched(in); p != nil {
		return !f.allow, p.policy
	}
	return f.allow, ""
}

// policyKey is the AuthorizationPolicy of an Envoy RBAC policy name made by
// istiod-lite (ns[<ns>]-policy[<name>]-rule[<i>]): "<ns>/<name>"; another
// name is returned as it is.
func policyKey(name string) string {
	rest, ok := strings.CutPrefix(name, "ns[")
	if !ok {
		return name
	}
	ns, rest, ok := strings.Cut(rest, "]-policy[")
	if !ok {
		return name
	}
	i := strings.LastIndex(rest, "]-rule[")
	if i < 0 || !strings.HasSuffix(rest, "]") {
		return name
	}
	return ns + "/" + rest[:i]
}

// anyOf and allOf combine compiled permissions or principals (Envoy's
// or_rules/or_ids and and_rules/and_ids; a policy's lists are "any").
func anyOf[P ~func(*rbacInput) bool](ps []P, in *rbacInput) bool {
	for _, p := range ps {
		if p(in) {
			return true
		}
	}
	return false
}

func allOf[P ~func(*rbacInput) bool](ps []P, in *rbacInput) bool {
	for _, p := range ps {
		if !p(in) {
			return false
		}
	}
	return true
}

func compilePermission(p *rbacv3.Permission, path string) (permission, error) {
	switch r := p.GetRule().(type) {
	case *rbacv3.Permission_Any:
		return func(*rbacInput) bool { return true }, nil
	case *rbacv3.Permission_AndRules:
		subs, err := compilePermissions(r.AndRules.GetRules(), path+".and_rules.rules")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return allOf(subs, in) }, nil
	case *rbacv3.Permission_OrRules:
		subs, err := compilePermissions(r.OrRules.GetRules(), path+".or_rules.rules")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return anyOf(subs, in) }, nil
	case *rbacv3.Permission_NotRule:
		sub, err := compilePermission(r.NotRule, path+".not_rule")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return !sub(in) }, nil
	case *rbacv3.Permission_Header:
		hm, err := compileHeaderMatch(r.Header, path+".header")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return in.r != nil && hm.match(in.r) }, nil
	case *rbacv3.Permission_UrlPath:
		sm, err := compileStringMatch(r.UrlPath.GetPath(), path+".url_path.path")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return in.r != nil && sm.match(in.r.URL.Path) }, nil
	case *rbacv3.Permission_DestinationPort:
		port := r.DestinationPort
		return func(in *rbacInput) bool { return in.port == port }, nil
	default:
		return nil, fieldError(path, "permission rule %T not supported", r)
	}
}

func compilePermissions(ps []*rbacv3.Permission, path string) ([]permission, error) {
	out := make([]permission, 0, len(ps))
	for i, p := range ps {
		c, err := compilePermission(p, fmt.Sprintf("%s[%d]", path, i))
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

func compilePrincipal(p *rbacv3.Principal, path string) (principal, error) {
	switch r := p.GetIdentifier().(type) {
	case *rbacv3.Principal_Any:
		return func(*rbacInput) bool { return true }, nil
	case *rbacv3.Principal_AndIds:
		subs, err := compilePrincipals(r.AndIds.GetIds(), path+".and_ids.ids")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return allOf(subs, in) }, nil
	case *rbacv3.Principal_OrIds:
		subs, err := compilePrincipals(r.OrIds.GetIds(), path+".or_ids.ids")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return anyOf(subs, in) }, nil
	case *rbacv3.Principal_NotId:
		sub, err := compilePrincipal(r.NotId, path+".not_id")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return !sub(in) }, nil
	case *rbacv3.Principal_Authenticated_:
		if r.Authenticated.GetPrincipalName() == nil { // Envoy: any authenticated peer
			return func(in *rbacInput) bool { return in.principal != "" }, nil
		}
		sm, err := compileStringMatch(r.Authenticated.GetPrincipalName(), path+".authenticated.principal_name")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return in.principal != "" && sm.match(in.principal) }, nil
	case *rbacv3.Principal_Header:
		hm, err := compileHeaderMatch(r.Header, path+".header")
		if err != nil {
			return nil, err
		}
		return func(in *rbacInput) bool { return in.r != nil && hm.match(in.r) }, nil
	default:
		return nil, fieldError(path, "principal identifier %T not supported", r)
	}
}

func compilePrincipals(ps []*rbacv3.Principal, path string) ([]principal, error) {
	out := make([]principal, 0, len(ps))
	for i, p := range ps {
		c, err := compilePrincipal(p, fmt.Sprintf("%s[%d]", path, i))
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}
