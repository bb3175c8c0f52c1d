package translate

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/model"
)

// TestWorkloadWaypointBypass: ambit.dev/waypoint-bypass=allow on a namespace
// or a pod reaches the workload the ztunnels get; without it (or with the
// pod's "deny" over its namespace's "allow") the default, no bypass, holds.
func TestWorkloadWaypointBypass(t *testing.T) {
	o := NewObjects()
	ns := func(name string, labels map[string]string) *corev1.Namespace {
		labels[model.LabelDataplaneMode] = model.DataplaneAmbient
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	}
	pod := func(ns, name, ip string, labels map[string]string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
			Spec:   corev1.PodSpec{NodeName: "n1"},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip}}
	}
	allow := map[string]string{model.LabelWaypointBypass: model.WaypointBypassAllow}
	o.Set(ns("strict", map[string]string{}))
	o.Set(ns("open", map[string]string{model.LabelWaypointBypass: model.WaypointBypassAllow}))
	o.Set(pod("strict", "default", "10.0.0.1", nil))
	o.Set(pod("strict", "pod-allows", "10.0.0.2", allow))
	o.Set(pod("open", "ns-allows", "10.0.0.3", nil))
	o.Set(pod("open", "pod-denies", "10.0.0.4", map[string]string{model.LabelWaypointBypass: "deny"}))
	snap := Build(o, Options{}).Snapshot
	for _, c := range []struct {
		ns, name string
		want     bool
	}{
		{"strict", "default", false},
		{"strict", "pod-allows", true},
		{"open", "ns-allows", true},
		{"open", "pod-denies", false},
	} {
		w := snap.Workloads[WorkloadUID(Options{}.withDefaults().ClusterID, c.ns, c.name)]
		if w == nil {
			t.Fatalf("no workload %s/%s", c.ns, c.name)
		}
		if w.WaypointBypass != c.want {
			t.Errorf("%s/%s: WaypointBypass %v, want %v", c.ns, c.name, w.WaypointBypass, c.want)
		}
	}
}
