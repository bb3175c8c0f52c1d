package waypoint_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
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
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/credential"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
	"github.com/ambit-mesh/ambit/istiod-lite/server"
	"github.com/ambit-mesh/ambit/istiod-lite/xds"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/waypoint"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// The cluster's names and addresses. There is no kubelet: the test writes
// pod IPs itself, and the backends' pod IPs are the loopback addresses their
// servers listen on.
const (
	kns      = "shop"
	kgw      = "waypoint"
	kwpPod   = "waypoint-0"
	kwpIP    = "127.0.0.10"
	kv1IP    = "127.0.0.11"
	kv2IP    = "127.0.0.12"
	kcliIP   = "127.0.0.20"
	knode    = "node-1"
	kfront   = "reviews"
	khost    = kfront + "." + kns + ".svc.cluster.local"
	kv1      = "reviews-v1"
	kv2      = "reviews-v2"
	kmissing = "reviews-v3" // never created
)

// TestKubeRouteWeights runs the L7 control path end to end against a real
// kube-apiserver: istiod-lite in Kubernetes mode (as its service account,
// xDS and CA on TLS, callers authenticated by TokenReview), a waypoint
// Proxy wired as cmd/waypoint wires it (pod-bound token, certificate from
// istiod-lite's CA, Delta ADS), and HBONE clients holding an SVID from the
// same CA. An HTTPRoute's 90/10 split is served; a patch to 50/50 reaches
// the waypoint's active config within a second (measured, logged); an
// HTTPRoute with a missing backend answers 500 for that backend's share.
func TestKubeRouteWeights(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Fatal("kubectl not installed (apt-get install kubectl)")
	}
	tStart := time.Now()
	c := kube.Start(t, kube.Options{})
	ctx := t.Context()
	for _, args := range [][]string{
		{"apply", "--server-side", "-f", "../manifests/namespace.yaml", "-f", "../manifests/crds/", "-f", "../manifests/istiod-lite-rbac.yaml"},
		nil, // wait for the CRDs
		{"apply", "--server-side", "-f", "../manifests/gatewayclass.yaml"},
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
	t.Logf("API server up, manifests applied in %v", time.Since(tStart).Round(time.Millisecond))
	admin := c.Client()
	gwAdmin := gwclient.NewForConfigOrDie(c.Config())
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}

	// Backends: real HTTP servers on the pods' (loopback) addresses.
	hits := map[string]int{}
	var hitsMu sync.Mutex // guards hits
	backend := func(name, ip string) uint16 {
		ln, err := net.Listen("tcp", ip+":0")
		must("backend listen", err)
		s := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hitsMu.Lock()
			hits[name]++
			hitsMu.Unlock()
			io.WriteString(w, name)
		}))
		s.Listener.Close()
		s.Listener = ln
		s.Start()
		t.Cleanup(s.Close)
		return uint16(ln.Addr().(*net.TCPAddr).Port)
	}
	v1Port, v2Port := backend(kv1, kv1IP), backend(kv2, kv2IP)

	// The namespace is enrolled; the backends opt out, so the waypoint
	// reaches them over plain TCP (no ztunnel here).
	_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: kns,
		Labels: map[string]string{model.LabelDataplaneMode: model.DataplaneAmbient}}}, metav1.CreateOptions{})
	must("namespace", err)
	for _, sa := range []string{kgw, "reviews", "client"} {
		_, err := admin.CoreV1().ServiceAccounts(kns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
		must("service account "+sa, err)
	}
	pod := func(name, sa, ip string, labels map[string]string) {
		t.Helper()
		p, err := admin.CoreV1().Pods(kns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: kns, Labels: labels},
			Spec:       corev1.PodSpec{NodeName: knode, ServiceAccountName: sa, Containers: []corev1.Container{{Name: "c", Image: "x"}}},
		}, metav1.CreateOptions{})
		must("pod "+name, err)
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
		_, err = admin.CoreV1().Pods(kns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		must("pod status "+name, err)
	}
	none := model.DataplaneNone
	pod(kwpPod, kgw, kwpIP, map[string]string{auth.LabelGatewayName: kgw, model.LabelDataplaneMode: none})
	pod("reviews-v1-0", "reviews", kv1IP, map[string]string{"app": "reviews", "version": "v1", model.LabelDataplaneMode: none})
	pod("reviews-v2-0", "reviews", kv2IP, map[string]string{"app": "reviews", "version": "v2", model.LabelDataplaneMode: none})
	pod("client-0", "client", kcliIP, map[string]string{"app": "client"})
	service := func(name string, labels, selector map[string]string, ports ...corev1.ServicePort) *corev1.Service {
		t.Helper()
		s, err := admin.CoreV1().Services(kns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: kns, Labels: labels},
			Spec:       corev1.ServiceSpec{Selector: selector, Ports: ports},
		}, metav1.CreateOptions{})
		must("service "+name, err)
		return s
	}
	httpPort := func(target uint16) corev1.ServicePort {
		return corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(int32(target))}
	}
	wpSvc := service(kgw, nil, map[string]string{auth.LabelGatewayName: kgw}, corev1.ServicePort{Name: "mesh", Port: 15008})
	service(kv1, nil, map[string]string{"app": "reviews", "version": "v1"}, httpPort(v1Port))
	service(kv2, nil, map[string]string{"app": "reviews", "version": "v2"}, httpPort(v2Port))
	front := service(kfront, map[string]string{model.LabelUseWaypoint: kgw}, map[string]string{"app": "reviews"}, httpPort(v1Port))
	frontVIP := netip.MustParseAddr(front.Spec.ClusterIP)
	t.Logf("waypoint Service %s, frontend VIP %s", wpSvc.Spec.ClusterIP, frontVIP)
	_, err = gwAdmin.GatewayV1().Gateways(kns).Create(ctx, &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: kgw, Namespace: kns, Labels: map[string]string{model.LabelWaypointFor: "service"}},
		Spec: gwv1.GatewaySpec{GatewayClassName: deployer.WaypointClass,
			Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
	}, metav1.CreateOptions{})
	must("gateway", err)
	routes := gwAdmin.GatewayV1().HTTPRoutes(kns)
	_, err = routes.Create(ctx, httpRoute(kfront, kfront, weighted{kv1, 90}, weighted{kv2, 10}), metav1.CreateOptions{})
	must("httproute", err)

	// istiod-lite in Kubernetes mode, as its own service account, one
	// replica (no election): it also runs the deployer and the status
	// writer.
	logs := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs:\n%s", logs.tail(80))
		}
	})
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	istiodToken, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	must("istiod-lite token", err)
	rctx, cancel := context.WithCancel(ctx)
	addrs := make(chan [2]string, 1)
	done := make(chan error, 1)
	go func() {
		done <- server.Run(rctx, server.Config{Rest: c.ConfigForToken(istiodToken), Listen: "127.0.0.1:0", Admin: "127.0.0.1:0",
			DisableLeaderElection: true, Logger: log.With("proc", "istiod-lite"),
			Listening: func(g, a string) { addrs <- [2]string{g, a} }})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("istiod-lite: %v", err)
		}
	})
	var xdsAddr, istiodAdmin string
	select {
	case a := <-addrs:
		xdsAddr, istiodAdmin = a[0], a[1]
	case err := <-done:
		t.Fatalf("istiod-lite: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("istiod-lite did not start")
	}

	// The roots, as a waypoint mounts them: the ConfigMap istiod-lite
	// publishes.
	td := identity.DefaultTrustDomain
	cm, err := admin.CoreV1().ConfigMaps(ca.DefaultNamespace).Get(ctx, ca.DefaultBundleConfigMap, metav1.GetOptions{})
	must("roots ConfigMap", err)
	dir := t.TempDir()
	rootsFile := filepath.Join(dir, "roots.pem")
	must("write roots", os.WriteFile(rootsFile, []byte(cm.Data[ca.BundleConfigMapKey]), 0o600))
	roots := &caclient.BundleFile{Path: rootsFile, TrustDomain: td}
	if _, err := x509bundle.Parse(td, []byte(cm.Data[ca.BundleConfigMapKey])); err != nil {
		t.Fatalf("roots: %v", err)
	}
	// tokenFile mints a pod-bound token (audience istio-ca), as kubelet
	// projects it.
	tokenFile := func(sa, podName string) *credential.Bearer {
		t.Helper()
		tok, err := c.ServiceAccountToken(ctx, kns, sa, []string{auth.DefaultAudience}, podName)
		must("token for "+podName, err)
		path := filepath.Join(dir, podName+".token")
		must("write token", os.WriteFile(path, []byte(tok), 0o600))
		return &credential.Bearer{File: path}
	}

	// The waypoint, wired as cmd/waypoint wires it.
	wpID, err := identity.Workload(td, kns, kgw)
	must("waypoint identity", err)
	wpToken := tokenFile(kgw, kwpPod)
	wpCA := &caclient.Client{Addr: xdsAddr, TrustDomain: td, Roots: roots, Credential: wpToken}
	t.Cleanup(func() { wpCA.Close() })
	wpCerts := &certs.Manager{Issuer: wpCA, Logger: log.With("proc", "waypoint", "component", "certs")}
	t.Cleanup(func() { wpCerts.Close() })
	wpCerts.SetIdentities([]spiffeid.ID{wpID})
	proxy, err := waypoint.New(waypoint.Config{Identity: wpID, Certs: wpCerts, Logger: log.With("proc", "waypoint")})
	must("waypoint", err)
	applied := make(chan struct{}, 1) // a snapshot was applied (wakes the pollers)
	xc := &xdsclient.Client{
		Addr:       xdsAddr,
		TLS:        caclient.TLSConfig(roots, td, spiffeid.ID{}),
		NodeInfo:   &corev3.Node{Id: kwpPod, Cluster: kns + "/" + kgw},
		Credential: wpToken,
		Types:      waypoint.XDSTypes(),
		OnUpdate: func(s *xdsclient.Snapshot) error {
			err := proxy.OnXDSUpdate(s)
			select {
			case applied <- struct{}{}:
			default:
			}
			return err
		},
		Logger: log.With("proc", "waypoint", "component", "xds"),
	}
	ls := waypoint.Listeners{HBONE: listenOn(t, kwpIP), Admin: listenOn(t, "127.0.0.1"), Ready: listenOn(t, "127.0.0.1")}
	wpHBONE := ls.HBONE.Addr().(*net.TCPAddr).AddrPort()
	adminURL, readyURL := "http://"+ls.Admin.Addr().String(), "http://"+ls.Ready.Addr().String()
	wctx, wcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := proxy.Serve(wctx, ls); err != nil {
			t.Errorf("waypoint: %v", err)
		}
	}()
	go func() {
		defer wg.Done()
		if err := xc.Start(wctx); err != nil {
			t.Errorf("waypoint xds: %v", err)
		}
	}()
	t.Cleanup(func() { wcancel(); wg.Wait() })

	// Ready, with the route's split in its active config.
	t0 := time.Now()
	waitUntil(t, 30*time.Second, applied, func() (bool, string) {
		resp, err := http.Get(readyURL + "/healthz/ready")
		if err != nil {
			return false, err.Error()
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return false, fmt.Sprintf("ready: %d %s", resp.StatusCode, b)
		}
		w := routeWeights(t, adminURL)
		return w[kv1] == 90 && w[kv2] == 10, fmt.Sprintf("weights %v", w)
	})
	t.Logf("waypoint ready with the 90/10 route %v after its start (%v into the test)", time.Since(t0).Round(time.Millisecond), time.Since(tStart).Round(time.Millisecond))

	// A client workload: its SVID is issued by istiod-lite's CA to its own
	// pod-bound token (a Workload caller may obtain its own identity).
	cliID, err := identity.Workload(td, kns, "client")
	must("client identity", err)
	cliCA := &caclient.Client{Addr: xdsAddr, TrustDomain: td, Roots: roots, Credential: tokenFile("client", "client-0")}
	t.Cleanup(func() { cliCA.Close() })
	cliCerts := &certs.Manager{Issuer: cliCA}
	t.Cleanup(func() { cliCerts.Close() })
	cliCerts.SetIdentities([]spiffeid.ID{cliID})
	dialer := &hbone.Dialer{Certs: cliCerts}
	t.Cleanup(func() { dialer.Close() })
	client := func(vip netip.Addr) *http.Client {
		tgt := netip.AddrPortFrom(vip, 80)
		rt := &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return dialer.Dial(ctx, hbone.DialRequest{Source: cliID, Peers: []spiffeid.ID{wpID}, Addr: wpHBONE, Target: tgt,
					ForwardedFor: netip.AddrPortFrom(netip.MustParseAddr(kcliIP), 40000)})
			},
			MaxIdleConnsPerHost: 16,
		}
		t.Cleanup(rt.CloseIdleConnections)
		return &http.Client{Transport: rt, Timeout: 10 * time.Second}
	}
	cli := client(frontVIP)

	// split sends n requests (8 at a time) and counts the answers by body
	// (a backend's name) or status.
	split := func(c *http.Client, host string, n int) map[string]int {
		t.Helper()
		t0 := time.Now()
		var mu sync.Mutex // guards got, firstErr
		got := map[string]int{}
		var firstErr error
		next := make(chan struct{})
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for range next {
					key, err := getOnce(ctx, c, "http://"+host+"/")
					mu.Lock()
					if err != nil && firstErr == nil {
						firstErr = err
					}
					got[key]++
					mu.Unlock()
				}
			})
		}
		for range n {
			next <- struct{}{}
		}
		close(next)
		wg.Wait()
		if firstErr != nil {
			t.Fatalf("requests through the waypoint: %v (answers %v)", firstErr, got)
		}
		t.Logf("%d requests to %s through the waypoint in %v: %v", n, host, time.Since(t0).Round(time.Millisecond), got)
		return got
	}
	within := func(what string, got map[string]int, n int, want map[string]int) {
		t.Helper()
		for k, pct := range want {
			share := 100 * float64(got[k]) / float64(n)
			if share < float64(pct)-3 || share > float64(pct)+3 {
				t.Errorf("%s: %s got %.1f%% of %d requests, want %d%% ±3 (answers %v)", what, k, share, n, pct, got)
			}
		}
		total := 0
		for _, v := range got {
			total += v
		}
		if total != n || len(got) != len(want) {
			t.Errorf("%s: answers %v, want only %v", what, got, want)
		}
	}

	const n = 1000
	within("90/10", split(cli, khost, n), n, map[string]int{kv1: 90, kv2: 10})

	// Patch the route's weights and measure until the waypoint's active
	// config has them: 90/10 -> 50/50, then four more changes ending at
	// 50/50, for a spread.
	var ps struct {
		Waypoints map[string]xds.WaypointStatus `json:"waypoints"`
	}
	setWeights := func(w1, w2 uint32) time.Duration {
		t.Helper()
		patch := []byte(fmt.Sprintf(`{"spec":{"rules":[{"backendRefs":[{"name":%q,"port":80,"weight":%d},{"name":%q,"port":80,"weight":%d}]}]}}`, kv1, w1, kv2, w2))
		before := time.Now()
		_, err := routes.Patch(ctx, kfront, "application/merge-patch+json", patch, metav1.PatchOptions{})
		written := time.Now()
		must("patch httproute", err)
		var applyAt time.Time
		waitUntil(t, 5*time.Second, applied, func() (bool, string) {
			w := routeWeights(t, adminURL)
			applyAt = time.Now()
			return w[kv1] == w1 && w[kv2] == w2, fmt.Sprintf("weights %v, want %d/%d", w, w1, w2)
		})
		total := applyAt.Sub(before)
		r := func(d time.Duration) time.Duration { return d.Round(100 * time.Microsecond) }
		breakdown := ""
		getJSON(t, "http://"+istiodAdmin+"/debug/proxy-status", &ps)
		if pub := ps.Waypoints[kns+"/"+kgw].PublishedAt; pub.After(before) && pub.Before(applyAt) {
			breakdown = fmt.Sprintf("; istiod-lite published it at +%v, the waypoint had it %v later", r(pub.Sub(before)), r(applyAt.Sub(pub)))
		}
		t.Logf("weights -> %d/%d in the waypoint's active config %v after the API write began (the write took %v)%s",
			w1, w2, r(total), r(written.Sub(before)), breakdown)
		if total > time.Second {
			t.Errorf("the weight change to %d/%d took %v to reach the waypoint, want < 1s", w1, w2, total)
		}
		return total
	}
	var took []time.Duration
	for _, w := range [][2]uint32{{50, 50}, {80, 20}, {50, 50}, {80, 20}, {50, 50}} {
		took = append(took, setWeights(w[0], w[1]))
	}
	first := took[0]
	slices.Sort(took)
	t.Logf("route weight change API write -> waypoint active config: first (90/10 -> 50/50) %v; %d changes: min %v, median %v, max %v",
		first.Round(100*time.Microsecond), len(took), took[0].Round(100*time.Microsecond), took[len(took)/2].Round(100*time.Microsecond), took[len(took)-1].Round(100*time.Microsecond))
	within("50/50", split(cli, khost, n), n, map[string]int{kv1: 50, kv2: 50})

	// A route with a backend that does not exist: 500 for its share (GAMMA),
	// and the route's status says so (ResolvedRefs=False, BackendNotFound).
	broken := service("broken", map[string]string{model.LabelUseWaypoint: kgw}, map[string]string{"app": "reviews"}, httpPort(v1Port))
	_, err = routes.Create(ctx, httpRoute("broken", "broken", weighted{kv1, 50}, weighted{kmissing, 50}), metav1.CreateOptions{})
	must("httproute broken", err)
	brokenHost := "broken." + kns + ".svc.cluster.local"
	waitUntil(t, 10*time.Second, applied, func() (bool, string) {
		w := routeWeightsFor(t, adminURL, brokenHost)
		return len(w) == 2, fmt.Sprintf("weights of %s: %v", brokenHost, w)
	})
	const m = 400
	within("50/50 with a missing backend", split(client(netip.MustParseAddr(broken.Spec.ClusterIP)), brokenHost, m), m,
		map[string]int{kv1: 50, "500": 50})
	var reason string
	waitUntil(t, 10*time.Second, nil, func() (bool, string) {
		r, err := routes.Get(ctx, "broken", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, p := range r.Status.Parents {
			if p.ControllerName != deployer.ControllerName {
				continue
			}
			if c := meta.FindStatusCondition(p.Conditions, string(gwv1.RouteConditionResolvedRefs)); c != nil && c.Status == metav1.ConditionFalse {
				reason = c.Reason
				return true, ""
			}
		}
		return false, fmt.Sprintf("status %+v", r.Status)
	})
	if reason != string(gwv1.RouteReasonBackendNotFound) {
		t.Errorf("broken route: ResolvedRefs reason %q, want %s", reason, gwv1.RouteReasonBackendNotFound)
	}
	t.Logf("broken route status: ResolvedRefs=False, reason %s", reason)
	t.Logf("whole test %v", time.Since(tStart).Round(time.Millisecond))
}

type weighted struct {
	name   string
	weight int32
}

// httpRoute is a GAMMA route: parent the Service parent, port 80, one rule
// splitting across backends.
func httpRoute(name, parent string, backends ...weighted) *gwv1.HTTPRoute {
	svcKind, core, port := gwv1.Kind("Service"), gwv1.Group(""), gwv1.PortNumber(80)
	var refs []gwv1.HTTPBackendRef
	for _, b := range backends {
		refs = append(refs, gwv1.HTTPBackendRef{BackendRef: gwv1.BackendRef{
			BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(b.name), Port: &port},
			Weight:                 &b.weight,
		}})
	}
	return &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: kns},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: &core, Kind: &svcKind, Name: gwv1.ObjectName(parent), Port: &port}}},
			Rules:           []gwv1.HTTPRouteRule{{BackendRefs: refs}},
		},
	}
}

// getOnce GETs url and returns the body (a backend's name) when 200, else
// the status code.
func getOnce(ctx context.Context, c *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "error", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "error", err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprint(resp.StatusCode), nil
	}
	return string(b), nil
}

// routeWeights returns the weights of the frontend's route in the
// waypoint's active config (admin /config_dump), by backend Service name.
func routeWeights(t *testing.T, adminURL string) map[string]uint32 {
	return routeWeightsFor(t, adminURL, khost)
}

// routeWeightsFor returns, for the route config of the Service host, the
// weight of each weighted cluster by the Service it leads to (the cluster
// name's host's first label; the name for others).
func routeWeightsFor(t *testing.T, adminURL, host string) map[string]uint32 {
	t.Helper()
	var dump struct {
		Resources []struct {
			Resource json.RawMessage `json:"resource"`
		} `json:"resources"`
	}
	getJSON(t, adminURL+"/config_dump", &dump)
	out := map[string]uint32{}
	for _, r := range dump.Resources {
		var a anypb.Any
		if err := protojson.Unmarshal(r.Resource, &a); err != nil {
			t.Fatalf("config_dump: %v", err)
		}
		if a.MessageName() != "envoy.config.route.v3.RouteConfiguration" {
			continue
		}
		var rc routev3.RouteConfiguration
		if err := a.UnmarshalTo(&rc); err != nil {
			t.Fatalf("config_dump: %v", err)
		}
		if !strings.HasSuffix(rc.GetName(), "|"+host) {
			continue
		}
		for _, vh := range rc.GetVirtualHosts() {
			for _, rt := range vh.GetRoutes() {
				for _, wc := range rt.GetRoute().GetWeightedClusters().GetClusters() {
					name := wc.GetName()
					if i := strings.LastIndexByte(name, '|'); i >= 0 {
						name, _, _ = strings.Cut(name[i+1:], ".")
					}
					out[name] = wc.GetWeight().GetValue()
				}
			}
		}
	}
	return out
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("%s: %v", url, err)
	}
}

func listenOn(t *testing.T, ip string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// waitUntil checks cond until it holds, at each wake (a value on wake) and
// at least every 2 ms, failing the test after timeout.
func waitUntil(t *testing.T, timeout time.Duration, wake <-chan struct{}, cond func() (bool, string)) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, detail := cond()
		if ok {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("not after %v: %s", timeout, detail)
		case <-wake:
		case <-tick.C:
		}
	}
}

// logBuffer keeps the processes' logs for a failed test.
type logBuffer struct {
	mu sync.Mutex // guards b
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) tail(n int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	lines := strings.Split(strings.TrimRight(l.b.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
