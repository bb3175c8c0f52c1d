package leader_test

import (
	"context"
	"errors"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/leader"
)

func holder(t *testing.T, cs kubernetes.Interface, name string) string {
	t.Helper()
	l, err := cs.CoordinationV1().Leases("ambit-system").Get(t.Context(), name, metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

func elector(cs kubernetes.Interface, name, id string, run func(context.Context) error) *leader.Elector {
	return &leader.Elector{Client: cs, Name: name, Identity: id, Run: run,
		LeaseDuration: 3 * time.Second, RenewDeadline: time.Second, RetryPeriod: 100 * time.Millisecond}
}

func TestElector(t *testing.T) {
	c := kube.Start(t, kube.Options{})
	cs := c.Client()
	if _, err := cs.CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ambit-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	t.Run("run stops before the lease is released", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		heldAtStop := make(chan string, 1)
		running := make(chan struct{})
		el := elector(cs, "order", "a", func(runCtx context.Context) error {
			close(running)
			<-runCtx.Done()
			// still ours while Run winds down
			heldAtStop <- holder(t, cs, "order")
			return nil
		})
		done := make(chan error, 1)
		go func() { done <- el.Start(ctx) }()
		select {
		case <-running:
		case <-time.After(20 * time.Second):
			t.Fatal("not elected")
		}
		if !el.Leading() {
			t.Error("Leading() false while running")
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Start: %v", err)
		}
		if h := <-heldAtStop; h != "a" {
			t.Errorf("lease holder while Run stopped: %q, want a", h)
		}
		if h := holder(t, cs, "order"); h != "" {
			t.Errorf("lease holder after Start returned: %q, want released", h)
		}
		if el.Leading() {
			t.Error("Leading() after Start returned")
		}
	})

	t.Run("a failing run ends the term and Start", func(t *testing.T) {
		boom := errors.New("boom")
		el := elector(cs, "fail", "a", func(context.Context) error { return boom })
		if err := el.Start(t.Context()); !errors.Is(err, boom) {
			t.Fatalf("Start: %v, want boom", err)
		}
		if h := holder(t, cs, "fail"); h != "" {
			t.Errorf("lease holder after a failed run: %q, want released", h)
		}
	})

	t.Run("a standby never runs and stops when asked", func(t *testing.T) {
		ctxA, cancelA := context.WithCancel(t.Context())
		defer cancelA()
		aRunning := make(chan struct{})
		a := elector(cs, "standby", "a", func(ctx context.Context) error { close(aRunning); <-ctx.Done(); return nil })
		doneA := make(chan error, 1)
		go func() { doneA <- a.Start(ctxA) }()
		<-aRunning

		ctxB, cancelB := context.WithCancel(t.Context())
		b := elector(cs, "standby", "b", func(context.Context) error {
			t.Error("the standby ran while the leader held the lease")
			return nil
		})
		doneB := make(chan error, 1)
		go func() { doneB <- b.Start(ctxB) }()
		// b campaigns for a few renewals of a's lease: a keeps it.
		deadline := time.Now().Add(2 * time.Second)
		for time.Now().Before(deadline) {
			if h := holder(t, cs, "standby"); h != "a" {
				t.Fatalf("holder %q during a's term", h)
			}
			time.Sleep(100 * time.Millisecond) // sampling the Lease across renewals
		}
		t0 := time.Now()
		cancelB()
		select {
		case err := <-doneB:
			if err != nil {
				t.Errorf("standby Start: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("standby did not stop")
		}
		t.Logf("standby stopped in %v", time.Since(t0).Round(time.Millisecond))
		cancelA()
		if err := <-doneA; err != nil {
			t.Error(err)
		}
	})
}
