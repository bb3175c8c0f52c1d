//go:build integration

package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	xdsresource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/integration/kubelet"
	"github.com/ambit-mesh/ambit/integration/mesh"
	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
)

// TestAmbitctl runs the ambitctl binary (go build, then exec) against the
// harness cluster (API server, controller manager, scheduler, registered
// kubelets serving the kubelet API):
//   - install then uninstall leaves the API's objects as they were;
//   - ambit installed by `ambitctl install`, istiod-lite run as a process
//     (integration/mesh) on the same API server, a capturing ztunnel per
//     node fronted by the DaemonSet's hostNetwork pod;
//   - ztunnel-config reaches a node's ztunnel by port-forward through the
//     API server and the kubelet (no --address) and shows the node's
//     workloads, certificates and, during traffic, its connections;
//   - waypoint apply --wait returns once the waypoint the deployer made runs
//     and istiod-lite reports it Programmed; waypoint status shows it;
//   - proxy-config reaches the waypoint's pod by port-forward and shows its
//     clusters and endpoints.
func TestAmbitctl(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 12*time.Minute)
	defer cancel()
	repo, _ := filepath.Abs("..")
	work := t.TempDir()
	bin := filepath.Join(work, "bin")
	ambitctl := filepath.Join(bin, "ambitctl")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", ambitctl, "github.com/ambit-mesh/ambit/cmd/ambitctl").CombinedOutput(); err != nil {
		t.Fatalf("go build ambitctl: %v\n%s", err, out)
	}
	if err := mesh.Build(ctx, repo, bin); err != nil {
		t.Fatal(err)
	}
	c := kube.Start(t, kube.Options{ControllerManager: true, Scheduler: true})
	cs := c.Client()
	kc := c.Kubeconfig()

	// runCtl execs ambitctl; it fails t on a non-zero exit unless mayFail.
	type result struct {
		stdout, stderr string
		code           int
	}
	runCtl := func(t *testing.T, mayFail bool, args ...string) result {
		t.Helper()
		cctx, ccancel := context.WithTimeout(ctx, 4*time.Minute)
		defer ccancel()
		cmd := exec.CommandContext(cctx, ambitctl, args...)
		cmd.Env = append(os.Environ(), "KUBECONFIG="+kc, "HOME="+work)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		r := result{stdout: out.String(), stderr: errb.String()}
		if ee, ok := err.(*exec.ExitError); ok {
			r.code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("ambitctl %s: %v", strings.Join(args, " "), err)
		}
		if r.code != 0 && !mayFail {
			t.Fatalf("ambitctl %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
		}
		return r
	}
	ctl := func(t *testing.T, args ...string) result { t.Helper(); return runCtl(t, false, args...) }

	// The controllers' first pass over the cluster (the default namespace's
	// service account and root CA) is done before the first snapshot.
	if !eventually(60*time.Second, func() bool {
		_, err1 := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		_, err2 := cs.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
		return err1 == nil && err2 == nil
	}) {
		t.Fatal("the controller manager did not fill the default namespace")
	}

	t.Run("install-uninstall", func(t *testing.T) {
		before := apiObjects(t, ctx, c)
		r := ctl(t, "install", "--wait=false")
		if !strings.Contains(r.stdout, "applied Deployment ambit-system/istiod-lite") {
			t.Errorf("install output:\n%s", r.stdout)
		}
		installed := apiObjects(t, ctx, c)
		added := minus(installed, before)
		for _, want := range []string{"apiextensions.k8s.io/CustomResourceDefinition /gateways.gateway.networking.k8s.io",
			"apps/Deployment ambit-system/istiod-lite", "apps/DaemonSet ambit-system/ztunnel", "/Namespace /ambit-system"} {
			if !slices.Contains(added, want) {
				t.Errorf("install did not create %s (created %v)", want, added)
			}
		}
		// Without --purge, the CRDs stay and nothing else.
		ctl(t, "uninstall")
		var left []string
		if !eventually(90*time.Second, func() bool {
			left = minus(apiObjects(t, ctx, c), before)
			// the CRDs, and the API server's APIServices of their groups
			return !slices.ContainsFunc(left, func(s string) bool {
				return !strings.HasPrefix(s, "apiextensions.k8s.io/CustomResourceDefinition ") && !strings.HasPrefix(s, "apiregistration.k8s.io/APIService ")
			})
		}) {
			t.Errorf("uninstall left behind more than the CRDs: %v", left)
		}
		if len(left) == 0 {
			t.Errorf("uninstall without --purge removed the CRDs")
		}
		// --purge: the API is as it was before install.
		ctl(t, "uninstall", "--purge")
		var gone []string
		if !eventually(90*time.Second, func() bool {
			after := apiObjects(t, ctx, c)
			left, gone = minus(after, before), minus(before, after)
			return len(left) == 0 && len(gone) == 0
		}) {
			t.Errorf("install, uninstall --purge: left behind %v, removed %v", left, gone)
		}
		t.Logf("install created %d objects (and the controllers theirs); uninstall --purge removed them all", len(added))
	})
	if t.Failed() {
		return
	}

	// ambit installed by ambitctl; istiod-lite runs as a process below,
	ctl(t, "install", "--wait=false")
	// not as the Deployment's pods. (Deleted rather than scaled to zero: its
	// ReplicaSet would adopt the pod that stands for the process.)
	if out, err := exec.CommandContext(ctx, "kubectl", "--kubeconfig", kc, "-n", "ambit-system", "delete", "deployment/istiod-lite").CombinedOutput(); err != nil {
		t.Fatalf("kubectl delete: %v\n%s", err, out)
	}

	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	tok, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	ikc := clientcmdapi.NewConfig()
	ikc.Clusters["c"] = &clientcmdapi.Cluster{Server: "https://127.0.0.1:6443", CertificateAuthorityData: c.Config().TLSClientConfig.CAData}
	ikc.AuthInfos["istiod-lite"] = &clientcmdapi.AuthInfo{Token: tok}
	ikc.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "istiod-lite"}
	ikc.CurrentContext = "c"
	istiodKubeconfig := filepath.Join(work, "istiod-lite.kubeconfig")
	if err := clientcmd.WriteToFile(*ikc, istiodKubeconfig); err != nil {
		t.Fatal(err)
	}
	// A ztunnel authenticates with a token bound to its node's DaemonSet pod.
	ztunnelPod := func(t *testing.T, node string) string {
		t.Helper()
		var pod string
		if !eventually(60*time.Second, func() bool {
			pods, err := cs.CoreV1().Pods("ambit-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
			for _, p := range pods.Items {
				if err == nil && p.Spec.NodeName == node && p.Status.Phase == corev1.PodRunning {
					pod = p.Name
				}
			}
			return pod != ""
		}) {
			t.Fatalf("no running ztunnel pod on %s", node)
		}
		return pod
	}
	ztunnelToken := func(node string) (string, error) {
		tok, err := c.ServiceAccountToken(ctx, "ambit-system", "ztunnel", []string{"istio-ca"}, ztunnelPod(t, node))
		if err != nil {
			return "", err
		}
		path := filepath.Join(work, "token-"+node)
		return path, os.WriteFile(path, []byte(tok), 0o600)
	}
	var fwd *forwarder
	m, err := mesh.Start(ctx, mesh.Options{
		BinDir: bin, WorkDir: work, Prefix: fmt.Sprintf("actl%d", os.Getpid()%10000),
		Nodes:      []netns.NodeConfig{{Name: "node-1"}, {Name: "node-2"}},
		Kubeconfig: istiodKubeconfig,
		CARoots:    filepath.Join(work, "ambit-ca-root.pem"),
		TokenFile:  ztunnelToken,
		IstiodArgs: []string{"--waypoint-xds-address", netip.AddrPortFrom(netns.UnderlayPrefix.Addr().Next(), 15012).String()},
		Setup: func(topo *netns.Topology) (err error) {
			fwd, err = forward(topo.Nodes[0].NS, "127.0.0.1:6443", strings.TrimPrefix(c.Config().Host, "https://"))
			return err
		},
		Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range []*mesh.Proc{m.Istiod(), m.Ztunnel("node-1"), m.Ztunnel("node-2")} {
				if p != nil {
					t.Logf("---- %s (tail)\n%s", p.Name, p.Tail(30))
				}
			}
		}
		m.Close()
		if fwd != nil {
			fwd.Close()
		}
	})
	var roots string
	if !eventually(60*time.Second, func() bool {
		cm, err := cs.CoreV1().ConfigMaps("ambit-system").Get(ctx, "ambit-ca-root", metav1.GetOptions{})
		if err == nil {
			roots = cm.Data["root-cert.pem"]
		}
		return roots != ""
	}) {
		t.Fatalf("istiod-lite published no ambit-ca-root ConfigMap\n%s", m.Istiod().Tail(30))
	}
	if err := os.WriteFile(filepath.Join(work, "ambit-ca-root.pem"), []byte(roots), 0o644); err != nil {
		t.Fatal(err)
	}

	// Registered kubelets serving the kubelet API; ambit's image (the
	// waypoint Deployment's) runs the waypoint just built. An enrolled pod
	// starts once its node's ztunnel captures it (the CNI step).
	prepare := func(ctx context.Context, pod *corev1.Pod, p *netns.Pod) error {
		ns, err := cs.CoreV1().Namespaces().Get(ctx, pod.Namespace, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ns.Labels["istio.io/dataplane-mode"] != "ambient" || pod.Labels["istio.io/dataplane-mode"] == "none" {
			return nil
		}
		pin := filepath.Join(m.PinPath(p.Node.Name), "links", "pod-"+p.HostIfname+"-ingress")
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
	runCtx, stopKubelets := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	kls := map[string]*kubelet.Kubelet{}
	for _, n := range m.Topo.Nodes {
		serverTLS, err := c.KubeletTLS(n.Name)
		if err != nil {
			t.Fatal(err)
		}
		kl := &kubelet.Kubelet{Client: cs, Node: n, Logger: log, Register: true, TLS: serverTLS,
			Prepare:      prepare,
			Images:       map[string]string{deployer.DefaultImage: filepath.Join(bin, "waypoint")},
			WorkDir:      filepath.Join(work, "kubelet-"+n.Name),
			RestartDelay: 2 * time.Second,
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
	for _, n := range m.Topo.Nodes {
		if err := m.StartZtunnel(ctx, n.Name); err != nil {
			t.Fatal(err)
		}
	}

	// An enrolled namespace: a client on node-1, a server on node-2.
	const ns = "shop"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ctl(t, "enroll", ns)
	if !eventually(30*time.Second, func() bool {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	}) {
		t.Fatal("no default service account in " + ns)
	}
	for _, p := range []struct{ name, node string }{{"client", "node-1"}, {"server", "node-2"}} {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: ns, Labels: map[string]string{"app": p.name}},
			Spec: corev1.PodSpec{NodeName: p.node, Containers: []corev1.Container{{
				Name: "app", Image: "ambit-app", Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
			}}},
		}
		if _, err := cs.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "server", Namespace: ns},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "server"}, Ports: []corev1.ServicePort{{
			Name: "tcp", Port: 80, TargetPort: intstr.FromInt32(8080),
		}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var client, server *netns.Pod
	if !eventually(90*time.Second, func() bool {
		client, server = kls["node-1"].Pod(ns+"/client"), kls["node-2"].Pod(ns+"/server")
		if client == nil || server == nil {
			return false
		}
		for _, name := range []string{"client", "server"} {
			p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil || !podReady(p) {
				return false
			}
		}
		return true
	}) {
		zs, _ := cs.CoreV1().Pods("ambit-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
		var zl []string
		for _, z := range zs.Items {
			zl = append(zl, fmt.Sprintf("%s on %s: %s deleted=%v", z.Name, z.Spec.NodeName, z.Status.Phase, z.DeletionTimestamp))
		}
		t.Fatalf("client and server pods not running and ready (ztunnel pods: %v)", zl)
	}
	serverAddr := net.JoinHostPort(server.IP.String(), "8080")

	t.Run("ztunnel-config", func(t *testing.T) {
		// The node's ztunnel knows both workloads (xDS from istiod-lite).
		var r result
		if !eventually(60*time.Second, func() bool {
			r = runCtl(t, true, "ztunnel-config", "workloads", "--node", "node-1")
			return r.code == 0 && strings.Contains(r.stdout, server.IP.String()) && strings.Contains(r.stdout, client.IP.String())
		}) {
			t.Fatalf("ztunnel-config workloads --node node-1 (port-forward to %s): no client and server rows: exit %d\n%s\n%s",
				ztunnelPod(t, "node-1"), r.code, r.stdout, r.stderr)
		}
		for _, l := range strings.Split(r.stdout, "\n") {
			f := strings.Fields(l)
			if len(f) > 0 && f[0] == ns && f[1] == "client" {
				if !slices.Contains(f, "spiffe://cluster.local/ns/shop/sa/default") || !slices.Contains(f, "node-1") || !slices.Contains(f, "HBONE") {
					t.Errorf("client's row: %q, want node-1, HBONE, its identity", l)
				}
			}
		}

		// During traffic: a connection from client to server held open.
		dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
		conn, err := client.NS.Dial(dctx, nil, "tcp", serverAddr)
		dcancel()
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		greeting, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil || !strings.HasPrefix(greeting, "ambit-app server ") {
			t.Fatalf("greeting through the mesh: %q, %v", greeting, err)
		}
		if _, err := conn.Write([]byte("hello\n")); err != nil {
			t.Fatal(err)
		}
		for _, node := range []string{"node-1", "node-2"} {
			if !eventually(30*time.Second, func() bool {
				r = runCtl(t, true, "ztunnel-config", "connections", "--node", node)
				for _, l := range strings.Split(r.stdout, "\n") {
					if strings.Contains(l, serverAddr) && strings.Contains(l, "ESTABLISHED") &&
						strings.Contains(l, "spiffe://cluster.local/ns/shop/sa/default") {
						return true
					}
				}
				return false
			}) {
				t.Errorf("ztunnel-config connections --node %s: no established connection to %s: exit %d\n%s\n%s", node, serverAddr, r.code, r.stdout, r.stderr)
			}
		}
		r = ctl(t, "ztunnel-config", "certificates", "--node", "node-1")
		if !strings.Contains(r.stdout, "spiffe://cluster.local/ns/shop/sa/default") || !strings.Contains(r.stdout, "VALID") {
			t.Errorf("ztunnel-config certificates --node node-1: no valid certificate of shop's default account:\n%s", r.stdout)
		}
		// JSON: the admin API's document as the ztunnel serves it.
		r = ctl(t, "ztunnel-config", "workloads", "--node", "node-2", "-o", "json")
		if !json.Valid([]byte(r.stdout)) || !strings.Contains(r.stdout, server.IP.String()) {
			t.Errorf("ztunnel-config workloads -o json:\n%s", r.stdout)
		}
		// Naming the pod (a positional argument) rather than the node.
		r = ctl(t, "ztunnel-config", "connections", ztunnelPod(t, "node-2"))
		if !strings.Contains(r.stdout, serverAddr) {
			t.Errorf("ztunnel-config connections %s: no connection to %s:\n%s", ztunnelPod(t, "node-2"), serverAddr, r.stdout)
		}
	})

	t.Run("waypoint", func(t *testing.T) {
		// --wait returns once istiod-lite reports the waypoint Programmed:
		// its Deployment (the deployer's), its pod (the controllers'), the
		// waypoint binary running in it (the kubelet's) and ready.
		start := time.Now()
		r := ctl(t, "waypoint", "apply", "-n", ns, "--enroll-namespace", "--wait", "--timeout=4m")
		t.Logf("waypoint apply --wait took %s:\n%s", time.Since(start).Round(time.Second), r.stdout)
		if !strings.Contains(r.stdout, "✔ Gateway shop/waypoint ready") {
			t.Errorf("waypoint apply --wait did not report the waypoint ready:\n%s\n%s", r.stdout, r.stderr)
		}
		// It is up: the Deployment's pod runs the waypoint, ready.
		wps, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "gateway.networking.k8s.io/gateway-name=waypoint"})
		if err != nil || len(wps.Items) != 1 || !podReady(&wps.Items[0]) || len(wps.Items[0].OwnerReferences) != 1 || wps.Items[0].OwnerReferences[0].Kind != "ReplicaSet" {
			t.Fatalf("after waypoint apply --wait: want one ready waypoint pod of a ReplicaSet: %v %+v", err, wps)
		}
		if kl := kls[wps.Items[0].Spec.NodeName]; kl == nil || kl.Pod(ns+"/"+wps.Items[0].Name) == nil {
			t.Fatalf("waypoint pod %s does not run on its node %q", wps.Items[0].Name, wps.Items[0].Spec.NodeName)
		}
		r = ctl(t, "waypoint", "status", "-n", ns)
		programmed := false
		for _, l := range strings.Split(r.stdout, "\n") {
			f := strings.Fields(l)
			programmed = programmed || (len(f) >= 5 && f[0] == ns && f[1] == "waypoint" && f[2] == "Programmed" && f[3] == "True")
		}
		if !programmed {
			t.Errorf("waypoint status: no Programmed=True row for shop/waypoint:\n%s", r.stdout)
		}

		// proxy-config: port-forward to the waypoint's pod.
		cluster := "outbound|80||server.shop.svc.cluster.local"
		if !eventually(60*time.Second, func() bool {
			r = runCtl(t, true, "proxy-config", "clusters", "--waypoint", "waypoint", "-n", ns)
			return r.code == 0 && strings.Contains(r.stdout, cluster)
		}) {
			t.Fatalf("proxy-config clusters --waypoint waypoint: no %s: exit %d\n%s\n%s", cluster, r.code, r.stdout, r.stderr)
		}
		r = ctl(t, "proxy-config", "endpoints", "--waypoint", "waypoint", "-n", ns)
		found := false
		for _, l := range strings.Split(r.stdout, "\n") {
			found = found || (strings.HasPrefix(l, cluster) && strings.Contains(l, serverAddr) && strings.Contains(l, "HEALTHY"))
		}
		if !found {
			t.Errorf("proxy-config endpoints: no healthy %s in %s:\n%s", serverAddr, cluster, r.stdout)
		}
		r = ctl(t, "proxy-config", "listeners", "--waypoint", "waypoint", "-n", ns, "-o", "json")
		if !json.Valid([]byte(r.stdout)) || !strings.Contains(r.stdout, "server.shop.svc.cluster.local") {
			t.Errorf("proxy-config listeners -o json:\n%s", r.stdout)
		}
	})

	t.Run("proxy-status", func(t *testing.T) {
		// istiod-lite's process runs in node-1's network: a hostNetwork pod
		// on node-1 stands for it (the kubelet runs nothing for it), so a
		// port-forward to its 127.0.0.1:15014 reaches the process.
		standIn := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "istiod-lite-node-1", Namespace: "ambit-system", Labels: map[string]string{"app": "istiod-lite"}},
			Spec: corev1.PodSpec{NodeName: "node-1", HostNetwork: true, ServiceAccountName: "istiod-lite",
				Containers: []corev1.Container{{Name: "istiod-lite", Image: "ambit", Command: []string{"/istiod-lite"}}}},
		}
		if _, err := cs.CoreV1().Pods("ambit-system").Create(ctx, standIn, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		// A stream authenticated as the waypoint (a token bound to its pod)
		// takes its listeners and rejects them.
		wps, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "gateway.networking.k8s.io/gateway-name=waypoint"})
		if err != nil || len(wps.Items) == 0 {
			t.Fatalf("no waypoint pod: %v", err)
		}
		wp := wps.Items[0]
		tok, err := c.ServiceAccountToken(ctx, ns, wp.Spec.ServiceAccountName, []string{"istio-ca"}, wp.Name)
		if err != nil {
			t.Fatal(err)
		}
		bundle, err := x509bundle.Parse(identity.DefaultTrustDomain, []byte(roots))
		if err != nil {
			t.Fatal(err)
		}
		node1 := m.Topo.Nodes[0].NS
		conn, err := grpc.NewClient(m.XDSAddr().String(),
			grpc.WithTransportCredentials(credentials.NewTLS(caclient.TLSConfig(bundle, identity.DefaultTrustDomain, identity.ControlPlane(identity.DefaultTrustDomain)))),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return node1.Dial(ctx, nil, "tcp", addr) }))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		sctx, scancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok))
		defer scancel()
		st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(sctx)
		if err != nil {
			t.Fatal(err)
		}
		node := &corev3.Node{Id: "nack-probe", Cluster: ns + "/waypoint"}
		if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: xdsresource.ListenerType, ResourceNamesSubscribe: []string{"*"}}); err != nil {
			t.Fatal(err)
		}
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("the waypoint's stream: %v", err)
		}
		if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: xdsresource.ListenerType, ResponseNonce: resp.GetNonce(),
			ErrorDetail: &rpcstatus.Status{Code: 3, Message: "listener main_internal: rejected by the test"}}); err != nil {
			t.Fatal(err)
		}
		var r result
		nacked := func(out string) bool {
			for _, l := range strings.Split(out, "\n") {
				if strings.Contains(l, "nack-probe") && strings.Contains(l, "Listener") && strings.Contains(l, "NACKED") {
					return strings.Contains(out, "listener main_internal: rejected by the test")
				}
			}
			return false
		}
		if !eventually(60*time.Second, func() bool {
			r = runCtl(t, true, "proxy-status")
			return r.code == 0 && nacked(r.stdout)
		}) {
			t.Fatalf("proxy-status (port-forward to %s): no NACK of the waypoint's listeners: exit %d\n%s\n%s", standIn.Name, r.code, r.stdout, r.stderr)
		}
		t.Logf("proxy-status:\n%s", r.stdout)
		for _, n := range []string{"node-1", "node-2"} {
			synced := false
			for _, l := range strings.Split(r.stdout, "\n") {
				synced = synced || (slices.Contains(strings.Fields(l), n) && strings.Contains(l, "SYNCED"))
			}
			if !synced {
				t.Errorf("proxy-status: no SYNCED row of %s's ztunnel:\n%s", n, r.stdout)
			}
		}
	})

	t.Run("describe-analyze", func(t *testing.T) {
		// describe: the live cluster's answer for the Service and its pod.
		r := ctl(t, "describe", "service", "server", "-n", ns)
		t.Logf("describe service server:\n%s", r.stdout)
		for _, want := range []string{
			"Waypoint:               shop/waypoint",
			"label istio.io/use-waypoint=waypoint on namespace shop",
			fmt.Sprintf("server %s ready, enrolled, ztunnel ambit-system/%s on node node-2", server.IP, ztunnelPod(t, "node-2")),
		} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("describe service server lacks %q", want)
			}
		}
		r = ctl(t, "describe", "pod", "client", "-n", ns)
		if !strings.Contains(r.stdout, "spiffe://cluster.local/ns/shop/sa/default") || !strings.Contains(r.stdout, ztunnelPod(t, "node-1")) {
			t.Errorf("describe pod client: want its identity and node-1's ztunnel:\n%s", r.stdout)
		}
		// analyze: the mesh as set up has no error; a Service bound to a
		// waypoint that does not exist is one, named with its fix.
		r = runCtl(t, true, "analyze", "-n", ns)
		if r.code != 0 || strings.Contains(r.stdout, "Error [") {
			t.Errorf("analyze -n shop on a correct mesh: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
		}
		if _, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "cart", Namespace: ns, Labels: map[string]string{"istio.io/use-waypoint": "missing"}},
			Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "cart"}, Ports: []corev1.ServicePort{{Port: 80}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		r = runCtl(t, true, "analyze", "-n", ns)
		if r.code != 1 || !strings.Contains(r.stdout, "Error [AMB0001] (Service shop/cart) istio.io/use-waypoint=missing names waypoint shop/missing") ||
			strings.Count(r.stdout, "Error [") != 1 {
			t.Errorf("analyze -n shop with a Service bound to a missing waypoint: want exit 1 and that one error: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("errors", func(t *testing.T) {
		// A pod that is not a proxy: one line naming what failed.
		r := runCtl(t, true, "proxy-config", "clusters", "--waypoint", "nope", "-n", ns)
		if line := strings.TrimSpace(r.stderr); r.code != 1 || strings.Contains(line, "\n") || !strings.Contains(line, "no running waypoint nope pod in namespace shop") {
			t.Errorf("proxy-config of a missing waypoint: want one line: exit %d: %s", r.code, r.stderr)
		}
		r = runCtl(t, true, "ztunnel-config", "workloads", "--node", "node-9")
		if line := strings.TrimSpace(r.stderr); r.code != 1 || strings.Contains(line, "\n") || !strings.Contains(line, "no running ztunnel pod on node node-9") {
			t.Errorf("ztunnel-config on a node without a ztunnel: want one line: exit %d: %s", r.code, r.stderr)
		}
	})
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// apiObjects lists every object of every listable resource the API serves,
// as "group/Kind namespace/name", but Events and Leases (the API server's
// and the controllers' own, renewed and expiring as they run).
func apiObjects(t *testing.T, ctx context.Context, c *kube.Cluster) []string {
	t.Helper()
	cfg := c.Config()
	cfg.WarningHandler = rest.NoWarnings{} // deprecated kinds (Endpoints, ComponentStatus) are listed too
	dc := discovery.NewDiscoveryClientForConfigOrDie(cfg)
	dyn := dynamic.NewForConfigOrDie(cfg)
	lists, err := dc.ServerPreferredResources()
	if err != nil && len(lists) == 0 {
		t.Fatal(err)
	}
	var out []string
	for _, l := range lists {
		gv, err := schema.ParseGroupVersion(l.GroupVersion)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range l.APIResources {
			if !slices.Contains(r.Verbs, "list") || strings.Contains(r.Name, "/") || r.Kind == "Event" || r.Kind == "Lease" {
				continue
			}
			items, err := dyn.Resource(gv.WithResource(r.Name)).List(ctx, metav1.ListOptions{})
			if apierrors.IsNotFound(err) || apierrors.IsMethodNotSupported(err) {
				continue // a CRD going away
			}
			if err != nil {
				t.Fatalf("list %s: %v", r.Name, err)
			}
			for _, o := range items.Items {
				out = append(out, fmt.Sprintf("%s/%s %s", gv.Group, r.Kind, types.NamespacedName{Namespace: o.GetNamespace(), Name: o.GetName()}))
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// minus returns the elements of a not in b (both sorted).
func minus(a, b []string) []string {
	var out []string
	for _, s := range a {
		if _, ok := slices.BinarySearch(b, s); !ok {
			out = append(out, s)
		}
	}
	return out
}
