package registry

import (
	"context"
	"io"
	"net"
	"net/url"
	"os/exec"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

// proxy is a TCP forwarder that can be cut, to make the API server
// unreachable for one client without stopping it.
type proxy struct {
	lis      net.Listener
	upstream string
	mu       sync.Mutex // guards down and conns
	down     bool
	conns    map[net.Conn]bool
}

func newProxy(t *testing.T, upstream string) *proxy {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{lis: lis, upstream: upstream, conns: map[net.Conn]bool{}}
	t.Cleanup(func() { lis.Close(); p.cut() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			if p.down {
				p.mu.Unlock()
				c.Close()
				continue
			}
			p.conns[c] = true
			p.mu.Unlock()
			go p.forward(c)
		}
	}()
	return p
}

func (p *proxy) forward(c net.Conn) {
	u, err := net.Dial("tcp", p.upstream)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	p.conns[u] = true
	p.mu.Unlock()
	go func() { _, _ = io.Copy(u, c); u.Close() }()
	_, _ = io.Copy(c, u)
	c.Close()
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
	}
	p.conns = map[net.Conn]bool{}
}

func (p *proxy) restore() {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
}

func kubectl(t *testing.T, kubeconfig string, args ...string) {
	t.Helper()
	out, err := exec.Command("kubectl", append([]string{"--kubeconfig", kubeconfig}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %v: %v\n%s", args, err, out)
	}
}

func podObj(name string, labels map[string]string, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "demo", Labels: labels},
		Spec:       corev1.PodSpec{NodeName: node, ServiceAccountName: "default", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}
}

// The kubelet's part: give a pod an IP and make it Ready.
func runPod(t *testing.T, ctx context.Context, cs kubernetes.Interface, p *corev1.Pod, ip string) {
	t.Helper()
	p, err := cs.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
	if _, err := cs.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func policy(name string, ports ...string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": name, "namespace": "demo"},
		"spec": map[string]any{
			"selector": map[string]any{"matchLabels": map[string]any{"app": "server"}},
			"rules":    []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"ports": toAny(ports)}}}}},
		},
	}}
}

func toAny(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

// TestKubernetesWatchers runs the registry against a real kube-apiserver,
// as the istiod-lite service account of manifests/ (so its RBAC is enough),
// through a proxy that the test cuts to make the API server disappear.
func TestKubernetesWatchers(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl not installed")
	}
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
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo", Labels: map[string]string{model.LabelDataplaneMode: model.DataplaneAmbient}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().ServiceAccounts("demo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err) // no controller-manager here to create it
	}
	runPod(t, ctx, admin, podObj("server-0", map[string]string{"app": "server"}, "node-1"), "10.1.1.10")
	runPod(t, ctx, admin, podObj("server-1", map[string]string{"app": "server"}, "node-2"), "10.1.2.10")
	// A pod that asks for a waypoint that does not exist.
	runPod(t, ctx, admin, podObj("lost", map[string]string{"app": "lost", model.LabelUseWaypoint: "nowhere"}, "node-2"), "10.1.2.11")
	svc, err := admin.CoreV1().Services("demo").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "server", Namespace: "demo"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "server"}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	aps := adminDyn.Resource(security.AuthorizationPolicies).Namespace("demo")
	if _, err := aps.Create(ctx, policy("good", "8080"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := aps.Create(ctx, policy("bad", "http"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// istiod-lite's identity, through the proxy.
	token, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.ConfigForToken(token)
	u, err := url.Parse(cfg.Host)
	if err != nil {
		t.Fatal(err)
	}
	px := newProxy(t, u.Host)
	cfg.Host = "https://" + px.lis.Addr().String()
	cfg.Timeout = 5 * time.Second
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

	uid := func(n string) string { return translate.WorkloadUID("", "demo", n) }
	s := store.Load()
	w := s.Workloads[uid("server-0")]
	if w == nil || !w.Enrolled || !w.Ready || w.Node != "node-1" || w.Addresses[0].String() != "10.1.1.10" {
		t.Fatalf("server-0: %+v", w)
	}
	if lost := s.Workloads[uid("lost")]; lost == nil || lost.Waypoint == nil || lost.Waypoint.Resolved() {
		t.Fatalf("lost: waypoint should be set and unresolved (fail closed): %+v", lost)
	}
	svcKey := "demo/server.demo.svc.cluster.local"
	if ms := s.Services[svcKey]; ms == nil || len(ms.Endpoints) != 2 || ms.VIPs[0].String() != svc.Spec.ClusterIP {
		t.Fatalf("service: %+v", ms)
	}
	// The invalid ALLOW stays, without its broken rule: it allows nothing
	// (fail closed) instead of vanishing and leaving the workload open.
	if bad := s.Policies["demo/bad"]; s.Policies["demo/good"] == nil || bad == nil || len(bad.Rules) != 0 {
		t.Fatalf("policies: %v", s.Policies)
	}

	// The invalid policy and the missing waypoint are reported as Events
	// on the objects (written with istiod-lite's RBAC).
	eventually(t, "Events", func() bool {
		evs, err := admin.CoreV1().Events("demo").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false
		}
		var bad, lost bool
		for _, e := range evs.Items {
			bad = bad || (e.InvolvedObject.Name == "bad" && e.InvolvedObject.Kind == "AuthorizationPolicy" && e.Reason == translate.ReasonInvalidPolicy && e.InvolvedObject.UID != "")
			lost = lost || (e.InvolvedObject.Name == "lost" && e.Reason == translate.ReasonWaypointNotFound)
		}
		return bad && lost
	})

	// One pod changes: the model follows, sharing everything else.
	before := store.Load()
	p, err := admin.CoreV1().Pods("demo").Get(ctx, "server-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Labels[model.LabelDataplaneMode] = model.DataplaneNone
	if _, err := admin.CoreV1().Pods("demo").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "opt-out", func() bool { return !store.Load().Workloads[uid("server-1")].Enrolled })
	if store.Load().Workloads[uid("server-0")] != before.Workloads[uid("server-0")] {
		t.Error("an unrelated workload was rebuilt")
	}

	// The API server disappears: the model stays as it was.
	px.cut()
	held := store.Load()
	if err := admin.CoreV1().Pods("demo").Delete(ctx, "server-0", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	if err := aps.Delete(ctx, "good", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	runPod(t, ctx, admin, podObj("server-2", map[string]string{"app": "server"}, "node-1"), "10.1.1.12")
	time.Sleep(2 * time.Second)
	if store.Load() != held {
		t.Fatal("the model changed while the API server was unreachable")
	}

	// It returns: the registry resyncs to what happened meanwhile.
	px.restore()
	eventually(t, "resync", func() bool {
		s := store.Load()
		ms := s.Services[svcKey]
		return s.Workloads[uid("server-0")] == nil && s.Workloads[uid("server-2")] != nil && s.Policies["demo/good"] == nil &&
			ms != nil && len(ms.Endpoints) == 2
	})
}
