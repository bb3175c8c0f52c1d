package registry

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/model"
)

// waitFor polls f until it holds, for up to 30 s.
func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached in 30 s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func unstructuredYAML(t *testing.T, doc string) *unstructured.Unstructured {
	t.Helper()
	u := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
		t.Fatal(err)
	}
	return u
}

// TestKubernetesL7Kinds: the registry, as istiod-lite's service account,
// watches DestinationRules (Istio's types), GRPCRoutes and targetRefs
// AuthorizationPolicies on a real API server with the manifests' CRDs,
// and the model follows their changes.
func TestKubernetesL7Kinds(t *testing.T) {
	c := kube.Start(t, kube.Options{})
	ctx := t.Context()
	kc := c.Kubeconfig()
	kubectl(t, kc, "apply", "--server-side", "-f", "../../manifests/namespace.yaml", "-f", "../../manifests/crds/")
	if err := c.WaitCRDsEstablished(ctx); err != nil {
		t.Fatal(err)
	}
	kubectl(t, kc, "apply", "--server-side", "-f", "../../manifests/istiod-lite-rbac.yaml")
	admin := c.Client()
	adminDyn, err := dynamic.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Services("shop").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: "shop"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "reviews"}, Ports: []corev1.ServicePort{{Name: "grpc", Port: 9090}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	drs := adminDyn.Resource(schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1", Resource: "destinationrules"}).Namespace("shop")
	create := func(r dynamic.ResourceInterface, doc string) {
		t.Helper()
		if _, err := r.Create(ctx, unstructuredYAML(t, doc), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	create(drs, `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 7, connectTimeout: 250ms}, http: {http1MaxPendingRequests: 3}}
    outlierDetection: {consecutive5xxErrors: 2, interval: 5s}
    loadBalancer: {simple: LEAST_REQUEST}
`)
	create(adminDyn.Resource(GRPCRoutesResource).Namespace("shop"), `
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9090}]
  rules: [{matches: [{method: {service: reviews.v1.Reviews, method: Get}}], backendRefs: [{name: reviews, port: 9090}]}]
`)
	create(adminDyn.Resource(security.AuthorizationPolicies).Namespace("shop"), `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  rules: [{to: [{operation: {paths: ["/reviews.v1.Reviews/*"]}}]}]
`)

	token, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.ConfigForToken(token)
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	store := &model.Store{}
	k := &Kubernetes{Client: cs, Dynamic: dyn, Store: store}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- k.Start(rctx) }()
	defer func() { cancel(); <-done }()
	select {
	case <-k.Synced():
	case <-time.After(60 * time.Second):
		t.Fatal("registry did not sync")
	}

	s := store.Load()
	dr := s.DestinationRules["shop/reviews"]
	if dr == nil || dr.Service != "shop/reviews.shop.svc.cluster.local" || dr.Policy.ConnectionPool == nil ||
		dr.Policy.ConnectionPool.MaxConnections != 7 || dr.Policy.ConnectionPool.ConnectTimeout != 250*time.Millisecond ||
		dr.Policy.ConnectionPool.MaxPendingRequests != 3 || dr.Policy.LoadBalancer != model.LBLeastRequest ||
		dr.Policy.OutlierDetection == nil || *dr.Policy.OutlierDetection.Consecutive5xx != 2 || dr.Policy.OutlierDetection.Interval != 5*time.Second {
		t.Fatalf("destination rule: %+v", dr)
	}
	gr := s.GRPCRoutes["shop/reviews"]
	if gr == nil || !gr.IsGRPC() || !gr.Parents[0].Accepted() || gr.Rules[0].Matches[0].Path != "/reviews.v1.Reviews/Get" {
		t.Fatalf("grpc route: %+v", gr)
	}
	if p := s.WaypointPolicies["shop/reviews-get"]; p == nil || p.Targets[0].Name != "reviews" || s.Policies["shop/reviews-get"] != nil {
		t.Fatalf("waypoint policy: %+v (ztunnel's: %+v)", p, s.Policies["shop/reviews-get"])
	}

	// A change reaches the model; a deletion removes it.
	u, err := drs.Get(ctx, "reviews", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedField(u.Object, int64(9), "spec", "trafficPolicy", "connectionPool", "tcp", "maxConnections"); err != nil {
		t.Fatal(err)
	}
	if _, err := drs.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "destination rule update", func() bool {
		d := store.Load().DestinationRules["shop/reviews"]
		return d != nil && d.Policy.ConnectionPool.MaxConnections == 9
	})
	if err := adminDyn.Resource(GRPCRoutesResource).Namespace("shop").Delete(ctx, "reviews", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "grpc route deletion", func() bool { return store.Load().GRPCRoutes["shop/reviews"] == nil })
}
