package authz

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/model"
)

// DefaultRootNamespace is the root namespace: policies there apply
// mesh-wide. It is istiod-lite's default too (Istio's is istio-system), so
// that a policy is mesh-wide for the proxies exactly when the control plane
// flags it so.
const DefaultRootNamespace = "ambit-system"

// Conn is what L4 policy sees of a connection.
type Conn struct {
	// SrcIdentity is the peer's verified SPIFFE ID; zero for plaintext.
	SrcIdentity spiffeid.ID
	// SrcIP is the client's address (for HBONE: the forwarded-for address).
	SrcIP netip.Addr
	// DstPort is the destination (target) port on the workload.
	DstPort uint16
}

// Decision is the outcome of an evaluation.
type Decision struct {
	Allow bool
	// Policy is the key ("<namespace>/<name>") of the deciding policy, if any.
	Policy string
	// Reason explains the decision in a few words, for logs.
	Reason string
}

// Evaluator evaluates policies. The zero value is ready to use and treats
// DefaultRootNamespace as the root namespace.
type Evaluator struct {
	// RootNamespace holds mesh-wide policies (DefaultRootNamespace if empty).
	// Policies flagged MeshWide are mesh-wide wherever they live.
	RootNamespace string
}

// Evaluate is Evaluator{}.Evaluate.
func Evaluate(snap *model.Snapshot, dst *model.Workload, c Conn) Decision {
	return Evaluator{}.Evaluate(snap, dst, c)
}

func (e Evaluator) root() string {
	if e.RootNamespace != "" {
		return e.RootNamespace
	}
	return DefaultRootNamespace
}

// Evaluate decides whether c may reach dst under the AuthorizationPolicies in
// snap. A nil dst is denied.
func (e Evaluator) Evaluate(snap *model.Snapshot, dst *model.Workload, c Conn) Decision {
	if dst == nil {
		return Decision{Reason: "unknown destination workload"}
	}
	sc := indexOf(snap).pol.scope(dst.Namespace, e.root())
	var buf [8]*indexedPolicy
	allows := buf[:0]
	p := newPeer(c)
	for {
		it, ok := sc.next()
		if !ok {
			break
		}
		ip := it.v
		if !e.selects(ip.Namespace, ip.MeshWide, ip.Selector, dst) {
			continue
		}
		switch ip.Action {
		case model.ActionDeny:
			if matchPolicy(ip.Policy, &p) {
				return Decision{Policy: ip.key, Reason: ip.denyReason}
			}
		case model.ActionAllow, "":
			allows = append(allows, ip)
		}
	}
	if len(allows) == 0 {
		return Decision{Allow: true, Reason: "no allow policy selects the workload"}
	}
	for _, ip := range allows {
		if matchPolicy(ip.Policy, &p) {
			return Decision{Allow: true, Policy: ip.key, Reason: ip.allowReason}
		}
	}
	return Decision{Reason: "no allow policy matched"}
}

// peer is a connection with its identity's parts matched by policies,
// computed once per evaluation.
type peer struct {
	Conn
	hasID     bool
	principal string // the identity without "spiffe://"
	ns        string // the identity's namespace; empty if it is not a workload's
	ip        netip.Addr
}

func newPeer(c Conn) peer {
	p := peer{Conn: c, ip: c.SrcIP.Unmap(), hasID: !c.SrcIdentity.IsZero()}
	if p.hasID {
		p.principal = strings.TrimPrefix(c.SrcIdentity.String(), "spiffe://")
		p.ns = workloadNamespace(c.SrcIdentity.Path())
	}
	return p
}

// workloadNamespace is the namespace of a workload identity's path
// (/ns/<namespace>/sa/<service account>, as identity.ParseWorkload), else "".
func workloadNamespace(path string) string {
	rest, ok := strings.CutPrefix(path, "/ns/")
	if !ok {
		return ""
	}
	ns, sa, ok := strings.Cut(rest, "/sa/")
	if !ok || ns == "" || sa == "" || strings.Contains(ns, "/") || strings.Contains(sa, "/") {
		return ""
	}
	return ns
}

// selects reports whether a resource in namespace ns (mesh-wide or not) with
// selector sel applies to w.
func (e Evaluator) selects(ns string, meshWide bool, sel map[string]string, w *model.Workload) bool {
	if !meshWide && ns != e.root() && ns != w.Namespace {
		return false
	}
	for k, v := range sel {
		if got, ok := w.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

func matchPolicy(p *model.Policy, c *peer) bool {
	// A policy without rules: ALLOW with no rules allows nothing, DENY with
	// no rules denies nothing (Istio's semantics for an empty rules list).
	for i := range p.Rules {
		if matchRule(&p.Rules[i], c) {
			return true
		}
	}
	return false
}

func matchRule(r *model.Rule, c *peer) bool {
	if len(r.From) > 0 && !slices.ContainsFunc(r.From, func(s model.Source) bool { return matchSource(&s, c) }) {
		return false
	}
	if len(r.To) > 0 && !slices.ContainsFunc(r.To, func(t model.Target) bool { return matchTarget(&t, c.DstPort) }) {
		return false
	}
	return true
}

func matchSource(s *model.Source, c *peer) bool {
	principal, ns, hasID := c.principal, c.ns, c.hasID
	if len(s.Principals) > 0 && (!hasID || !matchAny(s.Principals, principal, trimScheme)) {
		return false
	}
	if len(s.NotPrincipals) > 0 && hasID && matchAny(s.NotPrincipals, principal, trimScheme) {
		return false
	}
	if len(s.Namespaces) > 0 && (ns == "" || !matchAny(s.Namespaces, ns, nil)) {
		return false
	}
	if len(s.NotNamespaces) > 0 && ns != "" && matchAny(s.NotNamespaces, ns, nil) {
		return false
	}
	ip := c.ip
	if len(s.IPBlocks) > 0 && !slices.ContainsFunc(s.IPBlocks, func(p netip.Prefix) bool { return p.Contains(ip) }) {
		return false
	}
	if len(s.NotIPBlocks) > 0 && slices.ContainsFunc(s.NotIPBlocks, func(p netip.Prefix) bool { return p.Contains(ip) }) {
		return false
	}
	return true
}

func matchTarget(t *model.Target, port uint16) bool {
	if len(t.Ports) > 0 && !slices.Contains(t.Ports, port) {
		return false
	}
	if len(t.NotPorts) > 0 && slices.Contains(t.NotPorts, port) {
		return false
	}
	return true
}

func trimScheme(s string) string { return strings.TrimPrefix(s, "spiffe://") }

// matchAny reports whether v matches one of the patterns: exact, "*", a
// prefix match ("abc*") or a suffix match ("*abc"). norm, if set, normalizes
// each pattern first.
func matchAny(patterns []string, v string, norm func(string) string) bool {
	for _, p := range patterns {
		if norm != nil {
			p = norm(p)
		}
		if MatchString(p, v) {
			return true
		}
	}
	return false
}

// MatchString matches v against an Istio string pattern: exact, "*" (any
// non-empty value), "prefix*" or "*suffix".
func MatchString(pattern, v string) bool {
	switch {
	case pattern == "*":
		return v != ""
	case strings.HasSuffix(pattern, "*"):
		return strings.HasPrefix(v, strings.TrimSuffix(pattern, "*"))
	case strings.HasPrefix(pattern, "*"):
		return strings.HasSuffix(v, strings.TrimPrefix(pattern, "*"))
	default:
		return pattern == v
	}
}

var zeroID spiffeid.ID
