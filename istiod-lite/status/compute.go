package status

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

// Kinds of the objects whose status is written.
const (
	KindHTTPRoute           = "HTTPRoute"
	KindGRPCRoute           = "GRPCRoute"
	KindService             = "Service"
	KindAuthorizationPolicy = "AuthorizationPolicy"
)

// Condition types, reasons and names written (Istio's and Gateway API's).
const (
	// ControllerName is the controllerName of the route parent statuses
	// this writer owns (Istio's, for the istio-waypoint class).
	ControllerName = gwv1.GatewayController("istio.io/mesh-controller")
	// FieldManager is the field manager of every write.
	FieldManager = "istiod-lite"

	// ConditionWaypointBound is Istio's condition on a Service bound to a
	// waypoint with istio.io/use-waypoint.
	ConditionWaypointBound = "istio.io/WaypointBound"
	// ReasonWaypointAccepted is Istio's reason of WaypointBound=True.
	ReasonWaypointAccepted = "WaypointAccepted"
	// ReasonWaypointNotFound: the waypoint Gateway does not exist.
	ReasonWaypointNotFound = "WaypointNotFound"
	// ReasonWaypointNotReady (Istio's WaypointIsNotReady): the waypoint
	// has no address yet, or its Gateway is not Programmed.
	ReasonWaypointNotReady = "WaypointIsNotReady"
	// ReasonUnsupportedTrafficType (Istio's): the waypoint's
	// istio.io/waypoint-for does not take service traffic.
	ReasonUnsupportedTrafficType = "UnsupportedTrafficType"

	// ReasonInvalid is Istio's WaypointAccepted=False reason for a policy
	// with targetRefs none of which a waypoint can enforce.
	ReasonInvalid = "Invalid"
)

// ref names an object whose status is written.
type ref struct {
	Kind, Namespace, Name string
}

func (r ref) String() string { return r.Kind + " " + r.Namespace + "/" + r.Name }

// want is the status this writer wants on one object: only its own part
// (its route parent entries, its condition types). Empty Parents or
// Conditions mean "none of ours" (an entry or condition of ours is
// removed).
type want struct {
	// Generation is the object's metadata.generation the status was
	// computed from (its observedGeneration). Routes and policies are
	// written only while the cache holds that generation.
	Generation int64
	// Labels are a Service's labels the status was computed from (a
	// binding follows its labels, which do not move its generation).
	Labels map[string]string
	// Parents are a route's parent statuses of ControllerName, in
	// spec.parentRefs order, without LastTransitionTime.
	Parents []gwv1.RouteParentStatus
	// Conditions are a Service's or policy's conditions of this writer's
	// types, without LastTransitionTime.
	Conditions []metav1.Condition
}

// maxMessage bounds a condition's message (metav1.Condition allows 32768).
const maxMessage = 4096

// desired computes the status wanted on every route, Service and
// AuthorizationPolicy of o from r, its translation (translate.Build of o:
// a full build, so that r.Problems covers every object).
func desired(o *translate.Objects, r translate.Result, opts translate.Options) map[ref]*want {
	if opts.DomainSuffix == "" {
		opts.DomainSuffix = translate.DefaultDomainSuffix
	}
	problems := map[ref][]translate.Problem{}
	for _, p := range r.Problems {
		k := ref{p.Kind, p.Namespace, p.Name}
		problems[k] = append(problems[k], p)
	}
	out := make(map[ref]*want, len(o.HTTPRoutes)+len(o.GRPCRoutes)+len(o.Services)+len(o.AuthorizationPolicies))
	for k, rt := range o.HTTPRoutes {
		out[ref{KindHTTPRoute, rt.Namespace, rt.Name}] = routeWant(rt.Generation, rt.Spec.ParentRefs, r.Snapshot.HTTPRoutes[k])
	}
	for k, rt := range o.GRPCRoutes {
		out[ref{KindGRPCRoute, rt.Namespace, rt.Name}] = routeWant(rt.Generation, rt.Spec.ParentRefs, r.Snapshot.GRPCRoutes[k])
	}
	for _, svc := range o.Services {
		ms := r.Snapshot.Services[svc.Namespace+"/"+svc.Name+"."+svc.Namespace+".svc."+opts.DomainSuffix]
		w := &want{Generation: svc.Generation, Labels: svc.Labels}
		if c, ok := serviceCondition(o, ms, problems[ref{KindService, svc.Namespace, svc.Name}]); ok {
			c.ObservedGeneration = svc.Generation
			w.Conditions = []metav1.Condition{c}
		}
		out[ref{KindService, svc.Namespace, svc.Name}] = w
	}
	for k, ap := range o.AuthorizationPolicies {
		c := policyCondition(ap, r.Snapshot.WaypointPolicies[k], problems[ref{security.KindAuthorizationPolicy, ap.Namespace, ap.Name}])
		c.ObservedGeneration = ap.Generation
		out[ref{KindAuthorizationPolicy, ap.Namespace, ap.Name}] = &want{Generation: ap.Generation, Conditions: []metav1.Condition{c}}
	}
	return out
}

// routeWant makes a route's parent statuses: one per parentRef translation
// gave conditions for (a Service parent; other parents are not this
// controller's), with the parentRef as written.
func routeWant(gen int64, refs []gwv1.ParentReference, mr *model.HTTPRoute) *want {
	w := &want{Generation: gen}
	if mr == nil {
		return w
	}
	for i, pr := range refs {
		if i >= len(mr.Parents) || len(mr.Parents[i].Conditions) == 0 {
			continue
		}
		if slices.ContainsFunc(w.Parents, func(s gwv1.RouteParentStatus) bool { return reflect.DeepEqual(s.ParentRef, pr) }) {
			continue // a repeated parentRef has one status
		}
		ps := gwv1.RouteParentStatus{ParentRef: pr, ControllerName: ControllerName}
		for _, mc := range mr.Parents[i].Conditions {
			ps.Conditions = append(ps.Conditions, condition(mc, gen))
		}
		w.Parents = append(w.Parents, ps)
	}
	return w
}

// defaultMessages are the messages of conditions translation leaves
// without one (metav1.Condition requires the field; a word helps).
var defaultMessages = map[string]string{
	model.ConditionAccepted:     "Route is accepted",
	model.ConditionResolvedRefs: "All references are resolved",
}

func condition(mc model.Condition, gen int64) metav1.Condition {
	c := metav1.Condition{Type: mc.Type, Status: metav1.ConditionFalse, Reason: mc.Reason, Message: mc.Message, ObservedGeneration: gen}
	if mc.Status {
		c.Status = metav1.ConditionTrue
	}
	if c.Message == "" {
		c.Message = defaultMessages[mc.Type]
	}
	c.Message = truncate(c.Message)
	return c
}

// serviceCondition is a Service's istio.io/WaypointBound condition, and
// false when it has none (no waypoint asked for, or it is a waypoint's own
// Service).
func serviceCondition(o *translate.Objects, ms *model.Service, ps []translate.Problem) (metav1.Condition, bool) {
	c := metav1.Condition{Type: ConditionWaypointBound, Status: metav1.ConditionFalse}
	byReason := func(reason string) string {
		var msgs []string
		for _, p := range ps {
			if p.Reason == reason {
				msgs = append(msgs, p.Message)
			}
		}
		return strings.Join(msgs, "; ")
	}
	switch {
	case ms != nil && ms.Waypoint != nil && ms.Waypoint.Resolved():
		name := translate.Key(ms.Waypoint.Namespace, ms.Waypoint.Name)
		if why := notProgrammed(o.Gateways[name]); why != "" {
			c.Reason, c.Message = ReasonWaypointNotReady, fmt.Sprintf("waypoint %s is not ready (Programmed is False: %s); traffic that needs it fails until it is", name, why)
			break
		}
		c.Status, c.Reason, c.Message = metav1.ConditionTrue, ReasonWaypointAccepted, "Successfully attached to waypoint "+name
	case ms != nil && ms.Waypoint != nil:
		name := translate.Key(ms.Waypoint.Namespace, ms.Waypoint.Name)
		if m := byReason(translate.ReasonWaypointNotFound); m != "" {
			c.Reason, c.Message = ReasonWaypointNotFound, m
		} else if m := byReason(translate.ReasonWaypointNoAddress); m != "" {
			c.Reason, c.Message = ReasonWaypointNotReady, m
		} else {
			c.Reason, c.Message = ReasonWaypointNotReady, fmt.Sprintf("waypoint %s has no address yet; traffic that needs it is dropped", name)
		}
	case byReason(translate.ReasonWaypointWrongScope) != "":
		c.Reason, c.Message = ReasonUnsupportedTrafficType, byReason(translate.ReasonWaypointWrongScope)
	default:
		return c, false
	}
	c.Message = truncate(c.Message)
	return c, true
}

// notProgrammed returns why a waypoint Gateway is not Programmed, or ""
// when it is or says nothing (no deployer: an address is then enough).
func notProgrammed(gw *gwv1.Gateway) string {
	if gw == nil {
		return ""
	}
	for _, c := range gw.Status.Conditions {
		if c.Type == string(gwv1.GatewayConditionProgrammed) && c.Status == metav1.ConditionFalse {
			if c.Reason != "" {
				return c.Reason
			}
			return "no reason given"
		}
	}
	return ""
}

// policyCondition is an AuthorizationPolicy's condition: WaypointAccepted
// for one with targetRefs (translation's, on its WaypointPolicy),
// ZtunnelAccepted for one with a selector or none (from the problems
// translation reported: any makes it False, UnsupportedValue, since what
// ztunnel enforces is then not the policy as written: an ALLOW rule with
// L7 attributes allows nothing, a DENY rule denies without them).
func policyCondition(ap *security.AuthorizationPolicy, wp *model.WaypointPolicy, ps []translate.Problem) metav1.Condition {
	var msgs []string
	for _, p := range ps {
		if !slices.Contains(msgs, p.Message) {
			msgs = append(msgs, p.Message)
		}
	}
	if len(ap.Spec.TargetRefs) > 0 || ap.Spec.TargetRef != nil {
		if wp != nil {
			for _, mc := range wp.Conditions {
				if mc.Type == model.ConditionWaypointAccepted {
					return condition(mc, 0)
				}
			}
		}
		msg := "no waypoint can enforce this policy"
		if len(msgs) > 0 {
			msg += ": " + strings.Join(msgs, "; ")
		}
		return metav1.Condition{Type: model.ConditionWaypointAccepted, Status: metav1.ConditionFalse, Reason: ReasonInvalid, Message: truncate(msg)}
	}
	if len(msgs) > 0 {
		return metav1.Condition{Type: model.ConditionZtunnelAccepted, Status: metav1.ConditionFalse, Reason: model.ReasonUnsupportedValue,
			Message: truncate("ztunnel enforces this policy, not as written: " + strings.Join(msgs, "; "))}
	}
	return metav1.Condition{Type: model.ConditionZtunnelAccepted, Status: metav1.ConditionTrue, Reason: model.ReasonAccepted, Message: "attached to ztunnel"}
}

// policyTypes are the AuthorizationPolicy condition types this writer owns.
var policyTypes = []string{model.ConditionZtunnelAccepted, model.ConditionWaypointAccepted}

func truncate(s string) string {
	if len(s) <= maxMessage {
		return s
	}
	return s[:maxMessage-3] + "..."
}

// serviceLabelsEqual reports whether a Service's labels are those its want
// was computed from.
func serviceLabelsEqual(svc *corev1.Service, w *want) bool {
	return maps.Equal(svc.Labels, w.Labels)
}
