package deployer

import (
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

var (
	mesh  = gwv1.Listener{Name: "mesh", Port: 15008, Protocol: "HBONE"}
	httpL = gwv1.Listener{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType}
)

func gateway(listeners ...gwv1.Listener) *gwv1.Gateway {
	return &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "wp", Generation: 3},
		Spec:       gwv1.GatewaySpec{GatewayClassName: WaypointClass, Listeners: listeners},
	}
}

func TestJudge(t *testing.T) {
	withAddr := gateway(mesh)
	withAddr.Spec.Addresses = []gwv1.GatewaySpecAddress{{Value: "10.0.0.1"}}
	for _, c := range []struct {
		name   string
		gw     *gwv1.Gateway
		deploy bool
		reason gwv1.GatewayConditionReason
	}{
		{"mesh", gateway(mesh), true, gwv1.GatewayReasonAccepted},
		{"mesh named otherwise", gateway(gwv1.Listener{Name: "hbone", Port: 15008, Protocol: "HBONE"}), true, gwv1.GatewayReasonAccepted},
		{"mesh and http", gateway(mesh, httpL), true, gwv1.GatewayReasonListenersNotValid},
		{"http only", gateway(httpL), false, gwv1.GatewayReasonListenersNotValid},
		{"HBONE on another port", gateway(gwv1.Listener{Name: "mesh", Port: 15009, Protocol: "HBONE"}), false, gwv1.GatewayReasonListenersNotValid},
		{"TCP on 15008", gateway(gwv1.Listener{Name: "mesh", Port: 15008, Protocol: gwv1.TCPProtocolType}), false, gwv1.GatewayReasonListenersNotValid},
		{"no listeners", gateway(), false, gwv1.GatewayReasonListenersNotValid},
		{"static address", withAddr, false, gwv1.GatewayReasonUnsupportedAddress},
	} {
		v := judge(c.gw)
		if v.deploy != c.deploy || v.reason != c.reason {
			t.Errorf("%s: deploy %v reason %s, want %v %s", c.name, v.deploy, v.reason, c.deploy, c.reason)
		}
	}
}

func ready(ip string, replicas int32) observed {
	return observed{
		service:    &corev1.Service{Spec: corev1.ServiceSpec{ClusterIP: ip, ClusterIPs: []string{ip}}},
		deployment: &appsv1.Deployment{Status: appsv1.DeploymentStatus{ReadyReplicas: replicas}},
		attached:   4,
	}
}

// summary renders a status compactly: conditions, listeners, addresses.
func summary(st gwv1.GatewayStatus) string {
	var b strings.Builder
	for _, c := range st.Conditions {
		b.WriteString(c.Type + "=" + string(c.Status) + "/" + c.Reason + " ")
	}
	for _, l := range st.Listeners {
		b.WriteString("[" + string(l.Name))
		for _, c := range l.Conditions {
			b.WriteString(" " + c.Type + "=" + string(c.Status) + "/" + c.Reason)
		}
		b.WriteString(" routes=" + string(rune('0'+l.AttachedRoutes)) + " kinds=" + string(rune('0'+len(l.SupportedKinds))) + "] ")
	}
	for _, a := range st.Addresses {
		b.WriteString(string(*a.Type) + ":" + a.Value + " ")
	}
	return strings.TrimSpace(b.String())
}

func TestGatewayStatus(t *testing.T) {
	now := metav1.NewTime(time.Date(2026, 11, 28, 10, 0, 0, 0, time.UTC))
	for _, c := range []struct {
		name string
		gw   *gwv1.Gateway
		o    observed
		want string
	}{
		{"nothing deployed yet", gateway(mesh), observed{attached: 1},
			"Accepted=True/Accepted Programmed=False/Pending [mesh Accepted=True/Accepted Programmed=False/Pending ResolvedRefs=True/ResolvedRefs routes=1 kinds=2]"},
		{"no cluster IP", gateway(mesh), ready("", 1),
			"Accepted=True/Accepted Programmed=False/Pending [mesh Accepted=True/Accepted Programmed=False/Pending ResolvedRefs=True/ResolvedRefs routes=4 kinds=2]"},
		{"no ready replica", gateway(mesh), ready("10.96.0.9", 0),
			"Accepted=True/Accepted Programmed=False/Pending [mesh Accepted=True/Accepted Programmed=False/Pending ResolvedRefs=True/ResolvedRefs routes=4 kinds=2]"},
		{"ready", gateway(mesh), ready("10.96.0.9", 1),
			"Accepted=True/Accepted Programmed=True/Programmed [mesh Accepted=True/Accepted Programmed=True/Programmed ResolvedRefs=True/ResolvedRefs routes=4 kinds=2] IPAddress:10.96.0.9 Hostname:wp.shop.svc.cluster.local"},
		{"ready, one bad listener", gateway(mesh, httpL), ready("10.96.0.9", 1),
			"Accepted=True/ListenersNotValid Programmed=True/Programmed [mesh Accepted=True/Accepted Programmed=True/Programmed ResolvedRefs=True/ResolvedRefs routes=4 kinds=2] [http Accepted=False/UnsupportedProtocol Programmed=False/Invalid ResolvedRefs=True/ResolvedRefs routes=0 kinds=0] IPAddress:10.96.0.9 Hostname:wp.shop.svc.cluster.local"},
		{"only a bad listener", gateway(httpL), observed{},
			"Accepted=False/ListenersNotValid Programmed=False/Invalid [http Accepted=False/UnsupportedProtocol Programmed=False/Invalid ResolvedRefs=True/ResolvedRefs routes=0 kinds=0]"},
	} {
		st := gatewayStatus(c.gw, judge(c.gw), c.o, "cluster.local", now)
		if got := summary(st); got != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.name, got, c.want)
		}
		for _, cond := range st.Conditions {
			if cond.ObservedGeneration != 3 {
				t.Errorf("%s: %s observedGeneration %d", c.name, cond.Type, cond.ObservedGeneration)
			}
		}
	}
}

// A recomputed status equals the written one (no write), and transition
// times move only with a condition's status.
func TestGatewayStatusStable(t *testing.T) {
	t0 := metav1.NewTime(time.Date(2026, 11, 28, 10, 0, 0, 0, time.UTC))
	t1 := metav1.NewTime(t0.Add(time.Minute))
	gw := gateway(mesh)
	gw.Status = gatewayStatus(gw, judge(gw), ready("10.96.0.9", 0), "cluster.local", t0)

	again := gatewayStatus(gw, judge(gw), ready("10.96.0.9", 0), "cluster.local", t1)
	if !statusEqual(gw.Status, again) {
		t.Errorf("recomputed status differs:\n%+v\n%+v", gw.Status, again)
	}

	gw.Status = gatewayStatus(gw, judge(gw), ready("10.96.0.9", 1), "cluster.local", t1)
	for _, c := range gw.Status.Conditions {
		want := t0
		if c.Type == string(gwv1.GatewayConditionProgrammed) {
			want = t1
		}
		if !c.LastTransitionTime.Equal(&want) {
			t.Errorf("%s lastTransitionTime %v, want %v", c.Type, c.LastTransitionTime, want)
		}
	}
	// A different attached-route count is a change.
	o := ready("10.96.0.9", 1)
	o.attached = 5
	if statusEqual(gw.Status, gatewayStatus(gw, judge(gw), o, "cluster.local", t1)) {
		t.Error("a new attachedRoutes count compares equal")
	}
}

func TestObjectsLabels(t *testing.T) {
	gw := gateway(mesh)
	gw.UID = "u-1"
	gw.Spec.Infrastructure = &gwv1.GatewayInfrastructure{
		Labels:      map[gwv1.LabelKey]gwv1.LabelValue{"team": "shop", GatewayNameLabel: "spoof"},
		Annotations: map[gwv1.AnnotationKey]gwv1.AnnotationValue{"note": "x"},
	}
	cfg := New(Config{}).cfg
	d := objects{cfg: &cfg, gw: gw}.deployment()
	if d.Labels["team"] != "shop" || d.Labels[GatewayNameLabel] != "wp" || d.Labels[ManagedLabel] != ManagedValue {
		t.Errorf("labels %v", d.Labels)
	}
	pl := d.Spec.Template.Labels
	if pl[DataplaneModeKey] != "none" || pl[GatewayNameLabel] != "wp" || pl["team"] != "shop" {
		t.Errorf("pod labels %v", pl)
	}
	if d.Annotations["note"] != "x" || d.Spec.Template.Annotations["note"] != "x" {
		t.Errorf("annotations %v %v", d.Annotations, d.Spec.Template.Annotations)
	}
	if len(d.OwnerReferences) != 1 || *d.OwnerReferences[0].UID != "u-1" || !*d.OwnerReferences[0].Controller {
		t.Errorf("owner %+v", d.OwnerReferences)
	}
	if sel := d.Spec.Selector.MatchLabels; len(sel) != 1 || sel[GatewayNameLabel] != "wp" {
		t.Errorf("selector %v", sel)
	}
	if *d.Spec.Template.Spec.Containers[0].Image != DefaultImage {
		t.Errorf("image %s", *d.Spec.Template.Spec.Containers[0].Image)
	}
	if d.Spec.Replicas != nil {
		t.Error("replicas set: it belongs to the user or an autoscaler")
	}
}
