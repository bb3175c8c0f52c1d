//go:build integration

package integration

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/integration/kubelet"
	"github.com/ambit-mesh/ambit/integration/mesh"
	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
)

// env is one cluster: a real kube-apiserver with manifests/ applied,
// istiod-lite watching it as its own service account, two nodes with a
// kubelet stand-in and a ztunnel (eBPF capture, certificates from the CA
// with a bound service-account token) each.
//
// On the harness cluster (onCluster, the default) kube-controller-manager
// and kube-scheduler run too and the kubelets are registered Nodes serving
// the kubelet API: pods are bound by the scheduler (a scenario that needs a
// pod on a given node says so with a nodeSelector on kubernetes.io/hostname),
// the ztunnel DaemonSet and the waypoints' Deployments become pods through
// the controllers, and Services get their EndpointSlices. The light harness
// (no controllers, no scheduler: pods name their node, the test stands in
// for the ReplicaSet controller) is kept for the scenarios in
// lightScenarios, and chosen for any with AMBIT_HARNESS=light.
type env struct {
	t         *testing.T
	cluster   *kube.Cluster
	cs        kubernetes.Interface
	m         *mesh.Mesh
	kls       map[string]*kubelet.Kubelet
	ips       sync.Map // "ns/name" -> pod IP
	aliases   sync.Map // a name the scenario uses ("shop/waypoint-0") -> the pod's "ns/name"
	work      string   // the test's directory: binaries, logs
	onCluster bool
}

// lightScenarios still run on the light harness: their setup creates pods
// by name on a node, standing in for the control plane's own pods. None
// does now; AMBIT_HARNESS=light still runs any scenario there.
var lightScenarios = map[string]bool{}

// onHarnessCluster says whether t's env runs on the harness cluster:
// $AMBIT_HARNESS (cluster or light) decides, else lightScenarios.
func onHarnessCluster(t *testing.T) bool {
	switch os.Getenv("AMBIT_HARNESS") {
	case "cluster":
		return true
	case "light":
		return false
	}
	return !lightScenarios[t.Name()]
}

const (
	shop  = "shop"  // enrolled
	plain = "plain" // not enrolled
	td    = "cluster.local"
)

func TestMesh(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and eBPF")
	}
	e := setup(t)
	ctx := context.Background()

	// Pods: the client and an intruder on node-1, servers on both nodes,
	// a plain (not enrolled) client and server.
	e.pod(ctx, shop, "client-1", "node-1", "client", nil, 0)
	e.pod(ctx, shop, "intruder-1", "node-1", "intruder", nil, 0)
	e.pod(ctx, shop, "server-1", "node-1", "server", map[string]string{"app": "server"}, 8080)
	e.pod(ctx, shop, "server-2", "node-2", "server", map[string]string{"app": "server"}, 8080)
	e.pod(ctx, plain, "curl-1", "node-1", "default", nil, 0)
	e.pod(ctx, plain, "web-2", "node-2", "web", nil, 8080)
	vip := e.service(ctx, shop, "server", map[string]string{"app": "server"}, 80, 8080)
	for _, p := range []string{"shop/client-1", "shop/intruder-1", "shop/server-1", "shop/server-2", "plain/curl-1", "plain/web-2"} {
		e.waitReady(ctx, p)
	}
	// Every ztunnel has every workload before traffic starts (a ztunnel that
	// does not know a destination yet passes the connection through).
	for _, p := range []string{"shop/client-1", "shop/intruder-1", "shop/server-1", "shop/server-2", "plain/curl-1", "plain/web-2"} {
		for _, node := range []string{"node-1", "node-2"} {
			if !eventually(10*time.Second, func() bool { return e.knows(node, e.ip(p)) }) {
				t.Fatalf("%s's ztunnel never learned of %s", node, p)
			}
		}
	}

	t.Run("1-enrolled-traffic-is-hbone-mtls", func(t *testing.T) {
		capFile := filepath.Join(t.TempDir(), "underlay.pcap")
		pc, err := e.m.Topo.Underlay.StartCapture("br0", capFile, "tcp")
		if err != nil {
			t.Fatal(err)
		}
		cross := e.exchange(t, "shop/client-1", e.addr("shop/server-2", 8080), 256<<10)
		same := e.exchange(t, "shop/client-1", e.addr("shop/server-1", 8080), 256<<10)
		viaSvc := e.exchange(t, "shop/client-1", netip.AddrPortFrom(vip, 80), 256<<10)
		packets, err := pc.Stop()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []exchangeResult{cross, same, viaSvc} {
			if r.err != nil {
				t.Fatalf("%s -> %s: %v", r.from, r.to, r.err)
			}
			if got := netip.MustParseAddrPort(r.res.PeerSeen).Addr(); got != e.ip("shop/client-1") {
				t.Errorf("%s saw peer %s, want the client's own IP %s (transparent delivery)", r.res.Server, got, e.ip("shop/client-1"))
			}
		}
		client := e.ip("shop/client-1")
		var hbonePackets int
		for _, p := range packets {
			if bytes.Contains(p.Payload, []byte(app.Marker)) {
				t.Errorf("plaintext payload on the underlay: %s", p)
			}
			if p.Src.Addr() == client || p.Dst.Addr() == client {
				t.Errorf("the enrolled client's own address crossed the underlay: %s", p)
			}
			if p.Dst == netip.AddrPortFrom(e.ip("shop/server-2"), 15008) {
				hbonePackets++
			}
		}
		if hbonePackets == 0 {
			t.Errorf("no packet to %s:15008 on the underlay (%d packets captured)", e.ip("shop/server-2"), len(packets))
		}
		// The identities, as both ztunnels saw them.
		clientID := "spiffe://" + td + "/ns/shop/sa/client"
		serverID := "spiffe://" + td + "/ns/shop/sa/server"
		for _, c := range []struct {
			r        exchangeResult
			dstNode  string
			wantPeer netip.Addr
		}{{cross, "node-2", e.ip("shop/server-2")}, {same, "node-1", e.ip("shop/server-1")}} {
			out := e.accessLog(t, "node-1", "outbound", c.r.local)
			if out.Route != "hbone" || out.SrcPrincipal != clientID || out.DstPrincipal != serverID || out.Outcome != "ok" {
				t.Errorf("node-1 outbound log for %s: %+v", c.r.to, out)
			}
			in := e.accessLog(t, c.dstNode, "inbound", c.r.local)
			if in.Via != "hbone" || in.SrcPrincipal != clientID || in.Outcome != "ok" || in.BytesRecv != 256<<10 {
				t.Errorf("%s inbound log for %s: %+v", c.dstNode, c.r.to, in)
			}
		}
		n, err := e.m.Metrics(ctx, "node-2", "istio_tcp_connections_opened_total", map[string]string{
			"reporter": "destination", "source_principal": clientID, "destination_principal": serverID,
			"connection_security_policy": "mutual_tls",
		})
		if err != nil || n < 1 {
			t.Errorf("node-2 counted %v mTLS connections from the client (%v)", n, err)
		}
	})

	t.Run("2-unenrolled-namespace-untouched", func(t *testing.T) {
		capFile := filepath.Join(t.TempDir(), "underlay.pcap")
		pc, err := e.m.Topo.Underlay.StartCapture("br0", capFile, "tcp")
		if err != nil {
			t.Fatal(err)
		}
		r := e.exchange(t, "plain/curl-1", e.addr("plain/web-2", 8080), 64<<10)
		packets, err := pc.Stop()
		if err != nil {
			t.Fatal(err)
		}
		if r.err != nil {
			t.Fatal(r.err)
		}
		var direct, marker int
		for _, p := range packets {
			if p.Src.Addr() == e.ip("plain/curl-1") && p.Dst == e.addr("plain/web-2", 8080) {
				direct++
			}
			if bytes.Contains(p.Payload, []byte(app.Marker)) {
				marker++
			}
		}
		if direct == 0 || marker == 0 {
			t.Errorf("plain traffic not seen as is on the underlay: %d direct packets, %d with the payload marker", direct, marker)
		}
		for _, node := range []string{"node-1", "node-2"} {
			if l := e.findAccessLog(t, node, "", r.local); l != nil {
				t.Errorf("%s's ztunnel handled a connection of an unenrolled pair: %+v", node, l)
			}
		}
	})

	t.Run("3-authorization-policy", func(t *testing.T) {
		if r := e.exchange(t, "shop/intruder-1", e.addr("shop/server-2", 8080), 1024); r.err != nil {
			t.Fatalf("before any policy the intruder should pass: %v", r.err)
		}
		e.kubectlApply(t, fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-allow-client, namespace: %s}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["%s/ns/shop/sa/client"]}}]
`, shop, td))
		var denied exchangeResult
		if !eventually(20*time.Second, func() bool {
			denied = e.exchange(t, "shop/intruder-1", e.addr("shop/server-2", 8080), 1024)
			return denied.err != nil
		}) {
			t.Fatal("the intruder is still allowed 20s after the policy")
		}
		if r := e.exchange(t, "shop/client-1", e.addr("shop/server-2", 8080), 64<<10); r.err != nil {
			t.Fatalf("the allowed client was refused: %v", r.err)
		}
		in := e.accessLog(t, "node-2", "inbound", denied.local)
		if in.Outcome != "denied" || in.SrcPrincipal != "spiffe://"+td+"/ns/shop/sa/intruder" {
			t.Errorf("denial log: %+v", in)
		}
		n, err := e.m.Metrics(ctx, "node-2", "istio_tcp_connections_closed_total", map[string]string{
			"reporter": "destination", "source_principal": "spiffe://" + td + "/ns/shop/sa/intruder", "response_flags": "DENY",
		})
		if err != nil || n < 1 {
			t.Errorf("denials counted: %v (%v)", n, err)
		}
	})

	t.Run("7-ztunnel-cannot-get-another-nodes-identity", func(t *testing.T) {
		// plain/web runs only on node-2: node-1's ztunnel may not have it.
		web := spiffeid.RequireFromString("spiffe://" + td + "/ns/plain/sa/web")
		if err := e.requestCert(t, "node-1", web); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("node-1 asking for %s: %v, want PermissionDenied", web, err)
		}
		if err := e.requestCert(t, "node-2", web); err != nil {
			t.Fatalf("node-2 asking for its own workload's %s: %v", web, err)
		}
		if log := e.m.Istiod().Tail(200); !strings.Contains(log, e.ztunnelPod(ctx, "node-1")) || !strings.Contains(log, web.String()) {
			t.Errorf("istiod-lite did not log the refusal with the caller and identity:\n%s", log)
		}
	})

	t.Run("4-control-plane-loss", func(t *testing.T) {
		held := e.holdOpen(t, "shop/client-1", e.addr("shop/server-2", 8080))
		defer held.Close()
		if err := e.m.StopIstiod(); err != nil {
			t.Fatal(err)
		}
		held.roundTrip(t)
		if r := e.exchange(t, "shop/client-1", netip.AddrPortFrom(vip, 80), 64<<10); r.err != nil {
			t.Fatalf("new connection with istiod-lite down: %v", r.err)
		}
		// A change while it is down reaches the ztunnels after it returns.
		e.pod(ctx, shop, "server-3", "node-2", "server", map[string]string{"app": "server"}, 8080)
		time.Sleep(2 * time.Second)
		if err := e.m.StartIstiod(ctx); err != nil {
			t.Fatal(err)
		}
		e.waitReady(ctx, "shop/server-3")
		// node-2's ztunnel captured the pod (the kubelet waited for it); the
		// resynced config reaches node-1's ztunnel too.
		if !eventually(10*time.Second, func() bool { return e.knows("node-1", e.ip("shop/server-3")) }) {
			t.Fatal("node-1's ztunnel never learned of the pod created while istiod-lite was down")
		}
		if r := e.exchange(t, "shop/client-1", e.addr("shop/server-3", 8080), 64<<10); r.err != nil {
			t.Fatalf("after resync, to the pod created while istiod-lite was down: %v", r.err)
		}
		held.roundTrip(t)
	})

	t.Run("5-ztunnel-loss-fails-closed", func(t *testing.T) {
		capFile := filepath.Join(t.TempDir(), "underlay.pcap")
		pc, err := e.m.Topo.Underlay.StartCapture("br0", capFile, "tcp")
		if err != nil {
			t.Fatal(err)
		}
		if err := e.m.StopZtunnel("node-1"); err != nil {
			t.Fatal(err)
		}
		r := e.exchange(t, "shop/client-1", e.addr("shop/server-2", 8080), 64<<10)
		if r.err == nil || !strings.Contains(r.err.Error(), "refused") {
			t.Errorf("with ztunnel down, an enrolled pod's connection: %v (want connection refused)", r.err)
		}
		// Connections keep being attempted through the restart: none may
		// slip out uncaptured while the new ztunnel loads and syncs.
		hammer, stopHammer := context.WithCancel(ctx)
		hammered := make(chan int)
		go func() {
			n := 0
			for hammer.Err() == nil {
				e.exchange(t, "shop/client-1", e.addr("shop/server-2", 8080), 1024)
				n++
				time.Sleep(10 * time.Millisecond)
			}
			hammered <- n
		}()
		start := time.Now()
		if err := e.m.StartZtunnel(ctx, "node-1"); err != nil {
			t.Fatal(err)
		}
		stopHammer()
		t.Logf("%d connection attempts during the restart", <-hammered)
		if !eventually(10*time.Second, func() bool {
			return e.exchange(t, "shop/client-1", e.addr("shop/server-2", 8080), 64<<10).err == nil
		}) {
			t.Fatal("traffic did not recover after the restart")
		}
		took := time.Since(start)
		t.Logf("traffic recovered %s after the ztunnel restart began", took.Round(time.Millisecond))
		if took > 5*time.Second {
			t.Errorf("recovery took %s, want within 5s", took)
		}
		packets, err := pc.Stop()
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range packets {
			if bytes.Contains(p.Payload, []byte(app.Marker)) || p.Src.Addr() == e.ip("shop/client-1") {
				t.Errorf("enrolled traffic left node-1 unprotected: %s", p)
			}
		}
	})

	t.Run("6-certificate-rotation-under-traffic", func(t *testing.T) {
		before := e.serial(t, "node-1", "spiffe://"+td+"/ns/shop/sa/client")
		var ok, failed atomic.Int64
		var firstErr atomic.Value
		stop := time.Now().Add(certTTL + 15*time.Second)
		var wg sync.WaitGroup
		for _, target := range []netip.AddrPort{e.addr("shop/server-2", 8080), netip.AddrPortFrom(vip, 80)} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(stop) {
					if r := e.exchange(t, "shop/client-1", target, 16<<10); r.err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, r.err.Error())
					} else {
						ok.Add(1)
					}
					time.Sleep(100 * time.Millisecond)
				}
			}()
		}
		wg.Wait()
		after := e.serial(t, "node-1", "spiffe://"+td+"/ns/shop/sa/client")
		t.Logf("%d connections over %s with %s certificates, %d failed", ok.Load(), certTTL+15*time.Second, certTTL, failed.Load())
		if failed.Load() != 0 {
			t.Errorf("%d connections failed during rotation; first: %v", failed.Load(), firstErr.Load())
		}
		if before == after {
			t.Errorf("the client's certificate did not rotate (serial %s)", before)
		}
	})
}

const certTTL = 2 * time.Minute

func setup(t *testing.T) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	onCluster := onHarnessCluster(t)
	c := kube.Start(t, kube.Options{ControllerManager: onCluster, Scheduler: onCluster})
	e := &env{t: t, cluster: c, cs: c.Client(), kls: map[string]*kubelet.Kubelet{}, onCluster: onCluster}
	if onCluster {
		t.Log("harness: the cluster (controller-manager, scheduler, registered nodes)")
	} else {
		t.Log("harness: light (API server and kubelet stand-ins only)")
	}
	repo, _ := filepath.Abs("..")
	// As an operator would: the CRDs first, then everything (the
	// GatewayClass needs its CRD established).
	kubectl := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("kubectl", append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	kubectl("apply", "--server-side", "-f", filepath.Join(repo, "manifests", "crds"))
	// Not `kubectl wait --all`: it fails on a CRD the API server has not yet
	// given a status (".status.conditions accessor error").
	if err := c.WaitCRDsEstablished(ctx); err != nil {
		t.Fatal(err)
	}
	kubectl("apply", "--server-side", "-k", filepath.Join(repo, "manifests"))
	if onCluster {
		// istiod-lite runs as a process below, not as the Deployment's
		// pods (deleted before any kubelet runs them).
		kubectl("-n", "ambit-system", "delete", "deployment/istiod-lite")
	}
	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: shop, Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}},
		{ObjectMeta: metav1.ObjectMeta{Name: plain}},
	} {
		if _, err := e.cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, sa := range []string{"shop/client", "shop/intruder", "shop/server", "plain/default", "plain/web"} {
		ns, name, _ := strings.Cut(sa, "/")
		// (the controller manager may have made a namespace's default)
		if _, err := e.cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}

	work := t.TempDir()
	e.work = work
	bin := filepath.Join(work, "bin")
	if err := mesh.Build(ctx, repo, bin); err != nil {
		t.Fatal(err)
	}
	// istiod-lite runs as its service account from manifests/, reaching the
	// API server through a forwarder inside node-1's namespace.
	kubeconfig := e.istiodKubeconfig(ctx, work)
	var fwd *forwarder
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	m, err := mesh.Start(ctx, mesh.Options{
		BinDir: bin, WorkDir: work, Prefix: fmt.Sprintf("ait%d", os.Getpid()%10000),
		Nodes:      []netns.NodeConfig{{Name: "node-1"}, {Name: "node-2"}},
		Kubeconfig: kubeconfig,
		CARoots:    filepath.Join(work, "ambit-ca-root.pem"),
		CertTTL:    certTTL,
		TokenFile:  e.ztunnelToken(t.Context(), work), // called at every ztunnel start
		// Waypoints reach istiod-lite where the ztunnels do (no cluster DNS).
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
	e.m = m
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range []*mesh.Proc{m.Istiod(), m.Ztunnel("node-1"), m.Ztunnel("node-2")} {
				if p != nil {
					t.Logf("---- %s (tail)\n%s", p.Name, p.Tail(40))
				}
			}
			keep := filepath.Join(os.TempDir(), fmt.Sprintf("ambit-integration-logs-%d", os.Getpid()))
			if err := exec.Command("cp", "-r", work, keep).Run(); err == nil {
				t.Logf("logs kept in %s", keep)
			}
		}
		m.Close()
		if fwd != nil {
			fwd.Close()
		}
	})

	// The trust bundle istiod-lite published, as the ztunnel DaemonSet
	// mounts it.
	var roots string
	if !eventually(30*time.Second, func() bool {
		cm, err := e.cs.CoreV1().ConfigMaps("ambit-system").Get(ctx, "ambit-ca-root", metav1.GetOptions{})
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

	runCtx, stopKubelets := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, n := range m.Topo.Nodes {
		// ambit's image runs the binaries just built (the waypoint's
		// Deployment uses it), with a projected token bound to its pod.
		kl := &kubelet.Kubelet{Client: e.cs, Node: n, Prepare: e.waitCaptured, Logger: log,
			Images:       map[string]string{deployer.DefaultImage: filepath.Join(bin, "waypoint")},
			Token:        e.podToken,
			WorkDir:      filepath.Join(work, "kubelet-"+n.Name),
			RestartDelay: 2 * time.Second,
		}
		if onCluster {
			serverTLS, err := c.KubeletTLS(n.Name)
			if err != nil {
				t.Fatal(err)
			}
			kl.Register, kl.TLS = true, serverTLS
		}
		e.kls[n.Name] = kl
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := kl.Start(runCtx); err != nil {
				t.Error(err)
			}
		}()
	}
	t.Cleanup(func() { stopKubelets(); wg.Wait() })

	// The ztunnel pods (hostNetwork) come first: their bound tokens
	// authenticate the nodes' ztunnels to the CA. On the cluster they are
	// the DaemonSet's, one per registered node.
	for _, n := range m.Topo.Nodes {
		if onCluster {
			e.waitReady(ctx, "ambit-system/"+e.ztunnelPod(ctx, n.Name))
			if err := m.StartZtunnel(ctx, n.Name); err != nil {
				t.Fatal(err)
			}
			continue
		}
		z := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-" + n.Name, Namespace: "ambit-system", Labels: map[string]string{"app": "ztunnel"}},
			Spec: corev1.PodSpec{NodeName: n.Name, ServiceAccountName: "ztunnel", HostNetwork: true,
				Containers: []corev1.Container{{Name: "ztunnel", Image: "ambit"}}},
		}
		if _, err := e.cs.CoreV1().Pods("ambit-system").Create(ctx, z, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		e.waitReady(ctx, "ambit-system/ztunnel-"+n.Name)
		if err := m.StartZtunnel(ctx, n.Name); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// istiodKubeconfig writes a kubeconfig for the istiod-lite service account,
// pointing at the forwarder in node-1.
func (e *env) istiodKubeconfig(ctx context.Context, dir string) string {
	tok, err := e.cluster.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		e.t.Fatal(err)
	}
	cfg := e.cluster.Config()
	kc := clientcmdapi.NewConfig()
	kc.Clusters["c"] = &clientcmdapi.Cluster{Server: "https://127.0.0.1:6443", CertificateAuthorityData: cfg.TLSClientConfig.CAData}
	kc.AuthInfos["istiod-lite"] = &clientcmdapi.AuthInfo{Token: tok}
	kc.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "istiod-lite"}
	kc.CurrentContext = "c"
	path := filepath.Join(dir, "istiod-lite.kubeconfig")
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		e.t.Fatal(err)
	}
	return path
}

// ztunnelPod is the name of node's ztunnel pod: on the cluster the
// DaemonSet's (waiting up to a minute for it), else ztunnel-<node>.
func (e *env) ztunnelPod(ctx context.Context, node string) string {
	e.t.Helper()
	if !e.onCluster {
		return "ztunnel-" + node
	}
	var name string
	if !eventually(60*time.Second, func() bool {
		pods, err := e.cs.CoreV1().Pods("ambit-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
		if err != nil {
			return false
		}
		for _, p := range pods.Items {
			if p.Spec.NodeName == node && p.DeletionTimestamp == nil {
				name = p.Name
			}
		}
		return name != ""
	}) {
		e.t.Fatalf("the ztunnel DaemonSet has no pod on %s", node)
	}
	return name
}

// ztunnelToken writes node's ztunnel pod's bound token (audience istio-ca),
// as the DaemonSet's projected volume would.
func (e *env) ztunnelToken(ctx context.Context, dir string) func(node string) (string, error) {
	return func(node string) (string, error) {
		tok, err := e.cluster.ServiceAccountToken(ctx, "ambit-system", "ztunnel", []string{"istio-ca"}, e.ztunnelPod(ctx, node))
		if err != nil {
			return "", err
		}
		path := filepath.Join(dir, "token-"+node)
		return path, os.WriteFile(path, []byte(tok), 0o600)
	}
}

// podToken mints pod's projected service-account token for audience,
// bound to the pod, as the kubelet would for a serviceAccountToken volume.
func (e *env) podToken(ctx context.Context, pod *corev1.Pod, audience string) (string, error) {
	var auds []string
	if audience != "" {
		auds = []string{audience}
	}
	return e.cluster.ServiceAccountToken(ctx, pod.Namespace, pod.Spec.ServiceAccountName, auds, pod.Name)
}

// waitCaptured is the kubelet's CNI step: an enrolled pod's workload starts
// only once its node's ztunnel has attached capture to its veth.
func (e *env) waitCaptured(ctx context.Context, pod *corev1.Pod, p *netns.Pod) error {
	e.ips.Store(pod.Namespace+"/"+pod.Name, p.IP)
	if pod.Namespace != shop || pod.Labels["istio.io/dataplane-mode"] == "none" {
		return nil // not enrolled (a waypoint's pod opts out)
	}
	pin := filepath.Join(e.m.PinPath(p.Node.Name), "links", "pod-"+p.HostIfname+"-ingress")
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

func (e *env) pod(ctx context.Context, ns, name, node, sa string, labels map[string]string, port int32) {
	e.t.Helper()
	c := corev1.Container{Name: "app", Image: "ambit-app"}
	if port != 0 {
		c.Ports = []corev1.ContainerPort{{ContainerPort: port}}
	}
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec:       corev1.PodSpec{ServiceAccountName: sa, Containers: []corev1.Container{c}},
	}
	e.placeOn(&p.Spec, node)
	if _, err := e.cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

// placeOn puts a pod on node: on the cluster as a user would, with a
// nodeSelector the scheduler honours; on the light harness by naming it.
func (e *env) placeOn(spec *corev1.PodSpec, node string) {
	if e.onCluster {
		spec.NodeSelector = map[string]string{corev1.LabelHostname: node}
		return
	}
	spec.NodeName = node
}

// key is the pod a scenario's name for it stands for (a Deployment's pod
// has a generated name): key itself unless aliased.
func (e *env) key(key string) string {
	if v, ok := e.aliases.Load(key); ok {
		return v.(string)
	}
	return key
}

// logFile is the log of pod key's container, on whichever node runs it.
func (e *env) logFile(key, container string) string {
	key = e.key(key)
	for _, kl := range e.kls {
		if kl.Pod(key) != nil {
			return kl.LogFile(key, container)
		}
	}
	return ""
}

func (e *env) service(ctx context.Context, ns, name string, selector map[string]string, port, target int32) netip.Addr {
	e.t.Helper()
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec:       corev1.ServiceSpec{Selector: selector, Ports: []corev1.ServicePort{{Name: "tcp", Port: port, TargetPort: intstr.FromInt32(target)}}},
	}
	s, err := e.cs.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return netip.MustParseAddr(s.Spec.ClusterIP)
}

func (e *env) waitReady(ctx context.Context, key string) {
	e.t.Helper()
	ns, name, _ := strings.Cut(key, "/")
	if !eventually(90*time.Second, func() bool {
		p, err := e.cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true
			}
		}
		return false
	}) {
		e.t.Fatalf("pod %s never became ready", key)
	}
}

func (e *env) ip(key string) netip.Addr {
	key = e.key(key)
	v, ok := e.ips.Load(key)
	if !ok {
		e.t.Fatalf("no IP for pod %s", key)
	}
	return v.(netip.Addr)
}

func (e *env) addr(key string, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(e.ip(key), port)
}

func (e *env) netns(key string) *netns.Pod {
	key = e.key(key)
	for _, kl := range e.kls {
		if p := kl.Pod(key); p != nil {
			return p
		}
	}
	e.t.Fatalf("pod %s is not running", key)
	return nil
}

type exchangeResult struct {
	from, to string
	local    netip.AddrPort
	res      app.Result
	err      error
}

var nextPort atomic.Uint32

// exchange runs one echo exchange from the pod key to dst from a fresh,
// known client port (so that access-log lines can be found).
func (e *env) exchange(t *testing.T, key string, dst netip.AddrPort, size int) exchangeResult {
	local := netip.AddrPortFrom(e.ip(key), uint16(20000+nextPort.Add(1)%30000))
	p := e.netns(key)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := app.Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
		return p.NS.Dial(ctx, &net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local)}, "tcp", dst.String())
	}, size)
	return exchangeResult{from: key, to: dst.String(), local: local, res: res, err: err}
}

// findAccessLog waits briefly for node's access-log line of the connection
// from local (direction "" matches any).
func (e *env) findAccessLog(t *testing.T, node, direction string, local netip.AddrPort) *mesh.AccessLog {
	deadline := time.Now().Add(2 * time.Second)
	for {
		logs, err := e.m.AccessLogs(node)
		if err != nil {
			t.Fatal(err)
		}
		for i := len(logs) - 1; i >= 0; i-- {
			if logs[i].Src == local.String() && (direction == "" || logs[i].Direction == direction) {
				return &logs[i]
			}
		}
		if time.Now().After(deadline) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (e *env) accessLog(t *testing.T, node, direction string, local netip.AddrPort) mesh.AccessLog {
	t.Helper()
	l := e.findAccessLog(t, node, direction, local)
	if l == nil {
		t.Fatalf("no %s access-log line on %s for %s", direction, node, local)
	}
	return *l
}

func (e *env) kubectlApply(t *testing.T, yaml string) {
	t.Helper()
	cmd := exec.Command("kubectl", "--kubeconfig", e.cluster.Kubeconfig(), "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(yaml)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply: %v\n%s", err, out)
	}
}

// requestCert asks the CA, from inside node's namespace and with node's
// ztunnel token, for a certificate of id.
func (e *env) requestCert(t *testing.T, node string, id spiffeid.ID) error {
	tokenFile, err := e.ztunnelToken(t.Context(), t.TempDir())(node)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := x509bundle.Load(spiffeid.RequireTrustDomainFromString(td), e.m.CARootsFile())
	if err != nil {
		t.Fatal(err)
	}
	ns := e.m.Topo.Node(node).NS
	client := &caclient.Client{Addr: e.m.XDSAddr().String(), Roots: roots, TokenFile: tokenFile,
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return ns.Dial(ctx, nil, "tcp", addr)
		})}}
	defer client.Close()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := certs.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = client.Issue(ctx, id, csr)
	return err
}

// knows reports whether node's ztunnel has a workload at ip.
func (e *env) knows(node string, ip netip.Addr) bool {
	var ws []struct {
		Addresses []netip.Addr `json:"addresses"`
	}
	if err := e.m.Admin(context.Background(), node, "/debug/workloads", &ws); err != nil {
		return false
	}
	for _, w := range ws {
		for _, a := range w.Addresses {
			if a == ip {
				return true
			}
		}
	}
	return false
}

// serial is the serial of node's ztunnel's certificate for id.
func (e *env) serial(t *testing.T, node, id string) string {
	t.Helper()
	var held []struct {
		Identity string `json:"identity"`
		Serial   string `json:"serial"`
	}
	if err := e.m.Admin(context.Background(), node, "/debug/certificates", &held); err != nil {
		t.Fatal(err)
	}
	for _, c := range held {
		if c.Identity == id {
			return c.Serial
		}
	}
	t.Fatalf("%s's ztunnel holds no certificate for %s: %+v", node, id, held)
	return ""
}

// held is a connection kept open across a disruption.
type held struct {
	c  net.Conn
	n  int
	mu sync.Mutex
}

func (e *env) holdOpen(t *testing.T, key string, dst netip.AddrPort) *held {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := e.netns(key).NS.Dial(ctx, nil, "tcp", dst.String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1)
	for buf[0] != '\n' { // the greeting line
		if _, err := c.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	h := &held{c: c}
	h.roundTrip(t)
	return h
}

func (h *held) roundTrip(t *testing.T) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.n++
	msg := []byte(fmt.Sprintf("%s round %d\n", app.Marker, h.n))
	h.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := h.c.Write(msg); err != nil {
		t.Fatalf("held connection, round %d: write: %v", h.n, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(h.c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("held connection, round %d: got %q, %v", h.n, got, err)
	}
}

func (h *held) Close() error { return h.c.Close() }

func eventually(d time.Duration, f func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if f() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// forwarder relays TCP from a listener inside a namespace to an address in
// the test's own namespace (the API server on the host's loopback).
type forwarder struct {
	ln net.Listener
	wg sync.WaitGroup
}

func forward(ns *netns.NS, listen, target string) (*forwarder, error) {
	ln, err := ns.Listen(context.Background(), nil, "tcp", listen)
	if err != nil {
		return nil, err
	}
	f := &forwarder{ln: ln}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				done := make(chan struct{})
				go func() { io.Copy(u, c); u.(*net.TCPConn).CloseWrite(); close(done) }()
				io.Copy(c, u)
				<-done
			}()
		}
	}()
	return f, nil
}

func (f *forwarder) Close() error {
	err := f.ln.Close()
	f.wg.Wait()
	return err
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
