//go:build integration && conformance

package integration

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/integration/kubelet"
	"github.com/ambit-mesh/ambit/integration/mesh"
	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
	"github.com/ambit-mesh/ambit/model"
)

// The namespaces the suite's mesh manifests create; ambit enrolls them and
// binds their Services to a waypoint of their own.
var conformanceNamespaces = []string{"gateway-conformance-mesh", "gateway-conformance-mesh-consumer"}

// conformanceProfile is one run of the suite: a Gateway API conformance
// profile, the features ambit declares for it, and where its report and
// every test's result line go (in conformance/).
type conformanceProfile struct {
	name     string // the suite's profile name
	features string // --supported-features
	report   string // the suite's report
	results  string // the PASS/FAIL/SKIP line of every test
}

// meshFeatures are the mesh features ambit declares in both profiles: the
// profiles' core and extended mesh features but MeshConsumerRoute (ambit's
// waypoints are destination-side: a route in the consumer's namespace has
// nowhere to run).
const meshFeatures = "Mesh,MeshClusterIPMatching,MeshHTTPRouteRewritePath,MeshHTTPRouteSchemeRedirect," +
	"MeshHTTPRouteRedirectPort,MeshHTTPRouteRedirectPath,MeshHTTPRouteBackendRequestHeaderModification," +
	"MeshHTTPRouteQueryParamMatching,MeshHTTPRouteNamedRouteRule"

// conformanceProfiles are the runs of TestConformance, in order. Failures
// are waypoint work, counted in the reports.
var conformanceProfiles = []conformanceProfile{
	{
		name: "MESH-HTTP",
		// plus the HTTPRoute features the suite's other mesh tests need.
		features: meshFeatures + ",HTTPRoute,HTTPRouteResponseHeaderModification,HTTPRouteParentRefPort," +
			"HTTPRoute303RedirectStatusCode,HTTPRoute307RedirectStatusCode,HTTPRoute308RedirectStatusCode",
		report:  "report-mesh-http.yaml",
		results: "results-mesh-http.txt",
	},
	{
		// GRPCRoute on a Service parent, served by the waypoint; the
		// HTTPRoute features are left out so that this run is the profile's
		// own tests (MeshBasic, MeshGRPCRouteWeight).
		name:     "MESH-GRPC",
		features: meshFeatures + ",GRPCRoute",
		report:   "report-mesh-grpc.yaml",
		results:  "results-mesh-grpc.txt",
	},
}

// conformanceNamespaceLabels label the suite's namespaces: enrolled, bound
// to their waypoint, and opted out of ambit's no-bypass default
// (model.LabelWaypointBypass), which the suite's MeshFrontend test expects
// (Istio's semantics: a Service's waypoint takes Service-addressed traffic;
// a request to the pod's IP goes straight to the pod).
var conformanceNamespaceLabels = map[string]string{
	model.LabelDataplaneMode:  model.DataplaneAmbient,
	model.LabelUseWaypoint:    "waypoint",
	model.LabelWaypointBypass: model.WaypointBypassAllow,
}

// conformanceNotes head each report (YAML comments: the suite's report
// format has no notes field).
const conformanceNotes = `# Notes (ambit):
# - Unsupported: MeshConsumerRoute. ambit's waypoints run on the destination
#   side; a route in the consumer's namespace has nowhere to run.
# - The suite's namespaces are labelled ambit.dev/waypoint-bypass=allow
#   (conformance/README.md). ambit's default is stricter than Istio's: a pod
#   behind a Service bound to a waypoint accepts connections to its
#   Service's target ports only from that waypoint, so MeshFrontend's
#   "Send to pod IP" is refused without the label.
`

// TestConformance runs the upstream Gateway API conformance suite
// (sigs.k8s.io/gateway-api/conformance, built by
// integration/apiserver/build-conformance.sh, its manifests unchanged) with
// each of conformanceProfiles (MESH-HTTP, then MESH-GRPC) against ambit on
// the harness cluster: the control plane with controller-manager and
// scheduler, registered kubelets with cluster DNS running Istio's echo
// server for the suite's echo image and the waypoint binary for ambit's
// image, istiod-lite and a capturing ztunnel per node. Each profile's report
// and results go to $AMBIT_CONFORMANCE_DIR (default conformance/ in the
// repository); $AMBIT_CONFORMANCE_PROFILES (comma-separated) runs only those.
func TestConformance(t *testing.T) {
	suiteBin := os.Getenv("AMBIT_CONFORMANCE_SUITE")
	if suiteBin == "" {
		t.Fatal("AMBIT_CONFORMANCE_SUITE is not set: run `make conformance` (integration/apiserver/build-conformance.sh builds the suite)")
	}
	repo, _ := filepath.Abs("..")
	outDir := os.Getenv("AMBIT_CONFORMANCE_DIR")
	if outDir == "" {
		outDir = filepath.Join(repo, "conformance")
	}
	profiles := conformanceProfiles
	if only := os.Getenv("AMBIT_CONFORMANCE_PROFILES"); only != "" {
		profiles = nil
		for _, p := range conformanceProfiles {
			if slices.Contains(strings.Split(only, ","), p.name) {
				profiles = append(profiles, p)
			}
		}
		if len(profiles) == 0 {
			t.Fatalf("AMBIT_CONFORMANCE_PROFILES=%s names no profile", only)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := kube.Start(t, kube.Options{ControllerManager: true, Scheduler: true})
	cs := c.Client()
	kubectl := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("kubectl", append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	kubectl("apply", "--server-side", "-f", filepath.Join(repo, "manifests", "crds"))
	if err := c.WaitCRDsEstablished(ctx); err != nil {
		t.Fatal(err)
	}
	kubectl("apply", "--server-side", "-k", filepath.Join(repo, "manifests"))
	// istiod-lite runs as a process (below), not as the Deployment's pods.
	kubectl("-n", "ambit-system", "scale", "deployment/istiod-lite", "--replicas=0")

	work := t.TempDir()
	bin := filepath.Join(work, "bin")
	if err := mesh.Build(ctx, repo, bin); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	tok, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["c"] = &clientcmdapi.Cluster{Server: "https://127.0.0.1:6443", CertificateAuthorityData: c.Config().TLSClientConfig.CAData}
	kc.AuthInfos["istiod-lite"] = &clientcmdapi.AuthInfo{Token: tok}
	kc.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "istiod-lite"}
	kc.CurrentContext = "c"
	istiodKubeconfig := filepath.Join(work, "istiod-lite.kubeconfig")
	if err := clientcmd.WriteToFile(*kc, istiodKubeconfig); err != nil {
		t.Fatal(err)
	}
	// A ztunnel authenticates with a token bound to its node's DaemonSet pod.
	ztunnelToken := func(node string) (string, error) {
		var pod string
		if !eventually(60*time.Second, func() bool {
			pods, err := cs.CoreV1().Pods("ambit-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
			for _, p := range pods.Items {
				if err == nil && p.Spec.NodeName == node {
					pod = p.Name
				}
			}
			return pod != ""
		}) {
			return "", fmt.Errorf("no ztunnel pod on %s", node)
		}
		tok, err := c.ServiceAccountToken(ctx, "ambit-system", "ztunnel", []string{"istio-ca"}, pod)
		if err != nil {
			return "", err
		}
		path := filepath.Join(work, "token-"+node)
		return path, os.WriteFile(path, []byte(tok), 0o600)
	}
	var fwd *forwarder
	m, err := mesh.Start(ctx, mesh.Options{
		BinDir: bin, WorkDir: work, Prefix: fmt.Sprintf("acf%d", os.Getpid()%10000),
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
			keep := filepath.Join(os.TempDir(), fmt.Sprintf("ambit-conformance-logs-%d", os.Getpid()))
			if err := exec.Command("cp", "-r", work, keep).Run(); err == nil {
				t.Logf("logs kept in %s", keep)
			}
		}
		m.Close()
		if fwd != nil {
			fwd.Close()
		}
	})
	var roots string
	if !eventually(30*time.Second, func() bool {
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

	// Kubelets: registered nodes with cluster DNS; the suite's echo image is
	// Istio's echo, ambit's image the waypoint just built. An enrolled pod's
	// workload starts once its node's ztunnel captures it (the CNI step).
	echoDir := istioEcho(t)
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
		kl := &kubelet.Kubelet{Client: cs, Node: n, Logger: log, Register: true, TLS: serverTLS, ClusterDNS: true, PodHostnames: true,
			Prepare:      prepare,
			Images:       map[string]string{echoImage: echoDir, deployer.DefaultImage: filepath.Join(bin, "waypoint")},
			Entrypoints:  map[string]string{echoImage: "server"},
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

	// The suite's namespaces, enrolled, each with its waypoint, before the
	// suite applies its manifests (it keeps these labels: --namespace-labels).
	for _, name := range conformanceNamespaces {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: conformanceNamespaceLabels}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		gw := fmt.Sprintf(`apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: %s, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
`, name)
		cmd := exec.Command("kubectl", "--kubeconfig", c.Kubeconfig(), "apply", "-f", "-")
		cmd.Stdin = strings.NewReader(gw)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("apply waypoint: %v\n%s", err, out)
		}
	}
	// No kube-proxy: ztunnel dials a waypoint at its Service's cluster IP,
	// which its pod holds on lo and every node routes to it.
	for _, name := range conformanceNamespaces {
		routeWaypointVIP(t, ctx, cs, kls, m.Topo, name)
	}

	if err := os.MkdirAll(outDir, 0o755); err != nil {
		t.Fatal(err)
	}
	var nsLabels []string
	for k, v := range conformanceNamespaceLabels {
		nsLabels = append(nsLabels, k+"="+v)
	}
	slices.Sort(nsLabels)
	for _, p := range profiles {
		t.Run(p.name, func(t *testing.T) {
			runConformanceSuite(t, suiteBin, c.Kubeconfig(), p, strings.Join(nsLabels, ","), outDir)
		})
	}
}

// runConformanceSuite runs the suite binary for profile p against the
// cluster of kubeconfig, logs its output, and writes its report (headed by
// conformanceNotes) and every test's result line into outDir.
func runConformanceSuite(t *testing.T, suiteBin, kubeconfig string, p conformanceProfile, nsLabels, outDir string) {
	report := filepath.Join(outDir, p.report)
	suite := exec.CommandContext(t.Context(), suiteBin,
		"-test.run", "^TestConformance$", "-test.v", "-test.timeout", "50m",
		"--conformance-profiles="+p.name,
		"--supported-features="+p.features,
		"--namespace-labels="+nsLabels,
		"--organization=ambit-mesh", "--project=ambit", "--url=https://github.com/ambit-mesh/ambit",
		"--version=dev", "--contact=https://github.com/ambit-mesh/ambit/issues",
		"--mode=default", "--allow-crds-mismatch", "--cleanup-base-resources=false",
		"--report-output="+report,
	)
	suite.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig)
	out, err := suite.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	suite.Stderr = suite.Stdout
	if err := suite.Start(); err != nil {
		t.Fatal(err)
	}
	var results strings.Builder
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		t.Log(line)
		if trimmed := strings.TrimLeft(line, " "); strings.HasPrefix(trimmed, "--- PASS") || strings.HasPrefix(trimmed, "--- FAIL") || strings.HasPrefix(trimmed, "--- SKIP") {
			results.WriteString(line + "\n")
		}
	}
	err = suite.Wait()
	if werr := os.WriteFile(filepath.Join(outDir, p.results), []byte(results.String()), 0o644); werr != nil {
		t.Error(werr)
	}
	if body, rerr := os.ReadFile(report); rerr != nil {
		t.Errorf("the suite wrote no report: %v", rerr)
	} else if werr := os.WriteFile(report, append([]byte(conformanceNotes), body...), 0o644); werr != nil {
		t.Error(werr)
	}
	t.Logf("conformance report: %s, results: %s", report, filepath.Join(outDir, p.results))
	if err != nil {
		t.Errorf("the conformance suite failed: %v (the report lists each test)", err)
	}
}

// routeWaypointVIP waits for the waypoint of namespace ns (its Service's
// cluster IP, its Deployment's running pod) and routes the cluster IP to the
// pod: on its lo, and from every node.
func routeWaypointVIP(t *testing.T, ctx context.Context, cs kubernetes.Interface, kls map[string]*kubelet.Kubelet, topo *netns.Topology, ns string) {
	t.Helper()
	var vip netip.Addr
	var p *netns.Pod
	if !eventually(120*time.Second, func() bool {
		s, err := cs.CoreV1().Services(ns).Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return false
		}
		vip, _ = netip.ParseAddr(s.Spec.ClusterIP)
		pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "gateway.networking.k8s.io/gateway-name=waypoint"})
		if err != nil || len(pods.Items) == 0 {
			return false
		}
		pod := pods.Items[0]
		if kl := kls[pod.Spec.NodeName]; kl != nil {
			p = kl.Pod(types.NamespacedName{Namespace: ns, Name: pod.Name}.String())
		}
		return vip.IsValid() && p != nil
	}) {
		t.Fatalf("no running waypoint with a cluster IP in %s", ns)
	}
	if err := p.NS.IP(fmt.Sprintf("addr add %s/32 dev lo", vip)); err != nil {
		t.Fatal(err)
	}
	for _, n := range topo.Nodes {
		route := fmt.Sprintf("route add %s/32 via %s", vip, p.Node.IP)
		if n == p.Node {
			route = fmt.Sprintf("route add %s/32 via %s dev %s", vip, p.IP, p.HostIfname)
		}
		if err := n.NS.IP(route); err != nil {
			t.Fatal(err)
		}
	}
}
