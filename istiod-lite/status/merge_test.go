package status

import (
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

func TestMergeParents(t *testing.T) {
	then := metav1.NewTime(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	now := metav1.NewTime(then.Add(time.Hour))
	svc := gwv1.ParentReference{Kind: ptr.To(gwv1.Kind("Service")), Name: "reviews"}
	other := gwv1.RouteParentStatus{ParentRef: gwv1.ParentReference{Name: "edge"}, ControllerName: "example.com/edge",
		Conditions: []metav1.Condition{{Type: "Accepted", Status: "True", Reason: "Accepted", LastTransitionTime: then}}}
	ours := func(status metav1.ConditionStatus, ltt metav1.Time) gwv1.RouteParentStatus {
		return gwv1.RouteParentStatus{ParentRef: svc, ControllerName: ControllerName,
			Conditions: []metav1.Condition{{Type: "ResolvedRefs", Status: status, Reason: "R", Message: "m", ObservedGeneration: 1, LastTransitionTime: ltt}}}
	}
	want := ours("True", metav1.Time{})

	got, changed := mergeParents([]gwv1.RouteParentStatus{other}, []gwv1.RouteParentStatus{want}, now)
	if !changed || len(got) != 2 || !equality.Semantic.DeepEqual(got[0], other) || !got[1].Conditions[0].LastTransitionTime.Equal(&now) {
		t.Errorf("added: changed %v, %+v", changed, got)
	}
	// Same status: the transition time is kept and nothing changes.
	if _, changed := mergeParents([]gwv1.RouteParentStatus{other, ours("True", then)}, []gwv1.RouteParentStatus{want}, now); changed {
		t.Error("an unchanged status differs")
	}
	// A new status: a new transition time.
	got, changed = mergeParents([]gwv1.RouteParentStatus{ours("False", then), other}, []gwv1.RouteParentStatus{want}, now)
	if !changed || !got[1].Conditions[0].LastTransitionTime.Equal(&now) || !equality.Semantic.DeepEqual(got[0], other) {
		t.Errorf("transition: %+v", got)
	}
	// Nothing wanted: ours goes, theirs stays.
	got, changed = mergeParents([]gwv1.RouteParentStatus{ours("True", then), other}, nil, now)
	if !changed || len(got) != 1 || got[0].ControllerName != other.ControllerName {
		t.Errorf("removal: %+v", got)
	}
	if _, changed := mergeParents(nil, nil, now); changed {
		t.Error("empty differs")
	}
}

func TestMergePolicyConditions(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	theirs := map[string]any{"type": "example.com/Other", "status": "True"}
	want := []metav1.Condition{{Type: model.ConditionZtunnelAccepted, Status: "True", Reason: "Accepted", Message: "attached to ztunnel", ObservedGeneration: 3}}
	got, changed, err := mergePolicyConditions([]any{theirs}, want, now)
	if err != nil || !changed || len(got) != 2 {
		t.Fatalf("added: %v %v %v", got, changed, err)
	}
	m := got[1].(map[string]any)
	// Istio's format: protobuf JSON (int64 as a string).
	if m["type"] != "ZtunnelAccepted" || m["status"] != "True" || m["observedGeneration"] != "3" || m["lastTransitionTime"] != "2026-01-01T00:00:00Z" {
		t.Errorf("condition %v", m)
	}
	later := now.Add(time.Hour)
	if _, changed, _ := mergePolicyConditions(got, want, later); changed {
		t.Error("an unchanged condition differs")
	}
	// The policy became a waypoint's: ZtunnelAccepted goes.
	wp := []metav1.Condition{{Type: model.ConditionWaypointAccepted, Status: "False", Reason: "TargetNotFound", Message: "m", ObservedGeneration: 4}}
	got2, changed, _ := mergePolicyConditions(got, wp, later)
	if !changed || len(got2) != 2 || got2[0].(map[string]any)["type"] != "example.com/Other" || got2[1].(map[string]any)["type"] != "WaypointAccepted" {
		t.Errorf("switch: %v", got2)
	}
}

// TestDesired checks the conditions computed from a translation: a
// selector policy with an L7 rule is not accepted by ztunnel as written,
// a Service bound to a missing waypoint is not bound.
func TestDesired(t *testing.T) {
	o := translate.NewObjects()
	o.Set(&security.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "l7", Generation: 2},
		Spec: security.AuthorizationPolicySpec{Rules: []security.Rule{{To: []security.RuleTo{{Operation: security.Operation{Methods: []string{"GET"}}}}}}}})
	o.Set(&security.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "l4", Generation: 1},
		Spec: security.AuthorizationPolicySpec{Rules: []security.Rule{{From: []security.RuleFrom{{Source: security.Source{Namespaces: []string{"a"}}}}}}}})
	r := translate.Build(o, translate.Options{})
	ws := desired(o, r, translate.Options{})
	l7 := ws[ref{KindAuthorizationPolicy, "shop", "l7"}]
	if l7 == nil || len(l7.Conditions) != 1 {
		t.Fatalf("l7 want %+v", l7)
	}
	if c := l7.Conditions[0]; c.Type != "ZtunnelAccepted" || c.Status != "False" || c.Reason != "UnsupportedValue" || c.ObservedGeneration != 2 {
		t.Errorf("l7 condition %+v", c)
	}
	if c := ws[ref{KindAuthorizationPolicy, "shop", "l4"}].Conditions[0]; c.Type != "ZtunnelAccepted" || c.Status != "True" || c.Reason != "Accepted" {
		t.Errorf("l4 condition %+v", c)
	}

	// Bindings: bound to a waypoint with an address; not ready while its
	// Gateway says Programmed=False; not bound to a missing one.
	wp := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "wp"}, Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint"},
		Status: gwv1.GatewayStatus{Addresses: []gwv1.GatewayStatusAddress{{Value: "10.0.0.9"}}}}
	o.Set(wp)
	for _, s := range []struct{ name, wp string }{{"bound", "wp"}, {"lost", "nowhere"}, {"plain", ""}} {
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: s.name, Generation: 1}, Spec: corev1.ServiceSpec{ClusterIP: "10.1.0.1", Ports: []corev1.ServicePort{{Port: 80}}}}
		if s.wp != "" {
			svc.Labels = map[string]string{"istio.io/use-waypoint": s.wp}
		}
		svc.Spec.ClusterIP = ""
		o.Set(svc)
	}
	bound := func() metav1.Condition {
		t.Helper()
		ws := desired(o, translate.Build(o, translate.Options{}), translate.Options{})
		if w := ws[ref{KindService, "shop", "plain"}]; w == nil || len(w.Conditions) != 0 {
			t.Errorf("unbound service: %+v", w)
		}
		if c := ws[ref{KindService, "shop", "lost"}].Conditions; len(c) != 1 || c[0].Reason != ReasonWaypointNotFound || c[0].Status != "False" {
			t.Errorf("lost: %+v", c)
		}
		c := ws[ref{KindService, "shop", "bound"}].Conditions
		if len(c) != 1 {
			t.Fatalf("bound: %+v", c)
		}
		return c[0]
	}
	if c := bound(); c.Status != "True" || c.Reason != ReasonWaypointAccepted || c.Message != "Successfully attached to waypoint shop/wp" || c.ObservedGeneration != 1 {
		t.Errorf("bound: %+v", c)
	}
	wp = wp.DeepCopy()
	wp.Status.Conditions = []metav1.Condition{{Type: "Programmed", Status: "False", Reason: "Pending"}}
	o.Set(wp)
	if c := bound(); c.Status != "False" || c.Reason != ReasonWaypointNotReady {
		t.Errorf("not programmed: %+v", c)
	}
}
