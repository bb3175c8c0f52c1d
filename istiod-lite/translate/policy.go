package translate

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/model"
)

// policy translates an AuthorizationPolicy for ztunnel (L4). nil when it is
// rejected. ztunnel cannot see L7 attributes, so, failing closed as Istio's
// ztunnel does: an ALLOW rule with L7 attributes is dropped (it allows
// nothing), and a DENY rule has its L7 attributes removed (it denies more).
func (t *translator) policy(ap *security.AuthorizationPolicy) *model.Policy {
	kind := security.KindAuthorizationPolicy
	bad := func(format string, args ...any) *model.Policy {
		t.report(kind, ap.Namespace, ap.Name, ReasonInvalidPolicy, format, args...)
		return nil
	}
	if len(ap.Spec.TargetRefs) > 0 || ap.Spec.TargetRef != nil {
		t.report(kind, ap.Namespace, ap.Name, ReasonUnsupported, "targetRefs policies are enforced by waypoints, which do not read policies yet; ignored")
		return nil
	}
	p := &model.Policy{Name: ap.Name, Namespace: ap.Namespace, MeshWide: ap.Namespace == t.opts.RootNamespace}
	switch ap.Spec.Action {
	case "", "ALLOW":
		p.Action = model.ActionAllow
	case "DENY":
		p.Action = model.ActionDeny
	case "AUDIT", "CUSTOM":
		t.report(kind, ap.Namespace, ap.Name, ReasonUnsupported, "action %s is not supported; ignored", ap.Spec.Action)
		return nil
	default:
		return bad("unknown action %q", ap.Spec.Action)
	}
	if ap.Spec.Selector != nil && len(ap.Spec.Selector.MatchLabels) > 0 {
		p.Selector = ap.Spec.Selector.MatchLabels
	}
	p.Rules = []model.Rule{}
	for i, r := range ap.Spec.Rules {
		rule, l7, err := translateRule(r)
		if err != nil {
			return bad("rules[%d]: %v", i, err)
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

func translateRule(r security.Rule) (model.Rule, string, error) {
	var out model.Rule
	var l7 []string
	if len(r.When) > 0 {
		l7 = append(l7, "when")
	}
	for _, f := range r.From {
		s := f.Source
		if len(s.RequestPrincipals)+len(s.NotRequestPrincipals) > 0 {
			l7 = append(l7, "requestPrincipals")
		}
		if len(s.RemoteIPBlocks)+len(s.NotRemoteIPBlocks) > 0 {
			l7 = append(l7, "remoteIpBlocks")
		}
		ips, err := prefixes(s.IPBlocks)
		if err != nil {
			return out, "", fmt.Errorf("ipBlocks: %w", err)
		}
		notIPs, err := prefixes(s.NotIPBlocks)
		if err != nil {
			return out, "", fmt.Errorf("notIpBlocks: %w", err)
		}
		src := model.Source{
			Principals: s.Principals, NotPrincipals: s.NotPrincipals,
			Namespaces: s.Namespaces, NotNamespaces: s.NotNamespaces,
			IPBlocks: ips, NotIPBlocks: notIPs,
		}
		out.From = append(out.From, src)
	}
	for _, to := range r.To {
		op := to.Operation
		if len(op.Hosts)+len(op.NotHosts)+len(op.Methods)+len(op.NotMethods)+len(op.Paths)+len(op.NotPaths) > 0 {
			l7 = append(l7, "hosts/methods/paths")
		}
		ports, err := parsePorts(op.Ports)
		if err != nil {
			return out, "", fmt.Errorf("ports: %w", err)
		}
		notPorts, err := parsePorts(op.NotPorts)
		if err != nil {
			return out, "", fmt.Errorf("notPorts: %w", err)
		}
		out.To = append(out.To, model.Target{Ports: ports, NotPorts: notPorts})
	}
	return out, strings.Join(l7, ", "), nil
}

func prefixes(ss []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range ss {
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("%q is not a CIDR: %w", s, err)
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

// peerAuthn translates a PeerAuthentication.
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
	switch mode {
	case "", "UNSET":
		out.Mode = model.MTLSUnset
	case "STRICT":
		out.Mode = model.MTLSStrict
	case "PERMISSIVE":
		out.Mode = model.MTLSPermissive
	case "DISABLE":
		out.Mode = model.MTLSDisable
	default:
		t.report(kind, pa.Namespace, pa.Name, ReasonInvalidPolicy, "unknown mtls mode %q", mode)
		return nil
	}
	if len(pa.Spec.PortLevelMTLS) > 0 {
		t.report(kind, pa.Namespace, pa.Name, ReasonUnsupported, "portLevelMtls is not supported; the workload-level mode applies to every port")
	}
	return out
}
