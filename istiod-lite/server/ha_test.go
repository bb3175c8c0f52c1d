package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
	"github.com/ambit-mesh/ambit/istiod-lite/leader"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// writes counts one replica's writes to the API server that only the
// leader may make: everything but its Lease, token reviews, the CA (Secret
// and roots ConfigMap in ambit-system, which every replica ensures at
// start) and Events (every replica's registry warns).
// Once cut, every request fails: the replica is partitioned from the API
// server (as a crashed node: it cannot release its Lease).
type writes struct {
	mu  sync.Mutex // guards n
	n   map[string]int
	cut atomic.Bool
}

var errPartitioned = errors.New("partitioned from the API server")

func (w *writes) wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripper(func(r *http.Request) (*http.Response, error) {
		if w.cut.Load() {
			return nil, errPartitioned
		}
		resp, err := rt.RoundTrip(r)
		if r.Method == http.MethodGet || err != nil || resp.StatusCode >= 300 {
			return resp, err
		}
		p := r.URL.Path
		for _, skip := range []string{"/leases", "/tokenreviews", "/subjectaccessreviews", "/events", "/namespaces/ambit-system/secrets", "/namespaces/ambit-system/configmaps"} {
			if strings.Contains(p, skip) {
				return resp, err
			}
		}
		w.mu.Lock()
		w.n[r.Method+" "+p]++
		w.mu.Unlock()
		return resp, err
	})
}

func (w *writes) snapshot() map[string]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string]int, len(w.n))
	for k, v := range w.n {
		out[k] = v
	}
	return out
}

func (w *writes) total() int {
	n := 0
	for _, v := range w.snapshot() {
		n += v
	}
	return n
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// replica is one in-process istiod-lite.
type replica struct {
	id     string
	addr   string
	admin  string
	writes *writes
	stop   func() // cancels Run and waits for it
}

func startReplica(t *testing.T, rc *rest.Config, id string) *replica {
	t.Helper()
	r := &replica{id: id, writes: &writes{n: map[string]int{}}}
	rc = rest.CopyConfig(rc)
	rc.Wrap(r.writes.wrap)
	ctx, cancel := context.WithCancel(t.Context())
	addrs := make(chan [2]string, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Config{
			Rest: rc, Listen: "127.0.0.1:0", Admin: "127.0.0.1:0",
			LeaderIdentity: id, LeaseDuration: 3 * time.Second, RenewDeadline: 2 * time.Second, RetryPeriod: 250 * time.Millisecond,
			Listening: func(g, a string) { addrs <- [2]string{g, a} },
		})
	}()
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("replica %s: Run: %v", id, err)
			}
		})
	}
	t.Cleanup(r.stop)
	select {
	case a := <-addrs:
		r.addr, r.admin = a[0], a[1]
	case err := <-done:
		t.Fatalf("replica %s: Run: %v", id, err)
	case <-time.After(90 * time.Second):
		t.Fatalf("replica %s did not start", id)
	}
	return r
}

// waitFor polls cond (an API read) until it holds or the deadline passes.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() (bool, string)) time.Duration {
	t.Helper()
	t0 := time.Now()
	deadline := t0.Add(timeout)
	for {
		ok, detail := cond()
		if ok {
			return time.Since(t0)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v: %s", what, timeout, detail)
		}
		time.Sleep(25 * time.Millisecond) // polls the API server under the deadline
	}
}

// TestTwoReplicas runs two istiod-lite servers against one API server, as
// the istiod-lite service account: both serve xDS; only the Lease holder
// deploys waypoints and writes status; cancelling it hands over to the
// other, which converges (a Gateway created after the handover gets its
// objects) without rewriting what is already converged.
func TestTwoReplicas(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl not installed")
	}
	c := kube.Start(t, kube.Options{})
	ctx := t.Context()
	for _, args := range [][]string{
		{"apply", "--server-side", "-f", "../../manifests/namespace.yaml", "-f", "../../manifests/crds/", "-f", "../../manifests/istiod-lite-rbac.yaml"},
		nil, // wait for the CRDs
		{"apply", "--server-side", "-f", "../../manifests/gatewayclass.yaml"},
	} {
		if args == nil {
			if err := c.WaitCRDsEstablished(ctx); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if out, err := exec.Command("kubectl", append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("kubectl %v: %v\n%s", args, err, out)
		}
	}
	admin := c.Client()
	gwAdmin := gwclient.NewForConfigOrDie(c.Config())
	const ns = "shop"
	mustCreate := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("create %s: %v", what, err)
		}
	}
	_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{model.LabelDataplaneMode: model.DataplaneAmbient}}}, metav1.CreateOptions{})
	mustCreate("namespace", err)
	_, err = admin.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	mustCreate("service account", err)
	p, err := admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns, Labels: map[string]string{"app": "reviews"}},
		Spec:       corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}, metav1.CreateOptions{})
	mustCreate("pod", err)
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.1.5"}
	_, err = admin.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	mustCreate("pod status", err)
	// reviews is bound to waypoint wp1, and one HTTPRoute's parent.
	_, err = admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: ns, Labels: map[string]string{model.LabelUseWaypoint: "wp1"}},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "reviews"}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	}, metav1.CreateOptions{})
	mustCreate("service", err)
	svcKind, port := gwv1.Kind("Service"), gwv1.PortNumber(80)
	coreGroup := gwv1.Group("")
	_, err = gwAdmin.GatewayV1().HTTPRoutes(ns).Create(ctx, &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: ns},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: &coreGroup, Kind: &svcKind, Name: "reviews", Port: &port}}},
			Rules: []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{
				Group: &coreGroup, Kind: &svcKind, Name: "reviews", Port: &port}}}}}},
		},
	}, metav1.CreateOptions{})
	mustCreate("httproute", err)
	// node-1's ztunnel, whose pod-bound token reads xDS.
	_, err = admin.CoreV1().ServiceAccounts("ambit-system").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel"}}, metav1.CreateOptions{})
	mustCreate("ztunnel account", err)
	_, err = admin.CoreV1().Pods("ambit-system").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-1", Namespace: "ambit-system"},
		Spec:       corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "ztunnel", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}, metav1.CreateOptions{})
	mustCreate("ztunnel pod", err)
	ztunnelToken, err := c.ServiceAccountToken(ctx, "ambit-system", "ztunnel", []string{auth.DefaultAudience}, "ztunnel-1")
	if err != nil {
		t.Fatal(err)
	}
	token, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	rc := c.ConfigForToken(token)

	// Both at once: either may win the Lease.
	var reps [2]*replica
	var wg sync.WaitGroup
	for i, id := range []string{"istiod-lite-a", "istiod-lite-b"} {
		wg.Go(func() { reps[i] = startReplica(t, rc, id) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	holder := func() string {
		l, err := admin.CoordinationV1().Leases(leader.DefaultNamespace).Get(ctx, leader.DefaultName, metav1.GetOptions{})
		if err != nil || l.Spec.HolderIdentity == nil {
			return ""
		}
		return *l.Spec.HolderIdentity
	}
	waitFor(t, "a leader", 30*time.Second, func() (bool, string) { h := holder(); return h != "", h })
	lead, standby := reps[0], reps[1]
	if holder() == reps[1].id {
		lead, standby = reps[1], reps[0]
	}
	t.Logf("leader %s, standby %s", lead.id, standby.id)
	// Each says so on its admin port.
	leading := func(r *replica) bool {
		resp, err := http.Get("http://" + r.admin + "/debug/leader")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v struct{ Leading bool }
		if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
			t.Fatal(err)
		}
		return v.Leading
	}
	waitFor(t, "the leader's /debug/leader", 10*time.Second, func() (bool, string) { return leading(lead), "" })
	if leading(standby) {
		t.Errorf("the standby says it leads")
	}

	// Both serve xDS: a ztunnel client of each syncs the model.
	cm, err := admin.CoreV1().ConfigMaps(ca.DefaultNamespace).Get(ctx, ca.DefaultBundleConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("bundle ConfigMap: %v", err)
	}
	roots, err := x509bundle.Parse(identity.DefaultTrustDomain, []byte(cm.Data[ca.BundleConfigMapKey]))
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := caclient.TLSConfig(roots, identity.DefaultTrustDomain, identity.ControlPlane(identity.DefaultTrustDomain))
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(ztunnelToken), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, r := range reps {
		xc := &xdsclient.Client{Addr: r.addr, TLS: tlsConf, TokenFile: tokenFile, Node: "node-1", Store: &model.Store{}}
		cctx, cancel := context.WithCancel(ctx)
		go func() { _ = xc.Start(cctx) }()
		select {
		case <-xc.SyncedCh():
		case <-time.After(30 * time.Second):
			t.Fatalf("xDS client of %s did not sync", r.id)
		}
		if w := xc.Store.Load().Workloads[translate.WorkloadUID("", ns, "web")]; w == nil || w.Node != "node-1" {
			t.Fatalf("%s's model: web is %+v", r.id, w)
		}
		cancel()
	}

	gateway := func(name string) *gwv1.Gateway {
		return &gwv1.Gateway{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: gwv1.GatewaySpec{GatewayClassName: deployer.WaypointClass,
				Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
		}
	}
	gws := gwAdmin.GatewayV1().Gateways(ns)
	// deployed: the owned objects exist and the status says Pending (no
	// controller-manager makes a replica ready) with attached routes n.
	deployed := func(name string, routes int32) func() (bool, string) {
		return func() (bool, string) {
			if _, err := admin.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
				return false, err.Error()
			}
			if _, err := admin.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
				return false, err.Error()
			}
			if _, err := admin.CoreV1().ServiceAccounts(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
				return false, err.Error()
			}
			gw, err := gws.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			cond := meta.FindStatusCondition(gw.Status.Conditions, "Programmed")
			if cond == nil || cond.Reason != "Pending" || len(gw.Status.Listeners) != 1 || gw.Status.Listeners[0].AttachedRoutes != routes {
				return false, fmt.Sprintf("status %+v", gw.Status)
			}
			return true, ""
		}
	}
	// routeStatus: the HTTPRoute's parent status, written by the leader.
	routeAccepted := func() (bool, string) {
		r, err := gwAdmin.GatewayV1().HTTPRoutes(ns).Get(ctx, "reviews", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, p := range r.Status.Parents {
			if p.ControllerName == deployer.ControllerName && meta.IsStatusConditionTrue(p.Conditions, "Accepted") {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%+v", r.Status)
	}

	_, err = gws.Create(ctx, gateway("wp1"), metav1.CreateOptions{})
	mustCreate("gateway wp1", err)
	d := waitFor(t, "wp1 deployed by the leader", 30*time.Second, deployed("wp1", 1))
	t.Logf("wp1 deployed and its status written %v after its creation", d.Round(time.Millisecond))
	waitFor(t, "route status", 30*time.Second, routeAccepted)

	// Converged: a window in which nothing changes must see no write, even
	// though a label change makes both controllers look again.
	converged := func(what string) {
		t.Helper()
		// First the writes in flight end: no write for a second.
		last, quiet := -1, time.Now()
		waitFor(t, what+": writes end", 30*time.Second, func() (bool, string) {
			if n := reps[0].writes.total() + reps[1].writes.total(); n != last {
				last, quiet = n, time.Now()
			}
			return time.Since(quiet) > time.Second, fmt.Sprint(last, " writes")
		})
		gw, err := gws.Get(ctx, "wp1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		gw.Labels = map[string]string{"touched": strings.ReplaceAll(what, " ", "-")}
		gw, err = gws.Update(ctx, gw, metav1.UpdateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		rv := gw.ResourceVersion
		route, err := gwAdmin.GatewayV1().HTTPRoutes(ns).Get(ctx, "reviews", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		before := [2]int{reps[0].writes.total(), reps[1].writes.total()}
		// An observation window (nothing to wait for: the point is that
		// nothing happens), several of the writers' intervals long.
		time.Sleep(3 * time.Second)
		after := [2]int{reps[0].writes.total(), reps[1].writes.total()}
		if after != before {
			t.Errorf("%s: writes in a converged window: %v -> %v (%v, %v)", what, before, after, reps[0].writes.snapshot(), reps[1].writes.snapshot())
		}
		if gw, err := gws.Get(ctx, "wp1", metav1.GetOptions{}); err != nil || gw.ResourceVersion != rv {
			t.Errorf("%s: wp1's resourceVersion %s -> %v (%v): fighting writes", what, rv, gw.ResourceVersion, err)
		}
		if r, err := gwAdmin.GatewayV1().HTTPRoutes(ns).Get(ctx, "reviews", metav1.GetOptions{}); err != nil || r.ResourceVersion != route.ResourceVersion {
			t.Errorf("%s: the route's resourceVersion %s -> %v (%v)", what, route.ResourceVersion, r.ResourceVersion, err)
		}
	}
	converged("first term")
	if n := standby.writes.snapshot(); len(n) != 0 {
		t.Fatalf("the standby wrote: %v", n)
	}
	lw := lead.writes.snapshot()
	if !slices.ContainsFunc(slices.Collect(maps.Keys(lw)), func(k string) bool { return strings.HasSuffix(k, "/gateways/wp1/status") }) {
		t.Errorf("the leader's writes have no Gateway status: %v", lw)
	}
	t.Logf("leader's writes: %v", lw)

	// Cancel the leader: the standby takes the Lease, keeps serving xDS
	// and deploys a Gateway created after the handover.
	t0 := time.Now()
	lead.stop()
	stopped := time.Since(t0)
	handover := waitFor(t, "the standby leads", 30*time.Second, func() (bool, string) { h := holder(); return h == standby.id, h })
	t.Logf("handover: leader stopped in %v, Lease held by %s %v after the cancel", stopped.Round(time.Millisecond), standby.id, (stopped + handover).Round(time.Millisecond))
	_, err = gws.Create(ctx, gateway("wp2"), metav1.CreateOptions{})
	mustCreate("gateway wp2", err)
	d = waitFor(t, "wp2 deployed by the new leader", 30*time.Second, deployed("wp2", 0))
	t.Logf("wp2 (created after the handover) deployed %v after its creation, %v after the old leader's cancel", d.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	if n := standby.writes.snapshot(); !slices.ContainsFunc(slices.Collect(maps.Keys(n)), func(k string) bool { return strings.HasSuffix(k, "/gateways/wp2/status") }) {
		t.Errorf("wp2's status was not written by %s: %v", standby.id, n)
	}
	converged("second term")
	// What the first term converged was not rewritten by the second.
	for k := range standby.writes.snapshot() {
		if strings.Contains(k, "/wp1") || strings.Contains(k, "/httproutes/") {
			t.Errorf("the new leader rewrote a converged object: %s", k)
		}
	}

	// The attached-route count follows the model: the route goes, wp1's
	// listener says 0.
	if err := gwAdmin.GatewayV1().HTTPRoutes(ns).Delete(ctx, "reviews", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	d = waitFor(t, "wp1's attachedRoutes 0", 30*time.Second, deployed("wp1", 0))
	t.Logf("attachedRoutes 1 -> 0 on wp1 %v after the route's deletion", d.Round(time.Millisecond))

	// The first leader comes back (as a restarted pod) and stands by; the
	// second is partitioned from the API server, as a crashed node that
	// cannot release the Lease: the first takes over once the Lease
	// expires.
	back := startReplica(t, rc, lead.id)
	if h := holder(); h != standby.id {
		t.Fatalf("Lease held by %q after the restart, want %s", h, standby.id)
	}
	standby.writes.cut.Store(true)
	takeover := waitFor(t, "the restarted replica leads", 60*time.Second, func() (bool, string) { h := holder(); return h == back.id, h })
	t.Logf("takeover from a partitioned leader: %v (LeaseDuration 3s, RenewDeadline 2s, RetryPeriod 250ms)", takeover.Round(time.Millisecond))
	_, err = gws.Create(ctx, gateway("wp3"), metav1.CreateOptions{})
	mustCreate("gateway wp3", err)
	waitFor(t, "wp3 deployed by the restarted replica", 30*time.Second, deployed("wp3", 0))
	if n := back.writes.snapshot(); !slices.ContainsFunc(slices.Collect(maps.Keys(n)), func(k string) bool { return strings.HasSuffix(k, "/gateways/wp3/status") }) {
		t.Errorf("wp3's status was not written by %s: %v", back.id, n)
	}
	for k := range back.writes.snapshot() {
		if strings.Contains(k, "/wp1") || strings.Contains(k, "/wp2") {
			t.Errorf("the third term rewrote a converged object: %s", k)
		}
	}

	// A waypoint (the deployer's service account) reads its Envoy config
	// from the replica left.
	_, err = admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "wp1-0", Namespace: ns, Labels: map[string]string{auth.LabelGatewayName: "wp1"}},
		Spec:       corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "wp1", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}, metav1.CreateOptions{})
	mustCreate("waypoint pod", err)
	wpToken, err := c.ServiceAccountToken(ctx, ns, "wp1", []string{auth.DefaultAudience}, "wp1-0")
	if err != nil {
		t.Fatal(err)
	}
	resp, err := firstResponse(ctx, back.addr, tlsConf, wpToken, "wp1-0", resource.ListenerType)
	if err != nil {
		t.Fatalf("waypoint xDS from %s: %v", back.id, err)
	}
	if len(resp.GetResources()) == 0 {
		t.Errorf("waypoint got no listeners from %s", back.id)
	}
}
