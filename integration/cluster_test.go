//go:build integration

package integration

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/integration/kubelet"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// clusterEnv is a nearly real cluster: kube-apiserver, kube-controller-manager
// and kube-scheduler, and one registered kubelet stand-in per node that
// serves the kubelet API.
type clusterEnv struct {
	t       *testing.T
	c       *kube.Cluster
	cs      kubernetes.Interface
	topo    *netns.Topology
	kls     map[string]*kubelet.Kubelet
	kubectl func(args ...string) (string, error)
}

func startCluster(t *testing.T, nodes ...string) *clusterEnv {
	t.Helper()
	c := kube.Start(t, kube.Options{ControllerManager: true, Scheduler: true})
	var ncs []netns.NodeConfig
	for _, n := range nodes {
		ncs = append(ncs, netns.NodeConfig{Name: n})
	}
	topo, err := netns.Build(netns.Config{Prefix: fmt.Sprintf("acl%d", os.Getpid()%10000), Nodes: ncs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	e := &clusterEnv{t: t, c: c, cs: c.Client(), topo: topo, kls: map[string]*kubelet.Kubelet{}}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	runCtx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	work := t.TempDir()
	for _, n := range topo.Nodes {
		serverTLS, err := c.KubeletTLS(n.Name)
		if err != nil {
			t.Fatal(err)
		}
		kl := &kubelet.Kubelet{Client: e.cs, Node: n, Logger: log, Register: true, TLS: serverTLS, ClusterDNS: true, PodHostnames: true,
			WorkDir:     filepath.Join(work, "kubelet-"+n.Name),
			Images:      map[string]string{echoImage: istioEcho(t)},
			Entrypoints: map[string]string{echoImage: "server"}}
		e.kls[n.Name] = kl
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := kl.Start(runCtx); err != nil {
				t.Error(err)
			}
		}()
	}
	t.Cleanup(func() { stop(); wg.Wait() })
	e.kubectl = func(args ...string) (string, error) {
		cmd := exec.Command("kubectl", append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			return out.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, errb.String())
		}
		return out.String(), nil
	}
	return e
}

// wait polls cond every 100ms until it holds, or fails the test after d
// saying what it waited for.
func (e *clusterEnv) wait(d time.Duration, what string, cond func(ctx context.Context) (bool, error)) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var last error
	for {
		ok, err := cond(ctx)
		if ok {
			return
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			e.t.Fatalf("after %s: no %s (last error: %v)", d, what, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// A Deployment created through the API server becomes pods (the
// Deployment and ReplicaSet controllers), bound to registered nodes (the
// scheduler), run by the kubelet stand-ins, Ready, in the Service's
// EndpointSlice (the EndpointSlice controller); kubectl exec, logs and
// port-forward reach them; scaling down and deleting the Deployment remove
// pods (the garbage collector) and endpoints.
func TestCluster(t *testing.T) {
	e := startCluster(t, "node-1", "node-2")
	ctx := t.Context()
	const ns = "web"
	start := time.Now()

	// Both nodes register Ready, with their leases.
	e.wait(30*time.Second, "two Ready nodes", func(ctx context.Context) (bool, error) {
		nodes, err := e.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		ready := 0
		for _, n := range nodes.Items {
			for _, c := range n.Status.Conditions {
				if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue && len(n.Spec.Taints) == 0 {
					ready++
				}
			}
		}
		return ready == 2, nil
	})
	if _, err := e.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The service-account and root-CA controllers fill the namespace.
	e.wait(30*time.Second, "default service account and kube-root-ca.crt in "+ns, func(ctx context.Context) (bool, error) {
		if _, err := e.cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return false, err
		}
		cm, err := e.cs.CoreV1().ConfigMaps(ns).Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
		return err == nil && strings.Contains(cm.Data["ca.crt"], "BEGIN CERTIFICATE"), err
	})

	labels := map[string]string{"app": "echo"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr(int32(2)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name: "echo", Image: "ambit-app", Ports: []corev1.ContainerPort{{Name: "tcp", ContainerPort: 8080}},
				}}},
			},
		},
	}
	if _, err := e.cs.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: ns},
		Spec: corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{
			Name: "tcp", Port: 80, TargetPort: intstr.FromString("tcp"),
		}}},
	}
	if _, err := e.cs.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.wait(90*time.Second, "Deployment echo with 2 available replicas", func(ctx context.Context) (bool, error) {
		d, err := e.cs.AppsV1().Deployments(ns).Get(ctx, "echo", metav1.GetOptions{})
		return err == nil && d.Status.AvailableReplicas == 2 && d.Status.ObservedGeneration == d.Generation, err
	})
	t.Logf("Deployment available %s after the cluster started", time.Since(start).Round(time.Millisecond))
	pods, err := e.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
	if err != nil {
		t.Fatal(err)
	}
	if len(pods.Items) != 2 {
		t.Fatalf("%d echo pods, want 2", len(pods.Items))
	}
	var ips []string
	for _, p := range pods.Items {
		if p.Spec.NodeName != "node-1" && p.Spec.NodeName != "node-2" {
			t.Errorf("pod %s bound to %q", p.Name, p.Spec.NodeName)
		}
		if len(p.OwnerReferences) != 1 || p.OwnerReferences[0].Kind != "ReplicaSet" {
			t.Errorf("pod %s owners %+v, want its ReplicaSet", p.Name, p.OwnerReferences)
		}
		if kl := e.kls[p.Spec.NodeName]; kl == nil || kl.Pod(ns+"/"+p.Name) == nil || kl.Pod(ns+"/"+p.Name).IP.String() != p.Status.PodIP {
			t.Errorf("pod %s (%s) is not running on its node %s", p.Name, p.Status.PodIP, p.Spec.NodeName)
		}
		ips = append(ips, p.Status.PodIP)
	}
	slices.Sort(ips)

	// The EndpointSlice controller publishes both, ready, on the named port.
	readyEndpoints := func(ctx context.Context) ([]string, error) {
		list, err := e.cs.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=echo"})
		if err != nil {
			return nil, err
		}
		var got []string
		for _, s := range list.Items {
			if len(s.Ports) != 1 || s.Ports[0].Port == nil || *s.Ports[0].Port != 8080 {
				continue
			}
			for _, ep := range s.Endpoints {
				if ep.Conditions.Ready != nil && *ep.Conditions.Ready && ep.TargetRef != nil && ep.TargetRef.Kind == "Pod" {
					got = append(got, ep.Addresses...)
				}
			}
		}
		slices.Sort(got)
		return got, nil
	}
	e.wait(30*time.Second, fmt.Sprintf("EndpointSlice of echo with %v ready on 8080", ips), func(ctx context.Context) (bool, error) {
		got, err := readyEndpoints(ctx)
		return slices.Equal(got, ips), err
	})

	// The pods serve: from one pod's namespace to the other's address.
	a, b := pods.Items[0], pods.Items[1]
	from := e.kls[a.Spec.NodeName].Pod(ns + "/" + a.Name)
	res, err := app.Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
		return from.NS.Dial(ctx, nil, "tcp", net.JoinHostPort(b.Status.PodIP, "8080"))
	}, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if res.Server != b.Name {
		t.Errorf("exchange with %s answered by %q", b.Name, res.Server)
	}

	// kubectl exec, logs, port-forward on a Deployment's pod.
	out, err := e.kubectl("-n", ns, "exec", "deploy/echo", "--", "hostname")
	if err != nil {
		t.Fatal(err)
	}
	if h := strings.TrimSpace(out); h != a.Name && h != b.Name {
		t.Errorf("exec hostname: %q, want one of the pods' names", h)
	}
	out, err = e.kubectl("-n", ns, "logs", "pod/"+a.Name)
	if err != nil || !strings.Contains(out, "serving echo") {
		t.Errorf("logs: %q, %v", out, err)
	}
	if !e.portForward(ctx, ns, "pod/"+b.Name, "8080", b.Name) {
		t.Error("port-forward did not reach the pod")
	}

	// Cluster DNS: the pod's resolver (its own /etc/resolv.conf, search
	// path) finds the Service's ClusterIP by its short name.
	svcIP := ""
	if s, err := e.cs.CoreV1().Services(ns).Get(ctx, "echo", metav1.GetOptions{}); err == nil {
		svcIP = s.Spec.ClusterIP
	}
	out, err = e.kubectl("-n", ns, "exec", a.Name, "--", "getent", "hosts", "echo")
	if err != nil || !strings.HasPrefix(out, svcIP+" ") || !strings.Contains(out, "echo.web.svc.cluster.local") {
		t.Errorf("getent hosts echo in %s: %q, %v; want %s echo.web.svc.cluster.local", a.Name, out, err, svcIP)
	}
	if out, err := e.kubectl("-n", ns, "exec", a.Name, "--", "getent", "hosts", "nope.web.svc.cluster.local"); err == nil {
		t.Errorf("getent hosts of a Service that does not exist: %q", out)
	}

	// The Gateway API conformance suite's echo Deployment (its image, its
	// arguments), run from Istio's echo server; the suite's requests are
	// its client, exec'd in the pod.
	echo := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "echo-v1", Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "echo-v1"}},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "echo-v1"}},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name: "echo", Image: echoImage,
					Args: []string{"--tcp=9090", "--port=8080", "--grpc=7070", "--port=8443", "--tls=8443", "--crt=/cert.crt", "--key=/cert.key"},
				}}},
			},
		},
	}
	if _, err := e.cs.AppsV1().Deployments(ns).Create(ctx, echo, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var echoIP string
	e.wait(60*time.Second, "a running echo-v1 pod", func(ctx context.Context) (bool, error) {
		pods, err := e.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo-v1"})
		if err != nil || len(pods.Items) != 1 || pods.Items[0].Status.PodIP == "" {
			return false, err
		}
		echoIP = pods.Items[0].Status.PodIP
		return true, nil
	})
	for _, url := range []string{"http://" + echoIP + ":8080/conformance", "grpc://" + echoIP + ":7070", "https://" + echoIP + ":8443/tls"} {
		var out string
		e.wait(30*time.Second, "an answer from Istio's echo server at "+url, func(context.Context) (bool, error) {
			out, err = e.kubectl("-n", ns, "exec", "deploy/echo-v1", "--", "client", url, "--insecure-skip-verify")
			return err == nil && strings.Contains(out, "Hostname=echo-v1-") && strings.Contains(out, "StatusCode=200"), err
		})
	}
	if err := e.cs.AppsV1().Deployments(ns).Delete(ctx, "echo-v1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// Scaling down: the ReplicaSet controller deletes one, the kubelet stops
	// it and removes it, the EndpointSlice keeps the other.
	if _, err := e.kubectl("-n", ns, "scale", "deploy/echo", "--replicas=1"); err != nil {
		t.Fatal(err)
	}
	e.wait(60*time.Second, "one echo pod left, alone in the EndpointSlice", func(ctx context.Context) (bool, error) {
		pods, err := e.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
		if err != nil || len(pods.Items) != 1 {
			return false, err
		}
		got, err := readyEndpoints(ctx)
		return len(got) == 1 && got[0] == pods.Items[0].Status.PodIP, err
	})

	// Deleting the Deployment: the garbage collector deletes its
	// ReplicaSet and that one's pod.
	if err := e.cs.AppsV1().Deployments(ns).Delete(ctx, "echo", metav1.DeleteOptions{PropagationPolicy: ptr(metav1.DeletePropagationBackground)}); err != nil {
		t.Fatal(err)
	}
	e.wait(60*time.Second, "echo's ReplicaSets and pods garbage-collected", func(ctx context.Context) (bool, error) {
		rss, err := e.cs.AppsV1().ReplicaSets(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
		if err != nil {
			return false, err
		}
		pods, err := e.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
		return err == nil && len(rss.Items) == 0 && len(pods.Items) == 0, err
	})
	for _, p := range pods.Items {
		if kl := e.kls[p.Spec.NodeName]; kl.Pod(ns+"/"+p.Name) != nil {
			t.Errorf("pod %s still runs on %s", p.Name, p.Spec.NodeName)
		}
	}
	if _, err := e.cs.CoreV1().Pods(ns).Get(ctx, a.Name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("pod %s: %v, want NotFound", a.Name, err)
	}
}

// echoImage is the Gateway API conformance suite's echo image.
const echoImage = "registry.k8s.io/gateway-api/echo-advanced:v1.5.1"

// istioEchoVersion is the istio.io/istio version whose echo server and
// client integration/apiserver/build-echo.sh builds (AMBIT_ISTIO_VERSION).
const istioEchoVersion = "v0.0.0-20260827124520-eed52ebb66ad"

// istioEcho returns the directory build-echo.sh fills (the echo image's
// root: server, client, cert.crt, cert.key), failing the test when it is
// not built: make tools builds it, never a test.
func istioEcho(t *testing.T) string {
	t.Helper()
	ver := os.Getenv("AMBIT_ISTIO_VERSION")
	if ver == "" {
		ver = istioEchoVersion
	}
	cache := os.Getenv("AMBIT_CACHE")
	if cache == "" {
		d, err := os.UserCacheDir()
		if err != nil {
			t.Fatal(err)
		}
		cache = filepath.Join(d, "ambit")
	}
	dir := filepath.Join(cache, "istio-echo-"+ver)
	for _, f := range []string{"server", "client", "cert.crt", "cert.key"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("Istio's echo is not built (%v): run `make tools` (integration/apiserver/build-echo.sh)", err)
		}
	}
	return dir
}

// portForward runs kubectl port-forward to target's port and reports
// whether an echo exchange through it is answered by server.
func (e *clusterEnv) portForward(ctx context.Context, ns, target, port, server string) bool {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", "--kubeconfig", e.c.Kubeconfig(), "-n", ns, "port-forward", target, ":"+port)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	defer func() { cancel(); cmd.Wait() }()
	buf := make([]byte, 4096)
	var seen []byte
	local := ""
	for local == "" {
		n, err := stdout.Read(buf)
		if err != nil {
			e.t.Logf("kubectl port-forward: %v: %s", err, stderr.String())
			return false
		}
		seen = append(seen, buf[:n]...)
		// "Forwarding from 127.0.0.1:PORT -> 8080"
		if _, rest, ok := strings.Cut(string(seen), "Forwarding from 127.0.0.1:"); ok {
			if p, _, ok := strings.Cut(rest, " "); ok {
				local = p
			}
		}
	}
	res, err := app.Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", "127.0.0.1:"+local)
	}, 64<<10)
	if err != nil {
		e.t.Logf("port-forward exchange: %v: %s", err, stderr.String())
		return false
	}
	return res.Server == server
}
