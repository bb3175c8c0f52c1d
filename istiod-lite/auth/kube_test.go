package auth_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
)

// Caller kinds from pod-bound tokens on a real API server: a ztunnel is a
// node proxy; a pod labelled with its Gateway's name and running as the
// service account of that name is the waypoint; the label under another
// service account, or the account without the label, is a workload.
func TestKubeCallerKinds(t *testing.T) {
	cluster := kube.Start(t, kube.Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cs := cluster.Client()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, ns := range []string{"ambit-system", "shop"} {
		_, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
		must(err)
	}
	for _, sa := range [][2]string{{"ambit-system", "ztunnel"}, {"shop", "wp"}, {"shop", "cart"}} {
		_, err := cs.CoreV1().ServiceAccounts(sa[0]).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: sa[0], Name: sa[1]}}, metav1.CreateOptions{})
		must(err)
	}
	pod := func(ns, name, sa, gateway string) {
		t.Helper()
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec:       corev1.PodSpec{ServiceAccountName: sa, NodeName: "node-1", Containers: []corev1.Container{{Name: "c", Image: "c"}}},
		}
		if gateway != "" {
			p.Labels = map[string]string{auth.LabelGatewayName: gateway}
		}
		_, err := cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
		must(err)
	}
	pod("ambit-system", "ztunnel-1", "ztunnel", "")
	pod("shop", "wp-0", "wp", "wp")
	pod("shop", "cart-0", "cart", "wp")   // the label, another account
	pod("shop", "wp-nolabel", "wp", "")   // the account, no label
	pod("shop", "wp-other", "wp", "cart") // the account, another Gateway

	a := &auth.KubeAuthenticator{Client: cs}
	caller := func(ns, sa, pod string) *auth.Caller {
		t.Helper()
		tok, err := cluster.ServiceAccountToken(ctx, ns, sa, []string{auth.DefaultAudience}, pod)
		must(err)
		c, err := a.Authenticate(ctx, tok)
		must(err)
		return c
	}
	if c := caller("ambit-system", "ztunnel", "ztunnel-1"); c.Kind != auth.NodeProxy || c.Node != "node-1" || !c.Identity.IsZero() {
		t.Errorf("ztunnel: %+v", c)
	}
	c := caller("shop", "wp", "wp-0")
	if c.Kind != auth.Waypoint || c.Waypoint != (auth.WaypointRef{Namespace: "shop", Name: "wp"}) ||
		c.Identity.String() != "spiffe://cluster.local/ns/shop/sa/wp" || c.Node != "node-1" || c.Name != "pod shop/wp-0" {
		t.Errorf("waypoint: %+v", c)
	}
	for _, p := range [][3]string{{"shop", "cart", "cart-0"}, {"shop", "wp", "wp-nolabel"}, {"shop", "wp", "wp-other"}} {
		if c := caller(p[0], p[1], p[2]); c.Kind != auth.Workload || c.Waypoint != (auth.WaypointRef{}) || c.Identity.IsZero() {
			t.Errorf("%s: %+v", p[2], c)
		}
	}
	// Still refused: a token for another audience, and one not bound to a pod.
	for _, tc := range []struct {
		aud []string
		pod string
	}{{[]string{"other"}, "wp-0"}, {[]string{auth.DefaultAudience}, ""}} {
		tok, err := cluster.ServiceAccountToken(ctx, "shop", "wp", tc.aud, tc.pod)
		must(err)
		if _, err := a.Authenticate(ctx, tok); !errors.Is(err, auth.ErrUnauthenticated) {
			t.Errorf("audience %v, pod %q: %v", tc.aud, tc.pod, err)
		}
	}

	// Cached over the real TokenReview: many calls with a pod-bound token
	// cost one review, many with a garbage token one; once the bound pod is
	// gone and the cached answer has aged out, the token is refused.
	reviews := &countingAuthenticator{a: a}
	cache := &auth.Cache{Authenticator: reviews, MaxAge: time.Hour}
	tok, err := cluster.ServiceAccountToken(ctx, "ambit-system", "ztunnel", []string{auth.DefaultAudience}, "ztunnel-1")
	must(err)
	for range 20 {
		if c, err := cache.Authenticate(ctx, tok); err != nil || c.Kind != auth.NodeProxy {
			t.Fatalf("cached ztunnel: %+v %v", c, err)
		}
		if _, err := cache.Authenticate(ctx, "garbage"); !errors.Is(err, auth.ErrUnauthenticated) {
			t.Fatalf("cached garbage: %v", err)
		}
	}
	if n := reviews.n.Load(); n != 2 {
		t.Fatalf("40 calls with 2 tokens: %d reviews, want 2", n)
	}
	zero := int64(0)
	must(cs.CoreV1().Pods("ambit-system").Delete(ctx, "ztunnel-1", metav1.DeleteOptions{GracePeriodSeconds: &zero}))
	if _, err := (&auth.Cache{Authenticator: a}).Authenticate(ctx, tok); !errors.Is(err, auth.ErrUnauthenticated) {
		t.Fatalf("the token of a deleted pod, not cached: %v", err)
	}
}

type countingAuthenticator struct {
	a auth.Authenticator
	n atomic.Int64
}

func (c *countingAuthenticator) Authenticate(ctx context.Context, token string) (*auth.Caller, error) {
	c.n.Add(1)
	return c.a.Authenticate(ctx, token)
}
