//go:build integration

package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/integration/kubelet"
	"github.com/ambit-mesh/ambit/integration/mesh"
	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
)

// TestManifests runs ambit's own manifests, unchanged (kubectl apply
// --server-side -k manifests/), on the harness cluster of two nodes: the
// controller manager makes istiod-lite's Deployment and ztunnel's DaemonSet
// into pods, the scheduler binds them, and the kubelet stand-ins run ambit's
// image (the binaries just built) in them with what the manifests ask for:
// env with fieldRefs, args, a mount namespace with the volumes at their
// paths (istiod-lite's in-cluster service-account credentials, ztunnel's
// projected istio-ca token, the CA roots ConfigMap, the node's bpffs and
// cgroup hostPaths), hostNetwork for ztunnel, and Services' cluster IPs
// (kubelet.ServiceProxy: istiod-lite.ambit-system.svc, and
// default/kubernetes for istiod-lite's client). Then, in an enrolled
// namespace, a client on node-1 reaches a server on node-2 over mTLS through
// both ztunnels (the destination ztunnel's metrics carry the client's SPIFFE
// identity), and a waypoint (a Gateway of class istio-waypoint) becomes the
// Deployment istiod-lite creates, a Ready pod, through which HTTP to a
// Service bound to it goes.
func TestManifests(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 12*time.Minute)
	defer cancel()
	repo, _ := filepath.Abs("..")
	work := t.TempDir()
	bin := filepath.Join(work, "bin")
	t0 := time.Now()
	if err := mesh.Build(ctx, repo, bin); err != nil {
		t.Fatal(err)
	}
	t.Logf("built ztunnel, istiod-lite, waypoint in %s", time.Since(t0).Round(time.Millisecond))

	c := kube.Start(t, kube.Options{ControllerManager: true, Scheduler: true})
	cs := c.Client()
	prefix := fmt.Sprintf("amf%d", os.Getpid()%10000)
	// The pod CIDRs the manifest's --pod-cidrs=10.244.0.0/16 names.
	topo, err := netns.Build(netns.Config{Prefix: prefix, Nodes: []netns.NodeConfig{
		{Name: "node-1", PodCIDR: netip.MustParsePrefix("10.244.1.0/24")},
		{Name: "node-2", PodCIDR: netip.MustParsePrefix("10.244.2.0/24")},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	// Each node's bpffs is a directory of the machine's (one kernel):
	// the DaemonSet's hostPath /sys/fs/bpf is this, per node.
	bpfDir := func(node string) string { return "/sys/fs/bpf/" + prefix + "-" + node }
	for _, n := range topo.Nodes {
		// A node has a default route (ztunnel finds its uplink by it).
		if err := n.NS.IP("route add default dev " + netns.Uplink); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(bpfDir(n.Name)) })
	}

	kubectl := func(stdin string, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, "kubectl", append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, out)
		}
		return string(out), nil
	}
	// An enrolled pod starts once its node's ztunnel captures it (the CNI
	// step): the capture's pinned link in the node's bpffs.
	prepare := func(ctx context.Context, pod *corev1.Pod, p *netns.Pod) error {
		ns, err := cs.CoreV1().Namespaces().Get(ctx, pod.Namespace, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ns.Labels["istio.io/dataplane-mode"] != "ambient" || pod.Labels["istio.io/dataplane-mode"] == "none" {
			return nil
		}
		pin := filepath.Join(bpfDir(p.Node.Name), "ambit", "links", "pod-"+p.HostIfname+"-ingress")
		deadline := time.Now().Add(60 * time.Second)
		for {
			if _, err := os.Stat(pin); err == nil {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("pod %s/%s: no capture on %s after 60s", pod.Namespace, pod.Name, p.HostIfname)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	runCtx, stopKubelets := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	kls := map[string]*kubelet.Kubelet{}
	for _, n := range topo.Nodes {
		serverTLS, err := c.KubeletTLS(n.Name)
		if err != nil {
			t.Fatal(err)
		}
		kl := &kubelet.Kubelet{Client: cs, Node: n, Logger: log, Register: true, TLS: serverTLS,
			ClusterDNS: true, PodHostnames: true, MountVolumes: true, RunHostNetwork: true, ServiceProxy: true, SecurityContext: true,
			HostPaths:    map[string]string{"/sys/fs/bpf": bpfDir(n.Name)},
			Images:       map[string]string{deployer.DefaultImage: bin}, // ambit's image: its programs by command[0]
			Prepare:      prepare,
			WorkDir:      filepath.Join(work, "kubelet-"+n.Name),
			RestartDelay: time.Second,
		}
		kls[n.Name] = kl
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := kl.Start(runCtx); err != nil {
				t.Error(err)
			}
		}()
	}
	t.Cleanup(func() { stopKubelets(); wg.Wait() })
	// containerLogs shows the tails of ambit's containers when t failed.
	t.Cleanup(func() {
		if keep := os.Getenv("AMBIT_TEST_LOGS"); keep != "" {
			// Every container's whole log, kept: AMBIT_TEST_LOGS=<dir>.
			out, err := exec.Command("sh", "-c", `mkdir -p "$1" && cp "$2"/kubelet-*/*/*.log "$1"/`, "sh", keep, work).CombinedOutput()
			t.Logf("container logs copied to %s: %v %s", keep, err, out)
		}
		if !t.Failed() {
			return
		}
		for _, ns := range []string{"ambit-system", "shop"} {
			pods, _ := cs.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{})
			if pods == nil {
				continue
			}
			for _, p := range pods.Items {
				kl := kls[p.Spec.NodeName]
				if kl == nil {
					continue
				}
				for _, ctr := range p.Spec.Containers {
					if b, err := os.ReadFile(kl.LogFile(p.Namespace+"/"+p.Name, ctr.Name)); err == nil {
						lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
						t.Logf("---- %s/%s %s on %s (tail)\n%s", p.Namespace, p.Name, ctr.Name, p.Spec.NodeName, strings.Join(lines[max(0, len(lines)-40):], "\n"))
					}
				}
			}
		}
	})
	t1 := time.Now()
	if !eventually(60*time.Second, func() bool {
		nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		_, err2 := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil && err2 == nil && len(nodes.Items) == 2
	}) {
		t.Fatal("no two registered nodes and default service account")
	}

	// ambit's manifests, as `kubectl apply --server-side -k manifests/`:
	// twice, as with any kustomization holding CRDs and their objects (the
	// GatewayClass), the second time once the CRDs are established.
	apply := func() (string, error) {
		return kubectl("", "apply", "--server-side", "-k", filepath.Join(repo, "manifests"))
	}
	if out, err := apply(); err != nil && !strings.Contains(out, `no matches for kind "GatewayClass"`) {
		t.Fatal(err)
	}
	if err := c.WaitCRDsEstablished(ctx); err != nil {
		t.Fatal(err)
	}
	if out, err := apply(); err != nil {
		t.Fatal(err)
	} else if !strings.Contains(out, "deployment.apps/istiod-lite serverside-applied") || !strings.Contains(out, "daemonset.apps/ztunnel serverside-applied") ||
		!strings.Contains(out, "gatewayclass.gateway.networking.k8s.io/istio-waypoint serverside-applied") {
		t.Fatalf("kubectl apply -k manifests/:\n%s", out)
	}
	var last string
	if !eventually(4*time.Minute, func() bool {
		d, err1 := cs.AppsV1().Deployments("ambit-system").Get(ctx, "istiod-lite", metav1.GetOptions{})
		ds, err2 := cs.AppsV1().DaemonSets("ambit-system").Get(ctx, "ztunnel", metav1.GetOptions{})
		if err1 != nil || err2 != nil {
			last = fmt.Sprint(err1, err2)
			return false
		}
		last = fmt.Sprintf("istiod-lite %d/%d available, ztunnel %d/%d ready", d.Status.AvailableReplicas, *d.Spec.Replicas, ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)
		return d.Status.AvailableReplicas == 2 && ds.Status.DesiredNumberScheduled == 2 && ds.Status.NumberReady == 2
	}) {
		t.Fatalf("ambit not up from its manifests after 4m: %s", last)
	}
	t.Logf("istiod-lite (2 replicas) and ztunnel (2 nodes) Ready %s after the nodes registered", time.Since(t1).Round(time.Millisecond))
	// They run as the manifests' pods: istiod-lite one per node (the
	// anti-affinity), a ztunnel per node in the node's network.
	pods, err := cs.CoreV1().Pods("ambit-system").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	perNode := map[string][]string{}
	for _, p := range pods.Items {
		if !podReady(&p) || len(p.OwnerReferences) != 1 {
			t.Errorf("pod %s: ready=%v owners %v", p.Name, podReady(&p), p.OwnerReferences)
		}
		perNode[p.Spec.NodeName] = append(perNode[p.Spec.NodeName], p.Labels["app"])
		if p.Labels["app"] == "ztunnel" && p.Status.PodIP != topo.Node(p.Spec.NodeName).IP.String() {
			t.Errorf("ztunnel pod %s: IP %s, want its node's", p.Name, p.Status.PodIP)
		}
	}
	t.Logf("ambit-system pods by node: %v", perNode)

	// An enrolled namespace: a client on node-1, a TCP server and an HTTP
	// server on node-2.
	const ns = "shop"
	if _, err := kubectl("", "create", "namespace", ns); err != nil {
		t.Fatal(err)
	}
	if _, err := kubectl("", "label", "namespace", ns, "istio.io/dataplane-mode=ambient"); err != nil {
		t.Fatal(err)
	}
	if !eventually(30*time.Second, func() bool {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	}) {
		t.Fatal("no default service account in " + ns)
	}
	for _, p := range []struct {
		name, node string
		http       bool
	}{{"client", "node-1", false}, {"server", "node-2", false}, {"web", "node-2", true}} {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: ns, Labels: map[string]string{"app": p.name}},
			Spec: corev1.PodSpec{NodeName: p.node, Containers: []corev1.Container{{
				Name: "app", Image: "ambit-app", Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
			}}},
		}
		if p.http {
			pod.Annotations = map[string]string{app.AnnotationProtocol: "http"}
		}
		if _, err := cs.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if p.name == "client" {
			continue
		}
		port := "tcp"
		if p.http {
			port = "http" // the waypoint's HTTP (Istio's port naming)
		}
		if _, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: ns},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": p.name}, Ports: []corev1.ServicePort{{
				Name: port, Port: 80, TargetPort: intstr.FromInt32(8080),
			}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var client, server *netns.Pod
	if !eventually(90*time.Second, func() bool {
		client, server = kls["node-1"].Pod(ns+"/client"), kls["node-2"].Pod(ns+"/server")
		for _, name := range []string{"client", "server", "web"} {
			p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil || !podReady(p) {
				return false
			}
		}
		return client != nil && server != nil
	}) {
		t.Fatal("client, server and web pods not running and ready (captured by their nodes' ztunnels)")
	}
	t.Logf("client, server, web Ready (captured) %s after the nodes registered", time.Since(t1).Round(time.Millisecond))
	svc, err := cs.CoreV1().Services(ns).Get(ctx, "server", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// Client -> server's cluster IP: captured on node-1, HBONE (mTLS) to
	// node-2's ztunnel, delivered from the client's address.
	vip := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	// First node-1's ztunnel learns the Service (xDS). Before that, a
	// connection to its cluster IP is passed through: the manifest's
	// --pod-cidrs does not name the service CIDR. ztunnel dials it from
	// the pod's address (IP_TRANSPARENT), and the harness's service proxy
	// (userspace, in its own namespace) answers on a link without ambit's
	// capture program, so that connection would hang here where a real
	// cluster's kube-proxy (DNAT) passes it in plaintext.
	if !eventually(60*time.Second, func() bool {
		body, err := scrapeIn(ctx, topo.Node("node-1").NS, "http://127.0.0.1:15000/debug/services")
		return err == nil && strings.Contains(body, svc.Spec.ClusterIP)
	}) {
		t.Fatalf("node-1's ztunnel does not know Service server (%s)", svc.Spec.ClusterIP)
	}
	var res app.Result
	attempts := 0
	if !eventually(60*time.Second, func() bool {
		attempts++
		ectx, ecancel := context.WithTimeout(ctx, 10*time.Second)
		defer ecancel()
		res, err = app.Exchange(ectx, func(ctx context.Context) (net.Conn, error) { return client.NS.Dial(ctx, nil, "tcp", vip) }, 32<<10)
		if err != nil {
			t.Logf("client -> server %s: %v", vip, err)
		}
		return err == nil
	}) {
		t.Fatalf("client -> server %s: %v", vip, err)
	}
	if res.Server != "server" {
		t.Errorf("client -> %s answered by %q, want server", vip, res.Server)
	}
	if host, _, _ := net.SplitHostPort(res.PeerSeen); host != client.IP.String() {
		t.Errorf("server saw the client as %q, want its pod address %s", res.PeerSeen, client.IP)
	}
	principal := `source_principal="spiffe://cluster.local/ns/shop/sa/default"`
	var lines []string
	for _, node := range []string{"node-2", "node-1"} {
		n := topo.Node(node)
		if !eventually(30*time.Second, func() bool {
			lines = nil
			body, err := scrapeIn(ctx, n.NS, fmt.Sprintf("http://%s/stats/prometheus", net.JoinHostPort(n.IP.String(), "15020")))
			if err != nil {
				return false
			}
			for _, l := range strings.Split(body, "\n") {
				if strings.HasPrefix(l, "istio_tcp_connections_opened_total{") && strings.Contains(l, principal) &&
					strings.Contains(l, `connection_security_policy="mutual_tls"`) && strings.Contains(l, `destination_workload="server"`) {
					lines = append(lines, l)
				}
			}
			return len(lines) > 0
		}) {
			t.Errorf("%s's ztunnel (the DaemonSet's pod) counted no mTLS connection from shop/sa/default to server", node)
		}
		t.Logf("%s's ztunnel: %s", node, strings.Join(lines, "\n"))
	}
	t.Logf("mTLS through both ztunnels %s after the nodes registered", time.Since(t1).Round(time.Millisecond))

	// A waypoint: istiod-lite's deployer makes its Deployment, the
	// controllers and the scheduler a pod, the kubelet runs /waypoint.
	t2 := time.Now()
	if _, err := kubectl(`apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
`, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	if _, err := kubectl("", "-n", ns, "label", "service", "web", "istio.io/use-waypoint=waypoint"); err != nil {
		t.Fatal(err)
	}
	var wp *corev1.Pod
	if !eventually(3*time.Minute, func() bool {
		d, err := cs.AppsV1().Deployments(ns).Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil || d.Status.AvailableReplicas < 1 {
			return false
		}
		wps, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "gateway.networking.k8s.io/gateway-name=waypoint"})
		if err != nil || len(wps.Items) != 1 || !podReady(&wps.Items[0]) {
			return false
		}
		wp = &wps.Items[0]
		return true
	}) {
		t.Fatal("istiod-lite's waypoint Deployment shop/waypoint has no Ready pod after 3m")
	}
	if len(wp.OwnerReferences) != 1 || wp.OwnerReferences[0].Kind != "ReplicaSet" || wp.Spec.Containers[0].Image != deployer.DefaultImage {
		t.Errorf("waypoint pod %s: owners %v, image %s", wp.Name, wp.OwnerReferences, wp.Spec.Containers[0].Image)
	}
	t.Logf("waypoint pod %s Ready on %s %s after the Gateway", wp.Name, wp.Spec.NodeName, time.Since(t2).Round(time.Millisecond))
	wpNet := kls[wp.Spec.NodeName].Pod(ns + "/" + wp.Name)
	if wpNet == nil {
		t.Fatalf("waypoint pod %s does not run on %s", wp.Name, wp.Spec.NodeName)
	}
	web, err := cs.CoreV1().Services(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return client.NS.Dial(ctx, nil, network, addr)
		}}}
	match := map[string]string{"destination_service": "web.shop.svc.cluster.local", "response_code": "200"}
	var got string
	if !eventually(90*time.Second, func() bool {
		n, err := mesh.MetricsIn(ctx, wpNet.NS, "istio_requests_total", match)
		if err != nil || n < 1 {
			// Until the waypoint counts one: the route through it may
			// still be propagating (ztunnel's config, then the
			// waypoint's).
			resp, err := hc.Get("http://" + net.JoinHostPort(web.Spec.ClusterIP, "80") + "/")
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				got = fmt.Sprintf("%d %s %q", resp.StatusCode, resp.Header.Get("X-Ambit-App"), b)
			} else {
				got = err.Error()
			}
			return false
		}
		return true
	}) {
		t.Fatalf("no request to web counted by the waypoint (last answer: %s)", got)
	}
	// And a request now: answered by web, counted by the waypoint.
	before, _ := mesh.MetricsIn(ctx, wpNet.NS, "istio_requests_total", match)
	resp, err := hc.Get("http://" + net.JoinHostPort(web.Spec.ClusterIP, "80") + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(bufio.NewReader(resp.Body))
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Ambit-App") != "web" {
		t.Errorf("GET web: %d %q %q", resp.StatusCode, resp.Header.Get("X-Ambit-App"), body)
	}
	if !eventually(10*time.Second, func() bool {
		after, _ := mesh.MetricsIn(ctx, wpNet.NS, "istio_requests_total", match)
		return after >= before+1
	}) {
		t.Errorf("the waypoint did not count the request (istio_requests_total %v)", before)
	}
	t.Logf("HTTP through the waypoint %s after the Gateway; whole test after build %s", time.Since(t2).Round(time.Millisecond), time.Since(t1).Round(time.Millisecond))
}

// scrapeIn GETs url from the network namespace ns.
func scrapeIn(ctx context.Context, ns *netns.NS, url string) (string, error) {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return ns.Dial(ctx, nil, network, addr)
		}}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
