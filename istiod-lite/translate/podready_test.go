package translate

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestPodReady: a pod is a ready endpoint (for ztunnels, e.g. a waypoint's
// pod behind its Service) only while Running, Ready and not terminating:
// a deleted pod drops out as soon as its deletionTimestamp is set, while
// its process still drains.
func TestPodReady(t *testing.T) {
	ready := []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	notReady := []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse}}
	now := metav1.Now()
	for _, c := range []struct {
		name  string
		phase corev1.PodPhase
		conds []corev1.PodCondition
		del   *metav1.Time
		want  bool
	}{
		{"running and ready", corev1.PodRunning, ready, nil, true},
		{"terminating", corev1.PodRunning, ready, &now, false},
		{"not ready (failing its probe)", corev1.PodRunning, notReady, nil, false},
		{"no condition yet", corev1.PodRunning, nil, nil, false},
		{"pending", corev1.PodPending, ready, nil, false},
	} {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{DeletionTimestamp: c.del}, Status: corev1.PodStatus{Phase: c.phase, Conditions: c.conds}}
		if got := podReady(p); got != c.want {
			t.Errorf("%s: podReady %v, want %v", c.name, got, c.want)
		}
	}
}
