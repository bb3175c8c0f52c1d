package kube_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/integration/kube"
)

func TestCluster(t *testing.T) {
	c := kube.Start(t, kube.Options{})
	ctx := t.Context()
	cs := c.Client()

	mustCreate(t, ctx, cs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}})
	_, err := cs.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "cart"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "cart-0", Namespace: "shop"},
		Spec: corev1.PodSpec{
			ServiceAccountName: "cart",
			NodeName:           "node-1",
			Containers:         []corev1.Container{{Name: "app", Image: "cart"}},
		},
	}
	if _, err := cs.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// A bound, audience-scoped token verifies with TokenReview and names its pod and node.
	tok, err := c.ServiceAccountToken(ctx, "shop", "cart", []string{"istio-ca"}, "cart-0")
	if err != nil {
		t.Fatal(err)
	}
	tr, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: tok, Audiences: []string{"istio-ca"}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !tr.Status.Authenticated || tr.Status.User.Username != "system:serviceaccount:shop:cart" {
		t.Fatalf("token review: %+v", tr.Status)
	}
	if got := tr.Status.User.Extra["authentication.kubernetes.io/pod-name"]; len(got) != 1 || got[0] != "cart-0" {
		t.Fatalf("pod-name extra = %v", got)
	}
	if got := tr.Status.User.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != "node-1" {
		t.Fatalf("node-name extra = %v", got)
	}
	// The wrong audience does not verify.
	tr, err = cs.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: tok, Audiences: []string{"other"}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Status.Authenticated {
		t.Fatal("token with audience istio-ca authenticated for audience other")
	}

	// RBAC is on: the service account may not list pods.
	apiTok, err := c.ServiceAccountToken(ctx, "shop", "cart", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	restricted, err := kubernetes.NewForConfig(c.ConfigForToken(apiTok))
	if err != nil {
		t.Fatal(err)
	}
	_, err = restricted.CoreV1().Pods("shop").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Fatalf("list pods as shop/cart: err = %v, want Forbidden", err)
	}

	if kubectl, err := exec.LookPath("kubectl"); err == nil {
		out, err := exec.CommandContext(ctx, kubectl, "--kubeconfig", c.Kubeconfig(), "get", "pods", "-n", "shop", "-o", "name").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "pod/cart-0" {
			t.Fatalf("kubectl: %v: %s", err, out)
		}
	}

	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func mustCreate(t *testing.T, ctx context.Context, cs kubernetes.Interface, ns *corev1.Namespace) {
	t.Helper()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}
