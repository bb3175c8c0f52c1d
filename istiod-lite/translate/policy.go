package translate

import (
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/model"
)

// policy translates an AuthorizationPolicy for ztunnel (L4). nil when it is
// ignored (AUDIT) or is a waypoint's (targetRefs: waypointPolicy).
//
// It fails closed, as Istio's ztunnel does for L7 attributes: what ztunnel
// cannot enforce or parse never widens access.
//   - An ALLOW rule with L7 attributes, an unparseable field (a port that is
//     not a number, a bad CIDR) or an empty clause (from: [], source: {},
//     to: [], operation: {}, which Istio's validation rejects) is dropped: it
//     allows nothing. The policy is kept, so it still selects its workloads;
//     with no rule left it allows nothing to them.
//   - A DENY rule has those attributes or fields removed (an empty clause
//     counts as absent): it denies more.
//   - An unknown action (the API is case-sensitive: "deny" is unknown) gives
//     a policy that denies everything to the selected workloads.
//   - CUSTOM (external authorization, which ambit cannot call) is a DENY of
//     what its rules match, as if the authorizer refused.
//
// Each of these is reported as a Problem.
func (t *translator) policy(ap *security.AuthorizationPolicy) *model.Policy {
	kind := security.KindAuthorizationPolicy
	if len(ap.Spec.TargetRefs) > 0 || ap.Spec.TargetRef != nil {
		return nil // enforced by waypoints: see waypointPolicy
	}
	p := &model.Policy{Name: ap.Name, Namespace: ap.Namespace, MeshWide: ap.Namespace == t.opts.RootNamespace}
	if ap.Spec.Selector != nil && len(ap.Spec.Selector.MatchLabels) > 0 {
		p.Selector = ap.Spec.Selector.MatchLabels
	}
	switch ap.Spec.Action {
	case "", "ALLOW":
		p.Action = model.ActionAllow
	case "DENY":
		p.Action = model.ActionDeny
	case "AUDIT":
		t.report(kind, ap.Namespace, ap.Name, ReasonUnsupported, "action AUDIT is not supported; ignored (it never changes a decision)")
		return nil
	case "CUSTOM":
		// ambit cannot call an external authorizer: the connections the
		// policy would have sent to it are denied (never allowed).
		t.report(kind, ap.Namespace, ap.Name, ReasonUnsupported, "action CUSTOM (external authorization) is not supported: the connections its rules match are denied")
		p.Action = model.ActionDeny
	default:
		t.report(kind, ap.Namespace, ap.Name, ReasonInvalidPolicy, "unknown action %q (actions are ALLOW, DENY, AUDIT, CUSTOM): the policy denies everything to the workloads it selects", ap.Spec.Action)
		p.Action = model.ActionDeny
		p.Rules = []model.Rule{{}} // an empty rule matches every connection
		return p
	}
	p.Rules = []model.Rule{}
	for i, r := range ap.Spec.Rules {
		rule, l7, errs := t.translateRule(r)
		if len(errs) > 0 {
			if p.Action == model.ActionAllow {
				t.report(kind, ap.Namespace, ap.Name, ReasonInvalidPolicy, "rules[%d]: %s: the rule allows nothing", i, strings.Join(errs, "; "))
				continue
			}
			t.report(kind, ap.Namespace, ap.Name, ReasonInvalidPolicy, "rules[%d]: %s: the rule denies without the invalid fields", i, strings.Join(errs, "; "))
		}
		if l7 != "" {
			if p.Action == model.ActionAllow {
				t.report(kind, ap.Namespace, ap.Name, ReasonL7RuleIgnored, "rules[%d] uses %s, which ztunnel cannot see: the rule allows nothing (use a waypoint)", i, l7)
				continue
			}
			t.report(kind, ap.Namespace, ap.Name, ReasonL7RuleIgnored, "rules[%d] uses %s, which ztunnel cannot see: the rule denies without it (use a waypoint)", i, l7)
		}
		p.Rules = append(p.Rules, rule)
	}
	return p
}

// translateRule translates a rule. Fields in error are left out of the
// result (which widens it: only a DENY rule may be used so) and described in
// errs; an empty from/to list is left out likewise.
func (t *translator) translateRule(r security.Rule) (out model.Rule, l7 string, errs []string) {
	var l7s []string
	if len(r.When) > 0 {
		l7s = append(l7s, "when")
	}
	if r.From != nil && len(r.From) == 0 {
		errs = append(errs, "from is empty")
	}
	for j, f := range r.From {
		s := f.Source
		if reflect.DeepEqual(s, security.Source{}) {
			errs = append(errs, fmt.Sprintf("from[%d].source is empty", j))
		}
		if len(s.RequestPrincipals)+len(s.NotRequestPrincipals) > 0 {
			l7s = append(l7s, "requestPrincipals")
		}
		if len(s.RemoteIPBlocks)+len(s.NotRemoteIPBlocks) > 0 {
			l7s = append(l7s, "remoteIpBlocks")
		}
		ips, err := prefixes(s.IPBlocks)
		if err != nil {
			errs = append(errs, fmt.Sprintf("from[%d].source.ipBlocks: %v", j, err))
		}
		notIPs, err := prefixes(s.NotIPBlocks)
		if err != nil {
			errs = append(errs, fmt.Sprintf("from[%d].source.notIpBlocks: %v", j, err))
		}
		out.From = append(out.From, model.Source{
			Principals: t.principals(s.Principals), NotPrincipals: t.principals(s.NotPrincipals),
			Namespaces: s.Namespaces, NotNamespaces: s.NotNamespaces,
			IPBlocks: ips, NotIPBlocks: notIPs,
		})
	}
	if r.To != nil && len(r.To) == 0 {
		errs = append(errs, "to is empty")
	}
	for j, to := range r.To {
		op := to.Operation
		if reflect.DeepEqual(op, security.Operation{}) {
			errs = append(errs, fmt.Sprintf("to[%d].operation is empty", j))
		}
		if len(op.Hosts)+len(op.NotHosts)+len(op.Methods)+len(op.NotMethods)+len(op.Paths)+len(op.NotPaths) > 0 {
			l7s = append(l7s, "hosts/methods/paths")
		}
		ports, err := parsePorts(op.Ports)
		if err != nil {
			errs = append(errs, fmt.Sprintf("to[%d].operation.ports: %v", j, err))
		}
		notPorts, err := parsePorts(op.NotPorts)
		if err != nil {
			errs = append(errs, fmt.Sprintf("to[%d].operation.notPorts: %v", j, err))
		}
		out.To = append(out.To, model.Target{Ports: ports, NotPorts: notPorts})
	}
	return out, strings.Join(l7s, ", "), errs
}

// localTrustDomain is the trust domain name that, in a principal, stands for
// the mesh's own trust domain whatever it is (Istio's alias).
const localTrustDomain = "cluster.local"

// principals rewrites principals written in the local trust domain's alias,
// "cluster.local/..." (with or without "spiffe://"), to the mesh's trust
// domain, as Istio does; otherwise they would never match when the trust
// domain is not cluster.local. Other principals are kept as written.
func (t *translator) principals(ss []string) []string {
	td := t.opts.TrustDomain
	if len(ss) == 0 || td == "" || td == localTrustDomain {
		return ss
	}
	out := make([]string, len(ss))
	for i, s := range ss {
		if rest, ok := strings.CutPrefix(strings.TrimPrefix(s, "spiffe://"), localTrustDomain+"/"); ok {
			s = td + "/" + rest
		}
		out[i] = s
	}
	return out
}

func prefixes(ss []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range ss {
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("%q is not a CIDR: %w", s, err)
			}
			// Source addresses are unmapped (IPv4 as IPv4), so an
			// IPv4-mapped prefix (::ffff:10.0.0.0/104) is written as the
			// IPv4 one (10.0.0.0/8). A shorter IPv6 prefix that contains
			// all of ::ffff:0:0/96 stays IPv6 and matches no IPv4 source.
			if p.Addr().Is4In6() && p.Bits() >= 96 {
				p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("%q is not an IP or CIDR", s)
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	return out, nil
}

func parsePorts(ss []string) ([]uint16, error) {
	var out []uint16
	for _, s := range ss {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a port", s)
		}
		out = append(out, uint16(n))
	}
	return out, nil
}

// peerAuthn translates a PeerAuthentication. It fails closed: an unknown
// mode (the API is case-sensitive: "strict" is unknown) is STRICT.
//
// portLevelMtls is coarser than Istio's: the model has one mode per
// workload, so when any port-level mode is STRICT (or unknown) the whole
// workload's mode becomes STRICT, which refuses plaintext on every port, not
// only that one. Port-level modes that relax the workload's (PERMISSIVE,
// DISABLE) are ignored. Both are reported.
func (t *translator) peerAuthn(pa *security.PeerAuthentication) *model.PeerAuthentication {
	kind := security.KindPeerAuthentication
	out := &model.PeerAuthentication{Name: pa.Name, Namespace: pa.Namespace, MeshWide: pa.Namespace == t.opts.RootNamespace}
	if pa.Spec.Selector != nil && len(pa.Spec.Selector.MatchLabels) > 0 {
		out.Selector = pa.Spec.Selector.MatchLabels
	}
	mode := ""
	if pa.Spec.MTLS != nil {
		mode = pa.Spec.MTLS.Mode
	}
	var ok bool
	if out.Mode, ok = mtlsMode(mode); !ok {
		t.report(kind, pa.Namespace, pa.Name, ReasonInvalidPolicy, "unknown mtls mode %q (modes are UNSET, DISABLE, PERMISSIVE, STRICT): STRICT applies", mode)
	}
	if len(pa.Spec.PortLevelMTLS) == 0 {
		return out
	}
	var strict []string
	for _, port := range slices.Sorted(maps.Keys(pa.Spec.PortLevelMTLS)) {
		pm := pa.Spec.PortLevelMTLS[port].Mode
		m, ok := mtlsMode(pm)
		if !ok {
			t.report(kind, pa.Namespace, pa.Name, ReasonInvalidPolicy, "portLevelMtls[%s]: unknown mtls mode %q: STRICT applies", port, pm)
		}
		if m == model.MTLSStrict {
			strict = append(strict, port)
		}
	}
	if len(strict) > 0 && out.Mode != model.MTLSStrict {
		out.Mode = model.MTLSStrict
		t.report(kind, pa.Namespace, pa.Name, ReasonUnsupported, "portLevelMtls is not supported per port: port %s is STRICT, so STRICT applies to every port", strings.Join(strict, ", "))
		return out
	}
	t.report(kind, pa.Namespace, pa.Name, ReasonUnsupported, "portLevelMtls is not supported per port; the workload-level mode applies to every port")
	return out
}

// mtlsMode parses a PeerAuthentication mode; an unknown one is STRICT and
// not ok.
func mtlsMode(s string) (model.PeerAuthnMode, bool) {
	switch s {
	case "", "UNSET":
		return model.MTLSUnset, true
	case "STRICT":
		return model.MTLSStrict, true
	case "PERMISSIVE":
		return model.MTLSPermissive, true
	case "DISABLE":
		return model.MTLSDisable, true
	}
	return model.MTLSStrict, false
}
