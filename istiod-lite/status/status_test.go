package status_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/leader"
	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/istiod-lite/status"
)

// cluster is shared by the package's tests (one API server: 2 cores).
var cluster *kube.Cluster

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	c, err := kube.New(ctx, kube.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cluster = c
	err = setup(ctx)
	cancel()
	if err != nil {
		c.Close()
		fmt.Fprintln(os.Stderr, "setup:", err)
		os.Exit(1)
	}
	code := m.Run()
	c.Close()
	os.Exit(code)
}

// setup installs the CRDs whose status is written and ambit-system (the
// Lease's namespace).
func setup(ctx context.Context) error {
	kc := cluster.Kubeconfig()
	var files []string
	for _, f := range []string{"gateway.networking.k8s.io_gatewayclasses", "gateway.networking.k8s.io_gateways",
		"gateway.networking.k8s.io_httproutes", "gateway.networking.k8s.io_grpcroutes", "security.istio.io_authorizationpolicies"} {
		files = append(files, "-f", "../../manifests/crds/"+f+".yaml")
	}
	kubectl := func(args ...string) error {
		out, err := exec.CommandContext(ctx, "kubectl", append([]string{"--kubeconfig", kc}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := kubectl(append([]string{"apply", "--server-side"}, files...)...); err != nil {
		return err
	}
	if err := cluster.WaitCRDsEstablished(ctx); err != nil {
		return err
	}
	_, err := cluster.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ambit-system"}}, metav1.CreateOptions{})
	return err
}

// counter counts a client's requests by method and resource.
type counter struct {
	mu sync.Mutex     // guards n and before
	n  map[string]int // by request, and "<code> <request>" for errors
	// before, when set, runs before each request is sent.
	before func(r *http.Request)
}

type counting struct {
	c    *counter
	base http.RoundTripper
}

// classify names a request: "PUT httproutes/status", "PATCH services/status", ...
func classify(r *http.Request) string {
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	switch { // /api/v1/... or /apis/<group>/<version>/...
	case len(parts) > 2 && parts[0] == "api":
		parts = parts[2:]
	case len(parts) > 3 && parts[0] == "apis":
		parts = parts[3:]
	default:
		return r.Method + " " + r.URL.Path
	}
	if len(parts) > 2 && parts[0] == "namespaces" {
		parts = parts[2:]
	}
	res := parts[0]
	if len(parts) > 2 {
		res += "/" + parts[2]
	}
	return r.Method + " " + res
}

func (t counting) RoundTrip(r *http.Request) (*http.Response, error) {
	k := classify(r)
	t.c.mu.Lock()
	t.c.n[k]++
	before := t.c.before
	t.c.mu.Unlock()
	if before != nil {
		before(r)
	}
	resp, err := t.base.RoundTrip(r)
	if err == nil && resp.StatusCode >= 400 {
		t.c.mu.Lock()
		t.c.n[fmt.Sprintf("%d %s", resp.StatusCode, k)]++
		t.c.mu.Unlock()
	}
	return resp, err
}

func (c *counter) get(k string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[k]
}

// writes is the number of write requests other than the Lease's.
func (c *counter) writes() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := map[string]int{}
	for k, v := range c.n {
		if !strings.HasPrefix(k, "GET") && !strings.Contains(k, "leases") && !strings.HasPrefix(k, "4") {
			w[k] = v
		}
	}
	return w
}

func (c *counter) total() int {
	n := 0
	for _, v := range c.writes() {
		n += v
	}
	return n
}

// replica is one istiod-lite's status writer with its own counted clients,
// run under a leader.Elector.
type replica struct {
	c      *counter
	w      *status.Writer
	el     *leader.Elector
	mu     sync.Mutex // guards seen
	seen   map[string]int
	signal chan struct{} // 1-buffered: a reconcile happened
}

func newReplica(t *testing.T, id string) *replica {
	t.Helper()
	r := &replica{c: &counter{n: map[string]int{}}, seen: map[string]int{}, signal: make(chan struct{}, 1)}
	cfg := cluster.Config()
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return counting{c: r.c, base: rt} })
	kc := kubernetes.NewForConfigOrDie(cfg)
	r.w = status.New(status.Config{
		Kube: kc, Gateway: gwclient.NewForConfigOrDie(cfg), Dynamic: dynamic.NewForConfigOrDie(cfg),
		Interval: 20 * time.Millisecond, Logger: testLogger(),
		Reconciled: func(kind, ns, name string, wrote bool) {
			r.mu.Lock()
			r.seen[kind+" "+ns+"/"+name]++
			r.mu.Unlock()
			select {
			case r.signal <- struct{}{}:
			default:
			}
		},
	})
	r.el = &leader.Elector{Client: kc, Run: r.w.Start, Identity: id,
		LeaseDuration: 3 * time.Second, RenewDeadline: time.Second, RetryPeriod: 100 * time.Millisecond}
	return r
}

// reconciles returns how many times each object was compared.
func (r *replica) reconciles() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for k, v := range r.seen {
		out[k] = v
	}
	return out
}

// settle resyncs and waits until every object of keys was compared again
// after the call: everything known before it has been handled.
func (r *replica) settle(t *testing.T, keys ...string) {
	t.Helper()
	before := r.reconciles()
	r.w.Resync()
	deadline := time.After(30 * time.Second)
	for {
		now := r.reconciles()
		done := true
		for _, k := range keys {
			done = done && now[k] > before[k]
		}
		if done {
			return
		}
		select {
		case <-r.signal:
		case <-deadline:
			t.Fatalf("not all of %v compared after a resync: before %v now %v", keys, before, now)
		}
	}
}

// start runs fn in a goroutine until the test ends; the returned func
// stops it and waits for it.
func start(t *testing.T, fn func(context.Context) error) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("start: %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Errorf("did not stop within 30s")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		ok, msg := cond()
		if ok {
			return
		}
		last = msg
		time.Sleep(50 * time.Millisecond) // polling interval of a condition with a deadline
	}
	t.Fatalf("%s: not within 30s; last: %s", what, last)
}

func namespace(t *testing.T, prefix string) string {
	t.Helper()
	ns, err := cluster.Client().CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

// result is a call's value and error, for of(f()).must(t).
type result[T any] struct {
	v   T
	err error
}

func of[T any](v T, err error) result[T] { return result[T]{v, err} }

func (r result[T]) must(t *testing.T) T {
	t.Helper()
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.v
}

func service(ns, name string, port int32, labels map[string]string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: port, TargetPort: intstr.FromInt32(port)}}},
	}
}

// waypoint creates a waypoint Gateway, with addr (if any) as its status
// address (as the deployer writes it once ready).
func waypoint(t *testing.T, gw gwclient.Interface, ns, name, forTraffic, addr string) {
	t.Helper()
	g := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"istio.io/waypoint-for": forTraffic}},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
	}
	g = of(gw.GatewayV1().Gateways(ns).Create(t.Context(), g, metav1.CreateOptions{})).must(t)
	if addr != "" {
		g.Status.Addresses = []gwv1.GatewayStatusAddress{{Type: ptr.To(gwv1.IPAddressType), Value: addr}}
		of(gw.GatewayV1().Gateways(ns).UpdateStatus(t.Context(), g, metav1.UpdateOptions{})).must(t)
	}
}

func serviceParent(name string) gwv1.ParentReference {
	return gwv1.ParentReference{Group: ptr.To(gwv1.Group("")), Kind: ptr.To(gwv1.Kind("Service")), Name: gwv1.ObjectName(name)}
}

func backend(name string, port int32) gwv1.BackendRef {
	return gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Port: ptr.To(gwv1.PortNumber(port))}}
}

func httpRoute(ns, name string, parents []gwv1.ParentReference, backends ...gwv1.BackendRef) *gwv1.HTTPRoute {
	var refs []gwv1.HTTPBackendRef
	for _, b := range backends {
		refs = append(refs, gwv1.HTTPBackendRef{BackendRef: b})
	}
	return &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1.HTTPRouteSpec{CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: parents},
			Rules: []gwv1.HTTPRouteRule{{BackendRefs: refs}}},
	}
}

func policy(ns, name string, spec map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"namespace": ns, "name": name},
		"spec":     spec,
	}}
}

// ourParent returns a route's parent status of istio.io/mesh-controller
// for a Service parent.
func ourParent(ps []gwv1.RouteParentStatus, svc string) *gwv1.RouteParentStatus {
	for i := range ps {
		if ps[i].ControllerName == status.ControllerName && string(ps[i].ParentRef.Name) == svc {
			return &ps[i]
		}
	}
	return nil
}

func cond(cs []metav1.Condition, typ string) metav1.Condition {
	for _, c := range cs {
		if c.Type == typ {
			return c
		}
	}
	return metav1.Condition{}
}

func describe(cs []metav1.Condition) string {
	var s []string
	for _, c := range cs {
		s = append(s, fmt.Sprintf("%s=%s/%s(gen %d)", c.Type, c.Status, c.Reason, c.ObservedGeneration))
	}
	return strings.Join(s, " ")
}

// routeHas waits for an HTTPRoute's parent status for Service svc to have
// the conditions want ("Type=Status/Reason") at generation gen.
func routeHas(t *testing.T, gw gwclient.Interface, ns, name, svc string, gen int64, want ...string) {
	t.Helper()
	eventually(t, fmt.Sprintf("httproute %s parent %s: %v", name, svc, want), func() (bool, string) {
		rt := of(gw.GatewayV1().HTTPRoutes(ns).Get(t.Context(), name, metav1.GetOptions{})).must(t)
		p := ourParent(rt.Status.Parents, svc)
		if p == nil {
			return false, fmt.Sprintf("no parent status: %+v", rt.Status.Parents)
		}
		for _, w := range want {
			typ, rest, _ := strings.Cut(w, "=")
			st, reason, _ := strings.Cut(rest, "/")
			c := cond(p.Conditions, typ)
			if string(c.Status) != st || c.Reason != reason || c.ObservedGeneration != gen || c.LastTransitionTime.IsZero() || c.Message == "" {
				return false, describe(p.Conditions)
			}
		}
		return true, ""
	})
}

func serviceHas(t *testing.T, ns, name, st, reason string) {
	t.Helper()
	eventually(t, fmt.Sprintf("service %s WaypointBound %s/%s", name, st, reason), func() (bool, string) {
		svc := of(cluster.Client().CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})).must(t)
		c := cond(svc.Status.Conditions, status.ConditionWaypointBound)
		if st == "" {
			return c.Type == "", describe(svc.Status.Conditions)
		}
		return string(c.Status) == st && c.Reason == reason && c.Message != "", describe(svc.Status.Conditions) + ": " + c.Message
	})
}

// policyConditions returns an AuthorizationPolicy's status.conditions.
func policyConditions(t *testing.T, dyn dynamic.Interface, ns, name string) []map[string]any {
	u := of(dyn.Resource(security.AuthorizationPolicies).Namespace(ns).Get(t.Context(), name, metav1.GetOptions{})).must(t)
	list, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	var out []map[string]any
	for _, e := range list {
		if m, ok := e.(map[string]any); ok {
			out = append(out, m)
		}
	}
	return out
}

func policyHas(t *testing.T, dyn dynamic.Interface, ns, name, typ, st, reason string) {
	t.Helper()
	eventually(t, fmt.Sprintf("policy %s %s=%s/%s", name, typ, st, reason), func() (bool, string) {
		cs := policyConditions(t, dyn, ns, name)
		for _, c := range cs {
			if c["type"] == typ {
				return c["status"] == st && c["reason"] == reason && c["message"] != "" && c["lastTransitionTime"] != nil, fmt.Sprint(cs)
			}
		}
		return false, fmt.Sprint(cs)
	})
}

// TestStatus writes every kind of status against the real API server,
// keeps other writers' parts, follows changes and writes nothing when
// nothing changed.
func TestStatus(t *testing.T) {
	ctx := t.Context()
	ns := namespace(t, "status")
	cs := cluster.Client()
	gw := gwclient.NewForConfigOrDie(cluster.Config())
	dyn := dynamic.NewForConfigOrDie(cluster.Config())

	// Waypoints: ready (an address), for workloads only, without address.
	waypoint(t, gw, ns, "wp", "service", "10.96.0.50")
	waypoint(t, gw, ns, "wl", "workload", "10.96.0.51")
	waypoint(t, gw, ns, "cold", "service", "")
	use := func(wp string) map[string]string { return map[string]string{"istio.io/use-waypoint": wp} }
	for _, s := range []*corev1.Service{
		service(ns, "reviews", 80, use("wp")),
		service(ns, "v1", 8080, nil),
		service(ns, "lost", 80, use("missing")),
		service(ns, "wrong", 80, use("wl")),
		service(ns, "early", 80, use("cold")),
	} {
		of(cs.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{})).must(t)
	}
	// Another manager's condition on a bound Service.
	of(cs.CoreV1().Services(ns).ApplyStatus(ctx, corev1ac.Service("reviews", ns).WithStatus(corev1ac.ServiceStatus().WithConditions(
		metav1ac.Condition().WithType("example.com/Other").WithStatus(metav1.ConditionTrue).WithReason("Fine").WithMessage("theirs").
			WithLastTransitionTime(metav1.Now()))), metav1.ApplyOptions{FieldManager: "other", Force: true})).must(t)

	// Routes: resolved, a missing backend, a parent shared with another controller.
	of(gw.GatewayV1().HTTPRoutes(ns).Create(ctx, httpRoute(ns, "good", []gwv1.ParentReference{serviceParent("reviews")}, backend("v1", 8080)), metav1.CreateOptions{})).must(t)
	of(gw.GatewayV1().HTTPRoutes(ns).Create(ctx, httpRoute(ns, "bad", []gwv1.ParentReference{serviceParent("reviews")}, backend("v2", 8080)), metav1.CreateOptions{})).must(t)
	partial := httpRoute(ns, "partial", []gwv1.ParentReference{serviceParent("reviews")}, backend("v1", 8080))
	partial.Spec.Rules = append(partial.Spec.Rules, gwv1.HTTPRouteRule{
		Filters:     []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterExtensionRef, ExtensionRef: &gwv1.LocalObjectReference{Group: "example.com", Kind: "Magic", Name: "m"}}},
		BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: backend("v1", 8080)}},
	})
	of(gw.GatewayV1().HTTPRoutes(ns).Create(ctx, partial, metav1.CreateOptions{})).must(t)
	gwParent := gwv1.ParentReference{Name: "edge"}
	shared := of(gw.GatewayV1().HTTPRoutes(ns).Create(ctx, httpRoute(ns, "shared", []gwv1.ParentReference{gwParent, serviceParent("reviews")}, backend("v1", 8080)), metav1.CreateOptions{})).must(t)
	theirs := gwv1.RouteParentStatus{ParentRef: shared.Spec.ParentRefs[0], ControllerName: "example.com/edge", Conditions: []metav1.Condition{{
		Type: "Accepted", Status: metav1.ConditionTrue, Reason: "Accepted", Message: "theirs", ObservedGeneration: 1, LastTransitionTime: metav1.Now()}}}
	shared.Status.Parents = []gwv1.RouteParentStatus{theirs}
	shared = of(gw.GatewayV1().HTTPRoutes(ns).UpdateStatus(ctx, shared, metav1.UpdateOptions{})).must(t)
	theirs = shared.Status.Parents[0] // as stored
	of(gw.GatewayV1().GRPCRoutes(ns).Create(ctx, &gwv1.GRPCRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "grpc"},
		Spec: gwv1.GRPCRouteSpec{CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{serviceParent("reviews")}},
			Rules: []gwv1.GRPCRouteRule{{BackendRefs: []gwv1.GRPCBackendRef{{BackendRef: backend("v1", 8080)}}}}},
	}, metav1.CreateOptions{})).must(t)

	// Policies: a waypoint's, a selector policy with an L7 rule (ztunnel
	// cannot see it), an L4 one with another writer's condition.
	aps := dyn.Resource(security.AuthorizationPolicies).Namespace(ns)
	of(aps.Create(ctx, policy(ns, "at-waypoint", map[string]any{
		"targetRefs": []any{map[string]any{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "wp"}},
		"rules":      []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"methods": []any{"GET"}}}}}},
	}), metav1.CreateOptions{})).must(t)
	of(aps.Create(ctx, policy(ns, "l7-on-ztunnel", map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "ratings"}},
		"rules":    []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"methods": []any{"GET"}}}}}},
	}), metav1.CreateOptions{})).must(t)
	l4 := of(aps.Create(ctx, policy(ns, "l4", map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "ratings"}},
		"rules":    []any{map[string]any{"from": []any{map[string]any{"source": map[string]any{"namespaces": []any{"shop"}}}}}},
	}), metav1.CreateOptions{})).must(t)
	foreign := map[string]any{"type": "example.com/Other", "status": "True", "reason": "Fine", "message": "theirs"}
	if err := unstructured.SetNestedSlice(l4.Object, []any{foreign}, "status", "conditions"); err != nil {
		t.Fatal(err)
	}
	of(aps.UpdateStatus(ctx, l4, metav1.UpdateOptions{})).must(t)

	r := newReplica(t, "a")
	stopR := start(t, r.el.Start)

	routeHas(t, gw, ns, "good", "reviews", 1, "Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs")
	routeHas(t, gw, ns, "bad", "reviews", 1, "Accepted=True/Accepted", "ResolvedRefs=False/BackendNotFound")
	routeHas(t, gw, ns, "partial", "reviews", 1, "Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs", "PartiallyInvalid=True/UnsupportedValue")
	routeHas(t, gw, ns, "shared", "reviews", 1, "Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs")
	eventually(t, "grpcroute accepted", func() (bool, string) {
		rt := of(gw.GatewayV1().GRPCRoutes(ns).Get(ctx, "grpc", metav1.GetOptions{})).must(t)
		p := ourParent(rt.Status.Parents, "reviews")
		if p == nil {
			return false, "no parent status"
		}
		return cond(p.Conditions, "Accepted").Status == metav1.ConditionTrue && cond(p.Conditions, "ResolvedRefs").Status == metav1.ConditionTrue, describe(p.Conditions)
	})
	serviceHas(t, ns, "reviews", "True", status.ReasonWaypointAccepted)
	serviceHas(t, ns, "lost", "False", status.ReasonWaypointNotFound)
	serviceHas(t, ns, "wrong", "False", status.ReasonUnsupportedTrafficType)
	serviceHas(t, ns, "early", "False", status.ReasonWaypointNotReady)
	serviceHas(t, ns, "v1", "", "")
	policyHas(t, dyn, ns, "at-waypoint", "WaypointAccepted", "True", "Accepted")
	policyHas(t, dyn, ns, "l7-on-ztunnel", "ZtunnelAccepted", "False", "UnsupportedValue")
	policyHas(t, dyn, ns, "l4", "ZtunnelAccepted", "True", "Accepted")

	t.Run("other writers' parts are kept", func(t *testing.T) {
		rt := of(gw.GatewayV1().HTTPRoutes(ns).Get(ctx, "shared", metav1.GetOptions{})).must(t)
		if len(rt.Status.Parents) != 2 {
			t.Fatalf("parents %+v, want theirs and ours", rt.Status.Parents)
		}
		var got *gwv1.RouteParentStatus
		for i := range rt.Status.Parents {
			if rt.Status.Parents[i].ControllerName == theirs.ControllerName {
				got = &rt.Status.Parents[i]
			}
		}
		if got == nil || !equality.Semantic.DeepEqual(*got, theirs) {
			t.Errorf("the other controller's entry changed: %+v, want %+v", got, theirs)
		}
		if p := ourParent(rt.Status.Parents, "edge"); p != nil {
			t.Errorf("a status written for the Gateway parent: %+v", p)
		}
		svc := of(cs.CoreV1().Services(ns).Get(ctx, "reviews", metav1.GetOptions{})).must(t)
		if c := cond(svc.Status.Conditions, "example.com/Other"); c.Message != "theirs" {
			t.Errorf("the other manager's Service condition: %+v", svc.Status.Conditions)
		}
		if c := cond(svc.Status.Conditions, status.ConditionWaypointBound); !strings.Contains(c.Message, ns+"/wp") {
			t.Errorf("WaypointBound message %q does not name the waypoint", c.Message)
		}
		pc := policyConditions(t, dyn, ns, "l4")
		if len(pc) != 2 || fmt.Sprint(pc[0]) != fmt.Sprint(foreign) {
			t.Errorf("policy conditions %v, want the other writer's kept", pc)
		}
		for _, c := range pc {
			if c["type"] == "ZtunnelAccepted" && c["observedGeneration"] != "1" {
				t.Errorf("ZtunnelAccepted observedGeneration %#v, want Istio's \"1\"", c["observedGeneration"])
			}
		}
	})

	outer := t
	keys := []string{"HTTPRoute " + ns + "/good", "HTTPRoute " + ns + "/bad", "HTTPRoute " + ns + "/shared", "GRPCRoute " + ns + "/grpc",
		"Service " + ns + "/reviews", "Service " + ns + "/lost", "Service " + ns + "/v1",
		"AuthorizationPolicy " + ns + "/at-waypoint", "AuthorizationPolicy " + ns + "/l4"}
	t.Run("converged: nothing written", func(t *testing.T) {
		r.settle(t, keys...)
		before := r.c.writes()
		rv := map[string]string{}
		rv["good"] = of(gw.GatewayV1().HTTPRoutes(ns).Get(ctx, "good", metav1.GetOptions{})).must(t).ResourceVersion
		rv["reviews"] = of(cs.CoreV1().Services(ns).Get(ctx, "reviews", metav1.GetOptions{})).must(t).ResourceVersion
		rv["l4"] = of(aps.Get(ctx, "l4", metav1.GetOptions{})).must(t).GetResourceVersion()
		// A change that moves no status: an annotation, a new namespace.
		rt := of(gw.GatewayV1().HTTPRoutes(ns).Get(ctx, "good", metav1.GetOptions{})).must(t)
		rt.Annotations = map[string]string{"note": "x"}
		rv["good"] = of(gw.GatewayV1().HTTPRoutes(ns).Update(ctx, rt, metav1.UpdateOptions{})).must(t).ResourceVersion
		namespace(t, "unrelated")
		r.settle(t, keys...)
		if after := r.c.writes(); fmt.Sprint(after) != fmt.Sprint(before) {
			t.Errorf("writes with nothing changed: %v -> %v", before, after)
		}
		if got := of(gw.GatewayV1().HTTPRoutes(ns).Get(ctx, "good", metav1.GetOptions{})).must(t).ResourceVersion; got != rv["good"] {
			t.Errorf("route rewritten: resourceVersion %s -> %s", rv["good"], got)
		}
		if got := of(cs.CoreV1().Services(ns).Get(ctx, "reviews", metav1.GetOptions{})).must(t).ResourceVersion; got != rv["reviews"] {
			t.Errorf("service rewritten: resourceVersion %s -> %s", rv["reviews"], got)
		}
		if got := of(aps.Get(ctx, "l4", metav1.GetOptions{})).must(t).GetResourceVersion(); got != rv["l4"] {
			t.Errorf("policy rewritten: resourceVersion %s -> %s", rv["l4"], got)
		}
		t.Logf("writes to converge: %v", before)

		// A new term (a fresh writer, no memory of its writes) compares
		// everything and writes nothing either.
		stopR()
		r = newReplica(t, "a2")
		start(outer, r.el.Start) // runs on for the next subtest
		r.settle(t, keys...)
		if w := r.c.writes(); len(w) != 0 {
			t.Errorf("a new term rewrote converged status: %v", w)
		}
	})

	t.Run("changes are followed", func(t *testing.T) {
		before := r.c.total()
		// The missing backend appears: ResolvedRefs turns True.
		of(cs.CoreV1().Services(ns).Create(ctx, service(ns, "v2", 8080, nil), metav1.CreateOptions{})).must(t)
		routeHas(t, gw, ns, "bad", "reviews", 1, "Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs")
		// A new generation: observedGeneration follows.
		rt := of(gw.GatewayV1().HTTPRoutes(ns).Get(ctx, "good", metav1.GetOptions{})).must(t)
		rt.Spec.Rules[0].BackendRefs = append(rt.Spec.Rules[0].BackendRefs, gwv1.HTTPBackendRef{BackendRef: backend("v3", 8080)})
		rt = of(gw.GatewayV1().HTTPRoutes(ns).Update(ctx, rt, metav1.UpdateOptions{})).must(t)
		routeHas(t, gw, ns, "good", "reviews", rt.Generation, "Accepted=True/Accepted", "ResolvedRefs=False/BackendNotFound")
		// The binding goes: our condition goes, theirs stays.
		svc := of(cs.CoreV1().Services(ns).Get(ctx, "reviews", metav1.GetOptions{})).must(t)
		delete(svc.Labels, "istio.io/use-waypoint")
		of(cs.CoreV1().Services(ns).Update(ctx, svc, metav1.UpdateOptions{})).must(t)
		serviceHas(t, ns, "reviews", "", "")
		svc = of(cs.CoreV1().Services(ns).Get(ctx, "reviews", metav1.GetOptions{})).must(t)
		if c := cond(svc.Status.Conditions, "example.com/Other"); c.Message != "theirs" {
			t.Errorf("the other manager's condition went with ours: %+v", svc.Status.Conditions)
		}
		// The missing waypoint appears, ready: bound.
		waypoint(t, gw, ns, "missing", "service", "10.96.0.52")
		serviceHas(t, ns, "lost", "True", status.ReasonWaypointAccepted)
		// Another controller's entry removed meanwhile is not ours to restore.
		r.settle(t, keys...)
		t.Logf("writes for 4 changes: %d", r.c.total()-before)
	})
}

// TestLeader runs two writers on one Lease: only the leader writes; when
// it stops, the other takes over and writes what changed since.
func TestLeader(t *testing.T) {
	ctx := t.Context()
	ns := namespace(t, "leader")
	cs := cluster.Client()
	gw := gwclient.NewForConfigOrDie(cluster.Config())
	of(cs.CoreV1().Services(ns).Create(ctx, service(ns, "reviews", 80, nil), metav1.CreateOptions{})).must(t)
	of(gw.GatewayV1().HTTPRoutes(ns).Create(ctx, httpRoute(ns, "r", []gwv1.ParentReference{serviceParent("reviews")}, backend("v1", 8080)), metav1.CreateOptions{})).must(t)

	a, b := newReplica(t, "a"), newReplica(t, "b")
	stopA := start(t, a.el.Start)
	eventually(t, "a leads", func() (bool, string) { return a.el.Leading(), "" })
	start(t, b.el.Start)
	routeHas(t, gw, ns, "r", "reviews", 1, "Accepted=True/Accepted", "ResolvedRefs=False/BackendNotFound")
	if b.el.Leading() {
		t.Fatal("two leaders")
	}
	if w := b.c.writes(); len(w) != 0 {
		t.Errorf("the standby wrote: %v", w)
	}
	aWrites := a.c.writes()

	t0 := time.Now()
	stopA()
	eventually(t, "b leads", func() (bool, string) { return b.el.Leading(), "" })
	t.Logf("handover after the leader stopped: %v", time.Since(t0).Round(time.Millisecond))
	b.settle(t, "HTTPRoute "+ns+"/r")
	if w := b.c.writes(); w["PUT httproutes/status"] != 0 {
		t.Errorf("the new leader rewrote a converged route: %v", w)
	}
	of(cs.CoreV1().Services(ns).Create(ctx, service(ns, "v1", 8080, nil), metav1.CreateOptions{})).must(t)
	routeHas(t, gw, ns, "r", "reviews", 1, "Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs")
	if w := a.c.writes(); fmt.Sprint(w) != fmt.Sprint(aWrites) {
		t.Errorf("the old leader wrote after stopping: %v -> %v", aWrites, w)
	}
	if w := b.c.writes(); w["PUT httproutes/status"] != 1 {
		t.Errorf("new leader's writes %v, want one route status write", w)
	}
}

// TestConflict: another controller writes the route's status while ours is
// in flight; ours conflicts, is retried from the fresh object and keeps
// theirs.
func TestConflict(t *testing.T) {
	ctx := t.Context()
	ns := namespace(t, "conflict")
	cs := cluster.Client()
	gw := gwclient.NewForConfigOrDie(cluster.Config())
	of(cs.CoreV1().Services(ns).Create(ctx, service(ns, "reviews", 80, nil), metav1.CreateOptions{})).must(t)
	of(gw.GatewayV1().HTTPRoutes(ns).Create(ctx, httpRoute(ns, "race", []gwv1.ParentReference{{Name: "edge"}, serviceParent("reviews")}), metav1.CreateOptions{})).must(t)

	r := newReplica(t, "a")
	raced := make(chan error, 1)
	var once atomic.Bool
	hook := func(req *http.Request) {
		if classify(req) != "PUT httproutes/status" || !strings.Contains(req.URL.Path, "/httproutes/race/") || !once.CompareAndSwap(false, true) {
			return
		}
		// the other controller, first
		rt, err := gw.GatewayV1().HTTPRoutes(ns).Get(ctx, "race", metav1.GetOptions{})
		if err == nil {
			rt.Status.Parents = append(rt.Status.Parents, gwv1.RouteParentStatus{ParentRef: rt.Spec.ParentRefs[0], ControllerName: "example.com/edge",
				Conditions: []metav1.Condition{{Type: "Accepted", Status: metav1.ConditionTrue, Reason: "Accepted", Message: "theirs", LastTransitionTime: metav1.Now()}}})
			_, err = gw.GatewayV1().HTTPRoutes(ns).UpdateStatus(ctx, rt, metav1.UpdateOptions{})
		}
		raced <- err
	}
	r.c.mu.Lock()
	r.c.before = hook
	r.c.mu.Unlock()
	start(t, r.el.Start)
	routeHas(t, gw, ns, "race", "reviews", 1, "Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs")
	if err := <-raced; err != nil {
		t.Fatalf("the other controller's write: %v", err)
	}
	rt := of(gw.GatewayV1().HTTPRoutes(ns).Get(ctx, "race", metav1.GetOptions{})).must(t)
	if len(rt.Status.Parents) != 2 || rt.Status.Parents[0].ControllerName != "example.com/edge" {
		t.Errorf("parents %+v, want theirs kept", rt.Status.Parents)
	}
	if n := r.c.get("409 PUT httproutes/status"); n != 1 {
		t.Errorf("conflicts: %d, want 1", n)
	}
	if n := r.c.get("PUT httproutes/status"); n != 2 {
		t.Errorf("route status writes: %d, want 2 (a conflict, its retry)", n)
	}
}

// testLogger logs to stderr when STATUS_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("STATUS_TEST_LOG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
