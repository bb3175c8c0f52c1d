package deployer

import (
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Listener rules, as Istio's for waypoints: a listener is usable when its
// port is 15008 and its protocol HBONE (Istio checks port and protocol, not
// the name; the conventional name is "mesh").
const (
	MeshPort     = 15008
	StatusPort   = 15021
	MetricsPort  = 15020
	MeshProtocol = gwv1.ProtocolType("HBONE")

	// unexpectedListener is Istio's message for a listener it cannot serve.
	unexpectedListener = `Expected a single listener on port 15008 with protocol "HBONE"`
)

// supportedKinds are the route kinds a waypoint listener accepts.
func supportedKinds() []gwv1.RouteGroupKind {
	g := gwv1.Group(gwv1.GroupName)
	return []gwv1.RouteGroupKind{{Group: &g, Kind: "HTTPRoute"}, {Group: &g, Kind: "GRPCRoute"}}
}

// validListener reports whether l is a waypoint listener.
func validListener(l gwv1.Listener) bool {
	return l.Port == MeshPort && l.Protocol == MeshProtocol
}

// verdict is what a Gateway's spec allows: whether to deploy it, and why not.
type verdict struct {
	deploy  bool
	reason  gwv1.GatewayConditionReason // Accepted's reason
	message string
}

// judge decides from the spec alone whether a waypoint Gateway is accepted.
// Istio accepts a waypoint Gateway whatever its listeners; ambit deploys one
// only with at least one usable listener (Accepted=False, ListenersNotValid,
// otherwise), and keeps it Accepted=True, reason ListenersNotValid, when
// only some listeners are unusable (Gateway API allows either status with
// that reason). Static spec.addresses are not supported (the address is the
// Service's ClusterIP): Accepted=False, UnsupportedAddress.
func judge(gw *gwv1.Gateway) verdict {
	if len(gw.Spec.Addresses) > 0 {
		return verdict{reason: gwv1.GatewayReasonUnsupportedAddress, message: "spec.addresses is not supported for waypoints; the address is the Service's cluster IP"}
	}
	valid, invalid := 0, 0
	for _, l := range gw.Spec.Listeners {
		if validListener(l) {
			valid++
		} else {
			invalid++
		}
	}
	switch {
	case valid == 0:
		return verdict{reason: gwv1.GatewayReasonListenersNotValid, message: "no listener on port 15008 with protocol HBONE"}
	case invalid > 0:
		return verdict{deploy: true, reason: gwv1.GatewayReasonListenersNotValid, message: fmt.Sprintf("%d of %d listeners are not supported and are ignored", invalid, invalid+valid)}
	}
	return verdict{deploy: true, reason: gwv1.GatewayReasonAccepted, message: "Resource accepted"}
}

// observed is what the cluster says about a Gateway's deployed objects.
type observed struct {
	service    *corev1.Service    // nil: absent
	deployment *appsv1.Deployment // nil: absent
	attached   int32              // routes attached to the waypoint
	conflict   string             // an unmanaged namesake blocking the deployment ("": none)
}

// programmed reports whether the waypoint is usable, and why not.
func (o observed) programmed() (bool, string) {
	switch {
	case o.service == nil:
		return false, "waiting for the Service"
	case o.service.Spec.ClusterIP == "" || o.service.Spec.ClusterIP == corev1.ClusterIPNone:
		return false, "waiting for the Service's cluster IP"
	case o.deployment == nil:
		return false, "waiting for the Deployment"
	case o.deployment.Status.ReadyReplicas < 1:
		return false, "waiting for a ready replica of the Deployment"
	}
	return true, ""
}

// gatewayStatus is the status the Gateway should have: a pure function of
// its spec, what was observed, and the previous status (whose condition
// transition times are kept where a condition's status did not change).
func gatewayStatus(gw *gwv1.Gateway, v verdict, o observed, clusterDomain string, now metav1.Time) gwv1.GatewayStatus {
	gen := gw.Generation
	cond := func(t string, ok bool, reason, msg string) metav1.Condition {
		s := metav1.ConditionFalse
		if ok {
			s = metav1.ConditionTrue
		}
		return metav1.Condition{Type: t, Status: s, Reason: reason, Message: msg, ObservedGeneration: gen}
	}

	ready, why := false, "the Gateway is not accepted"
	if v.deploy {
		ready, why = o.programmed()
	}
	progReason := string(gwv1.GatewayReasonPending)
	switch {
	case v.deploy && o.conflict != "":
		ready, progReason = false, string(gwv1.GatewayReasonInvalid)
		why = o.conflict + " exists and is not managed by this Gateway; it is left untouched"
	case !v.deploy:
		progReason = string(gwv1.GatewayReasonInvalid)
	case ready:
		progReason, why = string(gwv1.GatewayReasonProgrammed), "Resource programmed"
	}
	st := gwv1.GatewayStatus{
		Conditions: keepTimes(gw.Status.Conditions, now,
			cond(string(gwv1.GatewayConditionAccepted), v.deploy, string(v.reason), v.message),
			cond(string(gwv1.GatewayConditionProgrammed), ready, progReason, why),
		),
	}
	if ready {
		ipType, hostType := gwv1.IPAddressType, gwv1.HostnameAddressType
		ips := o.service.Spec.ClusterIPs
		if len(ips) == 0 {
			ips = []string{o.service.Spec.ClusterIP}
		}
		for _, ip := range ips {
			st.Addresses = append(st.Addresses, gwv1.GatewayStatusAddress{Type: &ipType, Value: ip})
		}
		st.Addresses = append(st.Addresses, gwv1.GatewayStatusAddress{Type: &hostType,
			Value: fmt.Sprintf("%s.%s.svc.%s", gw.Name, gw.Namespace, clusterDomain)})
	}

	oldListeners := map[gwv1.SectionName][]metav1.Condition{}
	for _, l := range gw.Status.Listeners {
		oldListeners[l.Name] = l.Conditions
	}
	for _, l := range gw.Spec.Listeners {
		ls := gwv1.ListenerStatus{Name: l.Name, SupportedKinds: []gwv1.RouteGroupKind{}}
		var conds []metav1.Condition
		if validListener(l) {
			ls.SupportedKinds = supportedKinds()
			ls.AttachedRoutes = o.attached
			lReason, lMsg := string(gwv1.ListenerReasonProgrammed), "Listener programmed"
			if !ready {
				lReason, lMsg = string(gwv1.ListenerReasonPending), why
			}
			conds = []metav1.Condition{
				cond(string(gwv1.ListenerConditionAccepted), true, string(gwv1.ListenerReasonAccepted), "Listener accepted"),
				cond(string(gwv1.ListenerConditionProgrammed), ready, lReason, lMsg),
				cond(string(gwv1.ListenerConditionResolvedRefs), true, string(gwv1.ListenerReasonResolvedRefs), "No references to resolve"),
			}
		} else {
			conds = []metav1.Condition{
				cond(string(gwv1.ListenerConditionAccepted), false, string(gwv1.ListenerReasonUnsupportedProtocol), unexpectedListener),
				cond(string(gwv1.ListenerConditionProgrammed), false, string(gwv1.ListenerReasonInvalid), unexpectedListener),
				cond(string(gwv1.ListenerConditionResolvedRefs), true, string(gwv1.ListenerReasonResolvedRefs), "No references to resolve"),
			}
		}
		ls.Conditions = keepTimes(oldListeners[l.Name], now, conds...)
		st.Listeners = append(st.Listeners, ls)
	}
	return st
}

// keepTimes sets each condition's LastTransitionTime: the old one when the
// old condition of that type had the same status, else now.
func keepTimes(old []metav1.Condition, now metav1.Time, conds ...metav1.Condition) []metav1.Condition {
	for i := range conds {
		conds[i].LastTransitionTime = now
		for _, o := range old {
			if o.Type == conds[i].Type && o.Status == conds[i].Status {
				conds[i].LastTransitionTime = o.LastTransitionTime
			}
		}
	}
	return conds
}

// statusEqual reports whether writing want over have would change nothing.
func statusEqual(have, want gwv1.GatewayStatus) bool {
	return equality.Semantic.DeepEqual(have, want)
}
