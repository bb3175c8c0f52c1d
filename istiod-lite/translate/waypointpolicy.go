package translate

import (
	"fmt"
	"reflect"
	"strings"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/model"
)

// Reasons of waypoint problems.
const (
	ReasonTargetNotFound = "TargetNotFound"
)

// waypointPolicy translates an AuthorizationPolicy with targetRefs (to a
// waypoint's Gateway or to a Service) into the L7 policy its waypoint
// enforces; nil for a policy with a selector (ztunnel's: see policy) or one
// that is ignored (AUDIT, CUSTOM, no supported target).
//
// It fails closed like policy: an ALLOW rule with an attribute the waypoint
// cannot evaluate (requestPrincipals, ip blocks, a when key other than
// request.headers[...]) or an invalid field is dropped (it allows nothing);
// a DENY rule loses those attributes (it denies more); an unknown action
// denies everything to the targets. Each is reported.
func (t *translator) waypointPolicy(ap *security.AuthorizationPolicy) *model.WaypointPolicy {
	kind := security.KindAuthorizationPolicy
	refs := ap.Spec.TargetRefs
	if ap.Spec.TargetRef != nil {
		refs = append([]security.PolicyTargetReference{*ap.Spec.TargetRef}, refs...)
	}
	if len(refs) == 0 {
		return nil
	}
	report := func(reason, format string, args ...any) {
		t.report(kind, ap.Namespace, ap.Name, reason, format, args...)
	}
	if ap.Spec.Selector != nil {
		report(ReasonInvalidPolicy, "selector and targetRefs are exclusive; the selector is ignored")
	}
	p := &model.WaypointPolicy{Name: ap.Name, Namespace: ap.Namespace}
	var enforcers, missing, notes []string
	defer func() {
		c := model.Condition{Type: model.ConditionWaypointAccepted, Status: true, Reason: model.ReasonAccepted}
		switch {
		case len(enforcers) == 0:
			c.Status, c.Reason, c.Message = false, model.ReasonTargetNotFound, "no target exists yet: "+strings.Join(missing, ", ")
		case len(notes) > 0:
			c.Status, c.Reason, c.Message = false, model.ReasonUnsupportedValue, "enforced by "+strings.Join(enforcers, ", ")+", more restrictive than written: "+strings.Join(notes, "; ")
		default:
			c.Message = "enforced by " + strings.Join(enforcers, ", ")
		}
		p.Conditions = []model.Condition{c}
	}()
	for i, r := range refs {
		switch {
		case r.Namespace != "" && r.Namespace != ap.Namespace:
			report(ReasonInvalidPolicy, "targetRefs[%d]: namespace %s is not the policy's; ignored", i, r.Namespace)
		case r.Kind == "Gateway" && r.Group == "gateway.networking.k8s.io":
			if !t.isWaypoint(ap.Namespace, r.Name) {
				report(ReasonTargetNotFound, "targetRefs[%d]: Gateway %s is not a waypoint (class %s); the policy waits for it", i, Key(ap.Namespace, r.Name), WaypointClass)
				missing = append(missing, "Gateway "+Key(ap.Namespace, r.Name))
			} else {
				enforcers = append(enforcers, "waypoint "+Key(ap.Namespace, r.Name))
			}
			p.Targets = append(p.Targets, model.PolicyTarget{Kind: "Gateway", Name: r.Name})
		case r.Kind == "Service" && (r.Group == "" || r.Group == "core"):
			if t.o.Services[Key(ap.Namespace, r.Name)] == nil {
				report(ReasonTargetNotFound, "targetRefs[%d]: Service %s does not exist; the policy waits for it", i, Key(ap.Namespace, r.Name))
				missing = append(missing, "Service "+Key(ap.Namespace, r.Name))
			} else {
				enforcers = append(enforcers, "the waypoint of Service "+Key(ap.Namespace, r.Name))
			}
			p.Targets = append(p.Targets, model.PolicyTarget{Kind: "Service", Name: r.Name})
		default:
			report(ReasonUnsupported, "targetRefs[%d]: %s/%s is not supported (Gateway or Service); ignored", i, r.Group, r.Kind)
		}
	}
	if len(p.Targets) == 0 {
		return nil
	}
	switch ap.Spec.Action {
	case "", "ALLOW":
		p.Action = model.ActionAllow
	case "DENY":
		p.Action = model.ActionDeny
	case "AUDIT":
		report(ReasonUnsupported, "action AUDIT is not supported; ignored (it never changes a decision)")
		return nil
	case "CUSTOM":
		// An external authorizer ambit cannot call must not turn into
		// "allowed": the requests the policy would have sent to it are
		// denied, as if the authorizer said no.
		report(ReasonUnsupported, "action CUSTOM (external authorization) is not supported: the requests its rules match are denied")
		p.Action = model.ActionDeny
		notes = append(notes, "action CUSTOM is not supported: the requests its rules match are denied")
	default:
		report(ReasonInvalidPolicy, "unknown action %q (actions are ALLOW, DENY, AUDIT, CUSTOM): the policy denies everything to its targets", ap.Spec.Action)
		p.Action = model.ActionDeny
		p.Rules = []model.L7Rule{{}}
		notes = append(notes, fmt.Sprintf("unknown action %q: denies everything", ap.Spec.Action))
		return p
	}
	p.Rules = []model.L7Rule{}
	for i, r := range ap.Spec.Rules {
		rule, unsupported, errs := t.l7Rule(r)
		var why []string
		if len(errs) > 0 {
			why = append(why, strings.Join(errs, "; "))
		}
		if unsupported != "" {
			why = append(why, unsupported+" cannot be evaluated by a waypoint")
		}
		if len(why) > 0 {
			notes = append(notes, fmt.Sprintf("rules[%d] %s", i, strings.Join(why, "; ")))
			if p.Action == model.ActionAllow {
				report(ReasonInvalidPolicy, "rules[%d]: %s: the rule allows nothing", i, strings.Join(why, "; "))
				continue
			}
			report(ReasonInvalidPolicy, "rules[%d]: %s: the rule denies without them", i, strings.Join(why, "; "))
		}
		p.Rules = append(p.Rules, rule)
	}
	return p
}

// l7Rule translates a rule for a waypoint. Fields in error or unsupported
// are left out of the result (which widens it: only a DENY rule may be used
// so).
func (t *translator) l7Rule(r security.Rule) (out model.L7Rule, unsupported string, errs []string) {
	var uns []string
	if r.From != nil && len(r.From) == 0 {
		errs = append(errs, "from is empty")
	}
	for j, f := range r.From {
		s := f.Source
		if reflect.DeepEqual(s, security.Source{}) {
			errs = append(errs, fmt.Sprintf("from[%d].source is empty", j))
		}
		if len(s.RequestPrincipals)+len(s.NotRequestPrincipals) > 0 {
			uns = append(uns, "requestPrincipals")
		}
		if len(s.IPBlocks)+len(s.NotIPBlocks)+len(s.RemoteIPBlocks)+len(s.NotRemoteIPBlocks) > 0 {
			uns = append(uns, "ipBlocks")
		}
		out.From = append(out.From, model.L7Source{
			Principals: t.principals(s.Principals), NotPrincipals: t.principals(s.NotPrincipals),
			Namespaces: s.Namespaces, NotNamespaces: s.NotNamespaces,
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
		ports, err := parsePorts(op.Ports)
		if err != nil {
			errs = append(errs, fmt.Sprintf("to[%d].operation.ports: %v", j, err))
		}
		notPorts, err := parsePorts(op.NotPorts)
		if err != nil {
			errs = append(errs, fmt.Sprintf("to[%d].operation.notPorts: %v", j, err))
		}
		for _, path := range append(append([]string(nil), op.Paths...), op.NotPaths...) {
			if err := checkPolicyPath(path); err != nil {
				errs = append(errs, fmt.Sprintf("to[%d].operation.paths: %v", j, err))
			}
		}
		out.To = append(out.To, model.L7Operation{
			Hosts: op.Hosts, NotHosts: op.NotHosts, Ports: ports, NotPorts: notPorts,
			Methods: op.Methods, NotMethods: op.NotMethods, Paths: op.Paths, NotPaths: op.NotPaths,
		})
	}
	for j, c := range r.When {
		name, ok := strings.CutPrefix(c.Key, "request.headers[")
		if !ok || !strings.HasSuffix(name, "]") || len(name) < 2 {
			uns = append(uns, fmt.Sprintf("when[%d].key %q", j, c.Key))
			continue
		}
		if len(c.Values)+len(c.NotValues) == 0 {
			errs = append(errs, fmt.Sprintf("when[%d] has no values", j))
			continue
		}
		out.When = append(out.When, model.L7Condition{Header: strings.ToLower(strings.TrimSuffix(name, "]")), Values: c.Values, NotValues: c.NotValues})
	}
	return out, strings.Join(uns, ", "), errs
}

// checkPolicyPath checks an Istio policy path: exact, "prefix*", "*suffix",
// "*", or a template whose segments may be {*} (one segment) or, last,
// {**} (the rest).
func checkPolicyPath(p string) error {
	if !strings.Contains(p, "{") {
		if strings.Count(p, "*") > 1 || (strings.Contains(p, "*") && !strings.HasPrefix(p, "*") && !strings.HasSuffix(p, "*")) {
			return fmt.Errorf("%q: * is allowed only as a prefix or suffix", p)
		}
		return nil
	}
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("%q: a template starts with /", p)
	}
	segs := strings.Split(p[1:], "/")
	for i, s := range segs {
		switch {
		case s == "{**}" && i != len(segs)-1:
			return fmt.Errorf("%q: {**} must be the last segment", p)
		case s == "{*}" || s == "{**}":
		case strings.ContainsAny(s, "{}*"):
			return fmt.Errorf("%q: segment %q: {*} and {**} must be whole segments", p, s)
		}
	}
	return nil
}

// waypoints translates the waypoint Gateways.
func (t *translator) waypoints() []*model.Waypoint {
	var out []*model.Waypoint
	for _, k := range sortedKeys(t.o.Gateways) {
		gw := t.o.Gateways[k]
		if string(gw.Spec.GatewayClassName) != WaypointClass {
			continue
		}
		w := &model.Waypoint{Name: gw.Name, Namespace: gw.Namespace, For: gw.Labels[model.LabelWaypointFor], ServiceAccount: gw.Name}
		if w.For == "" {
			w.For = "service"
		}
		w.Address, _ = t.waypointAddress(gw.Namespace, gw.Name)
		out = append(out, w)
	}
	return out
}
