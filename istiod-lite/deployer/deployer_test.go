package deployer_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
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

// setup installs the Gateway API CRDs, ambit-system and the waypoint class.
func setup(ctx context.Context) error {
	kc := cluster.Kubeconfig()
	for _, args := range [][]string{
		{"apply", "--server-side", "-f", "../../manifests/crds/gateway.networking.k8s.io_gatewayclasses.yaml",
			"-f", "../../manifests/crds/gateway.networking.k8s.io_gateways.yaml"},
	} {
		out, err := exec.CommandContext(ctx, "kubectl", append([]string{"--kubeconfig", kc}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, out)
		}
	}
	if err := cluster.WaitCRDsEstablished(ctx); err != nil {
		return err
	}
	cs := cluster.Client()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ambit-system"}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	// the CA roots istiod-lite publishes
	if _, err := cs.CoreV1().ConfigMaps("ambit-system").Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "ambit-ca-root"},
		Data:       map[string]string{"root-cert.pem": "ROOT-1"},
	}, metav1.CreateOptions{}); err != nil {
		return err
	}
	gw := gwclient.NewForConfigOrDie(cluster.Config())
	for name, ctrl := range map[string]gwv1.GatewayController{
		deployer.WaypointClass: deployer.ControllerName,
		"other":                "example.com/other",
	} {
		gc := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: gwv1.GatewayClassSpec{ControllerName: ctrl}}
		if _, err := gw.GatewayV1().GatewayClasses().Create(ctx, gc, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	return nil
}

// counter counts a client's requests, and can cut its Lease requests (a
// replica partitioned from the API server's Lease).
type counter struct {
	mu sync.Mutex // guards n
	n  map[string]int

	cutLeases atomic.Bool
}

// counting is one client's transport, counted.
type counting struct {
	c    *counter
	base http.RoundTripper
}

// classify names a request: "PATCH deployments", "PUT gateways/status", ...
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
	if t.c.cutLeases.Load() && strings.Contains(k, "leases") {
		return nil, errors.New("test: lease requests cut")
	}
	t.c.mu.Lock()
	t.c.n[k]++
	t.c.mu.Unlock()
	return t.base.RoundTrip(r)
}

// writes is the number of write requests other than the Lease's.
func (c *counter) writes() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := map[string]int{}
	for k, v := range c.n {
		if !strings.HasPrefix(k, "GET") && !strings.Contains(k, "leases") {
			w[k] = v
		}
	}
	return w
}

// replica is one istiod-lite's deployer with its own counted clients.
type replica struct {
	c       *counter
	kube    kubernetes.Interface
	ctrl    *deployer.Controller
	reconc  chan string // a Gateway key at each AttachedRoutes call (a reconcile)
	routesN atomic.Int32
}

func newReplica(t *testing.T) *replica {
	t.Helper()
	r := &replica{reconc: make(chan string, 256), c: &counter{n: map[string]int{}}}
	r.routesN.Store(2)
	cfg := cluster.Config()
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return counting{c: r.c, base: rt} })
	r.kube = kubernetes.NewForConfigOrDie(cfg)
	gw := gwclient.NewForConfigOrDie(cfg)
	r.ctrl = deployer.New(deployer.Config{
		Kube: r.kube, Gateway: gw, Image: "example.com/waypoint:test", Workers: 1,
		AttachedRoutes: func(ns, name string) int32 {
			select {
			case r.reconc <- ns + "/" + name:
			default:
			}
			return r.routesN.Load()
		},
	})
	return r
}

// settle proves a Gateway's reconciliation is finished: two requeues seen
// through the AttachedRoutes hook (the first reconcile, which that hook
// precedes, is done once the second starts: a key is never reconciled by two
// workers at once).
func (r *replica) settle(t *testing.T, ns, name string) {
	t.Helper()
	key := ns + "/" + name
	for range 2 {
		r.ctrl.Requeue(ns, name)
		deadline := time.After(20 * time.Second)
		for got := ""; got != key; {
			select {
			case got = <-r.reconc:
			case <-deadline:
				t.Fatalf("no reconcile of %s", key)
			}
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

// namespace creates a namespace named after prefix (unique: -count=N
// reuses the cluster).
func namespace(t *testing.T, prefix string) string {
	t.Helper()
	ns, err := cluster.Client().CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

func gwClient() gwclient.Interface { return gwclient.NewForConfigOrDie(cluster.Config()) }

func waypoint(ns, name, class string, listeners ...gwv1.Listener) *gwv1.Gateway {
	if len(listeners) == 0 {
		listeners = []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}
	}
	return &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"istio.io/waypoint-for": "service"}},
		Spec:       gwv1.GatewaySpec{GatewayClassName: gwv1.ObjectName(class), Listeners: listeners},
	}
}

func createGateway(t *testing.T, gw *gwv1.Gateway) *gwv1.Gateway {
	t.Helper()
	got, err := gwClient().GatewayV1().Gateways(gw.Namespace).Create(t.Context(), gw, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func getGateway(t *testing.T, ns, name string) *gwv1.Gateway {
	t.Helper()
	gw, err := gwClient().GatewayV1().Gateways(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return gw
}

func cond(conds []metav1.Condition, typ string) metav1.Condition {
	if c := meta.FindStatusCondition(conds, typ); c != nil {
		return *c
	}
	return metav1.Condition{Type: typ, Status: "absent"}
}

// hasCondition is a condition check for eventually.
func hasCondition(t *testing.T, ns, name, typ string, status metav1.ConditionStatus, reason string) func() (bool, string) {
	return func() (bool, string) {
		gw := getGateway(t, ns, name)
		c := cond(gw.Status.Conditions, typ)
		return c.Status == status && c.Reason == reason && c.ObservedGeneration == gw.Generation,
			fmt.Sprintf("%s=%s (%s) gen %d/%d", typ, c.Status, c.Reason, c.ObservedGeneration, gw.Generation)
	}
}

// markReady does what the controller-manager would once a pod is ready.
func markReady(t *testing.T, cs kubernetes.Interface, ns, name string) {
	t.Helper()
	d, err := cs.AppsV1().Deployments(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d.Status = appsv1.DeploymentStatus{ObservedGeneration: d.Generation, Replicas: 1, UpdatedReplicas: 1, ReadyReplicas: 1, AvailableReplicas: 1}
	if _, err := cs.AppsV1().Deployments(ns).UpdateStatus(t.Context(), d, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// checkOwned checks that the object is controlled by the Gateway.
func checkOwned(t *testing.T, obj metav1.Object, gw *gwv1.Gateway) {
	t.Helper()
	ref := metav1.GetControllerOf(obj)
	if ref == nil || ref.UID != gw.UID || ref.Kind != "Gateway" || ref.APIVersion != "gateway.networking.k8s.io/v1" || ref.Name != gw.Name {
		t.Errorf("%s: controller reference %+v, want Gateway %s (%s)", obj.GetName(), ref, gw.Name, gw.UID)
	}
	if obj.GetLabels()[deployer.GatewayNameLabel] != gw.Name || obj.GetLabels()[deployer.ManagedLabel] != deployer.ManagedValue {
		t.Errorf("%s: labels %v", obj.GetName(), obj.GetLabels())
	}
}

func TestWaypointConverges(t *testing.T) {
	const name = "waypoint"
	ns := namespace(t, "converge")
	r := newReplica(t)
	start(t, r.ctrl.Start)
	cs := cluster.Client()
	gw := createGateway(t, waypoint(ns, name, deployer.WaypointClass))

	// Objects, owned by the Gateway.
	var dep *appsv1.Deployment
	var svc *corev1.Service
	eventually(t, "owned objects", func() (bool, string) {
		var err1, err2, err3 error
		dep, err1 = cs.AppsV1().Deployments(ns).Get(t.Context(), name, metav1.GetOptions{})
		svc, err2 = cs.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
		_, err3 = cs.CoreV1().ServiceAccounts(ns).Get(t.Context(), name, metav1.GetOptions{})
		return err1 == nil && err2 == nil && err3 == nil, fmt.Sprint(err1, err2, err3)
	})
	sa, _ := cs.CoreV1().ServiceAccounts(ns).Get(t.Context(), name, metav1.GetOptions{})
	for _, o := range []metav1.Object{dep, svc, sa} {
		checkOwned(t, o, gw)
	}
	pod := dep.Spec.Template
	if pod.Labels["istio.io/dataplane-mode"] != "none" || pod.Labels[deployer.GatewayNameLabel] != name {
		t.Errorf("pod labels %v", pod.Labels)
	}
	if pod.Spec.ServiceAccountName != name {
		t.Errorf("pod service account %q", pod.Spec.ServiceAccountName)
	}
	ctr := pod.Spec.Containers[0]
	if ctr.Image != "example.com/waypoint:test" {
		t.Errorf("image %q", ctr.Image)
	}
	ports := map[int32]string{}
	for _, p := range ctr.Ports {
		ports[p.ContainerPort] = p.Name
	}
	if len(ports) != 3 || ports[15008] == "" || ports[15020] == "" || ports[15021] == "" {
		t.Errorf("container ports %v", ports)
	}
	if p := ctr.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz/ready" || p.HTTPGet.Port.IntVal != 15021 {
		t.Errorf("readiness probe %+v", ctr.ReadinessProbe)
	}
	env := map[string]string{}
	for _, e := range ctr.Env {
		env[e.Name] = e.Value
	}
	if env["XDS_ADDRESS"] != "istiod-lite.ambit-system.svc:15012" || env["TOKEN_FILE"] != "/var/run/secrets/tokens/istio-token" {
		t.Errorf("env %v", env)
	}
	var audience string
	for _, v := range pod.Spec.Volumes {
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil {
					audience = s.ServiceAccountToken.Audience + ":" + s.ServiceAccountToken.Path
				}
			}
		}
	}
	if audience != "istio-ca:istio-token" {
		t.Errorf("projected token %q", audience)
	}
	if sc := ctr.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("security context %+v", ctr.SecurityContext)
	}
	svcPorts := map[string]int32{}
	for _, p := range svc.Spec.Ports {
		svcPorts[p.Name] = p.Port
	}
	if svcPorts["mesh"] != 15008 || svcPorts["status-port"] != 15021 || len(svcPorts) != 2 {
		t.Errorf("service ports %v", svcPorts)
	}
	if svc.Spec.Selector[deployer.GatewayNameLabel] != name || len(svc.Spec.Selector) != 1 {
		t.Errorf("service selector %v", svc.Spec.Selector)
	}

	// The CA roots, copied into the waypoint's namespace, mounted.
	eventually(t, "roots copied", func() (bool, string) {
		cm, err := cs.CoreV1().ConfigMaps(ns).Get(t.Context(), name+"-ca-root", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		checkOwned(t, cm, gw)
		return cm.Data["root-cert.pem"] == "ROOT-1", fmt.Sprint(cm.Data)
	})
	var rootsVolume string
	for _, v := range pod.Spec.Volumes {
		if v.ConfigMap != nil {
			rootsVolume = v.ConfigMap.Name
		}
	}
	if rootsVolume != name+"-ca-root" {
		t.Errorf("roots volume %q", rootsVolume)
	}

	// Accepted, not yet Programmed: no ready replica, no addresses.
	eventually(t, "accepted", hasCondition(t, ns, name, "Accepted", "True", "Accepted"))
	eventually(t, "pending", hasCondition(t, ns, name, "Programmed", "False", "Pending"))
	gw = getGateway(t, ns, name)
	if len(gw.Status.Addresses) != 0 {
		t.Errorf("addresses before ready: %v", gw.Status.Addresses)
	}
	if len(gw.Status.Listeners) != 1 || gw.Status.Listeners[0].AttachedRoutes != 2 ||
		cond(gw.Status.Listeners[0].Conditions, "Accepted").Status != "True" ||
		cond(gw.Status.Listeners[0].Conditions, "ResolvedRefs").Status != "True" ||
		cond(gw.Status.Listeners[0].Conditions, "Programmed").Reason != "Pending" {
		t.Errorf("listener status %+v", gw.Status.Listeners)
	}

	// A ready replica (as the controller-manager would report it): Programmed.
	markReady(t, cs, ns, name)
	eventually(t, "programmed", hasCondition(t, ns, name, "Programmed", "True", "Programmed"))
	gw = getGateway(t, ns, name)
	want := []string{"IPAddress=" + svc.Spec.ClusterIP, "Hostname=waypoint." + ns + ".svc.cluster.local"}
	if got := addresses(gw); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("addresses %v, want %v", got, want)
	}
	if c := cond(gw.Status.Listeners[0].Conditions, "Programmed"); c.Status != "True" {
		t.Errorf("listener programmed %+v", c)
	}

	// Converged: a reconcile writes nothing (no apply, no status write).
	r.settle(t, ns, name)
	before, rv := r.c.writes(), getGateway(t, ns, name).ResourceVersion
	depRV := getDeployment(t, ns, name).ResourceVersion
	r.settle(t, ns, name)
	if after := r.c.writes(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("a converged reconcile wrote: before %v after %v", before, after)
	}
	if got := getGateway(t, ns, name).ResourceVersion; got != rv {
		t.Errorf("gateway resourceVersion %s -> %s with nothing changed", rv, got)
	}
	if got := getDeployment(t, ns, name).ResourceVersion; got != depRV {
		t.Errorf("deployment resourceVersion %s -> %s with nothing changed", depRV, got)
	}
	t.Logf("writes to converge one waypoint: %v", before)

	// Attached routes change: only the count moves.
	r.routesN.Store(3)
	r.ctrl.Requeue(ns, name)
	eventually(t, "attachedRoutes 3", func() (bool, string) {
		gw := getGateway(t, ns, name)
		return gw.Status.Listeners[0].AttachedRoutes == 3, fmt.Sprint(gw.Status.Listeners[0].AttachedRoutes)
	})

	// Rotated roots reach the copy.
	src, err := cs.CoreV1().ConfigMaps("ambit-system").Get(t.Context(), "ambit-ca-root", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	src.Data["root-cert.pem"] += "\nROOT-2"
	if _, err := cs.CoreV1().ConfigMaps("ambit-system").Update(t.Context(), src, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "rotated roots copied", func() (bool, string) {
		cm, err := cs.CoreV1().ConfigMaps(ns).Get(t.Context(), name+"-ca-root", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return cm.Data["root-cert.pem"] == src.Data["root-cert.pem"], fmt.Sprint(cm.Data)
	})

	// An edited owned Deployment is re-applied.
	d := getDeployment(t, ns, name)
	d.Spec.Template.Spec.Containers[0].Image = "example.com/evil:1"
	d.Spec.Template.Labels["istio.io/dataplane-mode"] = "ambient"
	if _, err := cs.AppsV1().Deployments(ns).Update(t.Context(), d, metav1.UpdateOptions{FieldManager: "someone"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deployment re-applied", func() (bool, string) {
		d := getDeployment(t, ns, name)
		img := d.Spec.Template.Spec.Containers[0].Image
		mode := d.Spec.Template.Labels["istio.io/dataplane-mode"]
		return img == "example.com/waypoint:test" && mode == "none", img + " " + mode
	})

	// A deleted owned Service is re-created, and the address follows it.
	if err := cs.CoreV1().Services(ns).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "service re-created, address updated", func() (bool, string) {
		s, err := cs.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		got := addresses(getGateway(t, ns, name))
		return s.UID != svc.UID && len(got) == 2 && got[0] == "IPAddress="+s.Spec.ClusterIP, fmt.Sprint(got)
	})

	// Gateway deleted: garbage collection (not run by this harness: no
	// controller-manager) deletes what it controls; the references it
	// follows are checked above. The deployer does not fight the deletion.
	dep = getDeployment(t, ns, name)
	checkOwned(t, dep, gw)
	if err := gwClient().GatewayV1().Gateways(ns).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "gateway gone", func() (bool, string) {
		_, err := gwClient().GatewayV1().Gateways(ns).Get(t.Context(), name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
}

func getDeployment(t *testing.T, ns, name string) *appsv1.Deployment {
	t.Helper()
	d, err := cluster.Client().AppsV1().Deployments(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func addresses(gw *gwv1.Gateway) []string {
	var out []string
	for _, a := range gw.Status.Addresses {
		typ := ""
		if a.Type != nil {
			typ = string(*a.Type)
		}
		out = append(out, typ+"="+a.Value)
	}
	return out
}

func TestListeners(t *testing.T) {
	ns := namespace(t, "listeners")
	r := newReplica(t)
	start(t, r.ctrl.Start)
	cs := cluster.Client()

	// A mesh listener and an HTTP one: deployed, the HTTP one refused.
	createGateway(t, waypoint(ns, "mixed", deployer.WaypointClass,
		gwv1.Listener{Name: "mesh", Port: 15008, Protocol: "HBONE"},
		gwv1.Listener{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType}))
	eventually(t, "mixed accepted", hasCondition(t, ns, "mixed", "Accepted", "True", "ListenersNotValid"))
	gw := getGateway(t, ns, "mixed")
	ls := map[gwv1.SectionName]gwv1.ListenerStatus{}
	for _, l := range gw.Status.Listeners {
		ls[l.Name] = l
	}
	if c := cond(ls["http"].Conditions, "Accepted"); c.Status != "False" || c.Reason != "UnsupportedProtocol" {
		t.Errorf("http listener Accepted %+v", c)
	}
	if ls["http"].AttachedRoutes != 0 || len(ls["http"].SupportedKinds) != 0 {
		t.Errorf("http listener %+v", ls["http"])
	}
	if c := cond(ls["mesh"].Conditions, "Accepted"); c.Status != "True" {
		t.Errorf("mesh listener Accepted %+v", c)
	}
	if _, err := cs.AppsV1().Deployments(ns).Get(t.Context(), "mixed", metav1.GetOptions{}); err != nil {
		t.Errorf("mixed not deployed: %v", err)
	}

	// Only an HTTP listener: not accepted, not deployed.
	createGateway(t, waypoint(ns, "http-only", deployer.WaypointClass,
		gwv1.Listener{Name: "http", Port: 15008, Protocol: gwv1.HTTPProtocolType}))
	eventually(t, "http-only refused", hasCondition(t, ns, "http-only", "Accepted", "False", "ListenersNotValid"))
	eventually(t, "http-only not programmed", hasCondition(t, ns, "http-only", "Programmed", "False", "Invalid"))
	gw = getGateway(t, ns, "http-only")
	if c := cond(gw.Status.Listeners[0].Conditions, "Accepted"); c.Reason != "UnsupportedProtocol" {
		t.Errorf("listener %+v", c)
	}
	if _, err := cs.AppsV1().Deployments(ns).Get(t.Context(), "http-only", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("http-only deployed: %v", err)
	}

	// The mixed one loses its mesh listener: its objects are removed.
	gw = getGateway(t, ns, "mixed")
	gw.Spec.Listeners = gw.Spec.Listeners[1:]
	if _, err := gwClient().GatewayV1().Gateways(ns).Update(t.Context(), gw, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "mixed refused", hasCondition(t, ns, "mixed", "Accepted", "False", "ListenersNotValid"))
	for _, err := range []error{
		getErr(cs.AppsV1().Deployments(ns).Get(t.Context(), "mixed", metav1.GetOptions{})),
		getErr(cs.CoreV1().Services(ns).Get(t.Context(), "mixed", metav1.GetOptions{})),
		getErr(cs.CoreV1().ServiceAccounts(ns).Get(t.Context(), "mixed", metav1.GetOptions{})),
		getErr(cs.CoreV1().ConfigMaps(ns).Get(t.Context(), "mixed-ca-root", metav1.GetOptions{})),
	} {
		if !apierrors.IsNotFound(err) {
			t.Errorf("an object of a refused waypoint remains: %v", err)
		}
	}
}

func getErr[T any](_ T, err error) error { return err }

func TestOtherClassIgnored(t *testing.T) {
	ns := namespace(t, "other")
	r := newReplica(t)
	start(t, r.ctrl.Start)
	createGateway(t, waypoint(ns, "theirs", "other"))
	createGateway(t, waypoint(ns, "ours", deployer.WaypointClass))
	eventually(t, "ours accepted", hasCondition(t, ns, "ours", "Accepted", "True", "Accepted"))
	// One worker, events in order: "theirs" was handled before "ours"; and
	// a requeue of it is handled before the next of "ours".
	r.ctrl.Requeue(ns, "theirs")
	r.settle(t, ns, "ours")
	gw := getGateway(t, ns, "theirs")
	if c := cond(gw.Status.Conditions, "Accepted"); c.Status != "Unknown" || c.Reason != "Pending" {
		t.Errorf("another class's Gateway got status %+v", c)
	}
	if _, err := cluster.Client().AppsV1().Deployments(ns).Get(t.Context(), "theirs", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("another class's Gateway deployed: %v", err)
	}
	// Its class is not accepted either; the waypoint class is.
	eventually(t, "waypoint class accepted", func() (bool, string) {
		gc, err := gwClient().GatewayV1().GatewayClasses().Get(t.Context(), deployer.WaypointClass, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		c := cond(gc.Status.Conditions, "Accepted")
		return c.Status == "True" && c.ObservedGeneration == gc.Generation, fmt.Sprintf("%+v", c)
	})
	if gc, err := gwClient().GatewayV1().GatewayClasses().Get(t.Context(), "other", metav1.GetOptions{}); err != nil || cond(gc.Status.Conditions, "Accepted").Status == "True" {
		t.Errorf("another controller's class accepted: %v %+v", err, gc.Status)
	}
	if w := r.c.writes(); w["PATCH deployments"] != 1 || w["PUT gateways/status"] != 1 {
		t.Errorf("writes %v, want one Deployment apply and one status write (for ours)", w)
	}
}

// A Gateway being deleted (held by a finalizer here, as by foreground
// deletion) is left to the garbage collector: a deleted owned object is not
// re-created.
func TestDeletingGatewayLeftToGC(t *testing.T) {
	ns := namespace(t, "deleting")
	r := newReplica(t)
	start(t, r.ctrl.Start)
	cs := cluster.Client()
	gw := waypoint(ns, "going", deployer.WaypointClass)
	gw.Finalizers = []string{"example.com/hold"}
	createGateway(t, gw)
	createGateway(t, waypoint(ns, "staying", deployer.WaypointClass))
	eventually(t, "going deployed", hasCondition(t, ns, "going", "Programmed", "False", "Pending"))

	if err := gwClient().GatewayV1().Gateways(ns).Delete(t.Context(), "going", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deletion seen", func() (bool, string) {
		return getGateway(t, ns, "going").DeletionTimestamp != nil, ""
	})
	// The controller's cache must have the deletion too: a Gateway created
	// after it comes later on the same watch, so once the controller has
	// reconciled that one, it has seen "going" being deleted.
	createGateway(t, waypoint(ns, "marker", deployer.WaypointClass))
	r.settle(t, ns, "marker")
	if err := cs.AppsV1().Deployments(ns).Delete(t.Context(), "going", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// One worker, a FIFO queue: "going" (queued by the Deployment's
	// deletion and the requeue) is handled before "staying" settles.
	r.ctrl.Requeue(ns, "going")
	r.settle(t, ns, "staying")
	if _, err := cs.AppsV1().Deployments(ns).Get(t.Context(), "going", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the Deployment of a Gateway being deleted was re-created: %v", err)
	}
	g := getGateway(t, ns, "going")
	g.Finalizers = nil
	if _, err := gwClient().GatewayV1().Gateways(ns).Update(t.Context(), g, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// An unmanaged ServiceAccount and Service named as the Gateway (e.g. a
// Gateway "default" and the namespace's default ServiceAccount) are not
// taken over: nothing is applied, the Gateway says Programmed=False,
// Invalid, naming the object; once the namesakes are gone the deployer
// converges.
func TestUnmanagedNamesakeLeftAlone(t *testing.T) {
	const name = "default"
	ns := namespace(t, "namesake")
	cs := cluster.Client()
	// The namespace's default ServiceAccount (no controller-manager here
	// to make it), and a user's Service.
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if _, err := cs.CoreV1().ServiceAccounts(ns).Create(t.Context(), sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	userSvc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": "user"}},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "user"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	}
	if _, err := cs.CoreV1().Services(ns).Create(t.Context(), userSvc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	saBefore, err := cs.CoreV1().ServiceAccounts(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svcBefore, err := cs.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	r := newReplica(t)
	r.ctrl = deployer.New(deployer.Config{
		Kube: r.kube, Gateway: gwClient(), Image: "example.com/waypoint:test", Workers: 1,
		ConflictRecheck: 100 * time.Millisecond,
		AttachedRoutes: func(ns, name string) int32 {
			select {
			case r.reconc <- ns + "/" + name:
			default:
			}
			return r.routesN.Load()
		},
	})
	start(t, r.ctrl.Start)
	gw := createGateway(t, waypoint(ns, name, deployer.WaypointClass))
	eventually(t, "programmed false, invalid", hasCondition(t, ns, name, "Programmed", "False", "Invalid"))
	if msg := cond(getGateway(t, ns, name).Status.Conditions, "Programmed").Message; !strings.Contains(msg, "ServiceAccount "+ns+"/"+name) {
		t.Errorf("Programmed message %q does not name the ServiceAccount", msg)
	}
	// Rechecks (nothing else requeues it) keep leaving them alone.
	key := ns + "/" + name
	for range 5 {
		deadline := time.After(20 * time.Second)
		for got := ""; got != key; {
			select {
			case got = <-r.reconc:
			case <-deadline:
				t.Fatalf("no recheck of %s", key)
			}
		}
	}
	for k, n := range r.c.writes() {
		if strings.HasPrefix(k, "PATCH") || strings.HasPrefix(k, "DELETE") {
			t.Errorf("wrote %s (%d) while blocked", k, n)
		}
	}
	saAfter, err := cs.CoreV1().ServiceAccounts(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svcAfter, err := cs.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if saAfter.ResourceVersion != saBefore.ResourceVersion || len(saAfter.OwnerReferences) != 0 || len(saAfter.Labels) != 0 {
		t.Errorf("ServiceAccount changed: rv %s->%s, owners %v, labels %v", saBefore.ResourceVersion, saAfter.ResourceVersion, saAfter.OwnerReferences, saAfter.Labels)
	}
	if svcAfter.ResourceVersion != svcBefore.ResourceVersion || len(svcAfter.OwnerReferences) != 0 ||
		fmt.Sprint(svcAfter.Labels) != "map[app:user]" || fmt.Sprint(svcAfter.Spec.Selector) != "map[app:user]" {
		t.Errorf("Service changed: rv %s->%s, owners %v, labels %v, selector %v", svcBefore.ResourceVersion, svcAfter.ResourceVersion, svcAfter.OwnerReferences, svcAfter.Labels, svcAfter.Spec.Selector)
	}
	if _, err := cs.AppsV1().Deployments(ns).Get(t.Context(), name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("Deployment created while blocked: %v", err)
	}

	// With only the Service left, the message names it.
	if err := cs.CoreV1().ServiceAccounts(ns).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "message names the Service", func() (bool, string) {
		c := cond(getGateway(t, ns, name).Status.Conditions, "Programmed")
		return c.Reason == "Invalid" && strings.Contains(c.Message, "Service "+ns+"/"+name), c.Message
	})
	if err := cs.CoreV1().Services(ns).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deployed once unblocked", hasCondition(t, ns, name, "Programmed", "False", "Pending"))
	eventually(t, "deployment", func() (bool, string) {
		_, err := cs.AppsV1().Deployments(ns).Get(t.Context(), name, metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
	markReady(t, cs, ns, name)
	eventually(t, "programmed", hasCondition(t, ns, name, "Programmed", "True", "Programmed"))
	gotSA, err := cs.CoreV1().ServiceAccounts(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	checkOwned(t, gotSA, gw)
	gotSvc, err := cs.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	checkOwned(t, gotSvc, gw)
}
