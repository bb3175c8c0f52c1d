//go:build integration

package integration

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/ambit-mesh/ambit/dashboards"
	"github.com/ambit-mesh/ambit/integration/app"
)

// promPort is where the test's Prometheus listens, on node-1's loopback.
const promPort = 19090

// TestObservability runs a real Prometheus (built with Kubernetes service
// discovery by integration/apiserver/build-prometheus.sh) in
// node-1's network namespace that finds istiod-lite, every node's ztunnel
// and the waypoint by Kubernetes service discovery (their Pod objects in
// the API server) and scrapes them where their prometheus.io annotations
// say (Istio's relabeling), sends traffic (served and failed connections,
// requests through the waypoint) and a config change, and checks that
// every panel query of every dashboard in dashboards/ returns data.
func TestObservability(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and eBPF")
	}
	prom, err := prometheusBin()
	if err != nil {
		t.Fatal(err)
	}
	e := setup(t)
	ctx := context.Background()
	e.pod(ctx, shop, "client-1", "node-1", "client", map[string]string{"app": "client"}, 0)
	e.pod(ctx, shop, "server-2", "node-2", "server", map[string]string{"app": "server", "version": "v1"}, 8080)
	vip := e.service(ctx, shop, "server", map[string]string{"app": "server"}, 80, 8080)
	// L7: reviews behind the namespace's waypoint.
	if _, err := e.cs.CoreV1().ServiceAccounts(shop).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "reviews"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.httpPod(ctx, "reviews-v1", "node-2", "reviews", map[string]string{"app": "reviews", "version": "v1"},
		map[string]string{app.AnnotationProtocol: "http"})
	reviewsVIP := e.httpService(ctx, "reviews", map[string]string{"app": "reviews"}, map[string]string{"istio.io/use-waypoint": "waypoint"})
	e.kubectlApply(t, `apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
`)
	e.runWaypoint(t, "waypoint", "node-1")
	for _, p := range []string{"shop/client-1", "shop/server-2", "shop/reviews-v1"} {
		e.waitReady(ctx, p)
		for _, node := range []string{"node-1", "node-2"} {
			if !eventually(10*time.Second, func() bool { return e.knows(node, e.ip(p)) }) {
				t.Fatalf("%s's ztunnel never learned of %s", node, p)
			}
		}
	}

	// The Pod objects Prometheus discovers, as the controllers would make
	// them from manifests/: the ztunnels' with the DaemonSet template's
	// labels and annotations (setup made them bare), and istiod-lite's
	// from the Deployment template, on node-1 with the node's network
	// (where the harness runs it: --monitoring-addr is node-1's address).
	// The waypoint's pod came from the deployer's Deployment.
	//
	// On the harness cluster the ztunnel pods are the DaemonSet's (its
	// template's labels and annotations already theirs) and the waypoint's
	// the Deployment controller's, found by label and node; istiod-lite
	// runs as a process (its Deployment deleted by setup), so its pod comes
	// from the template in manifests/, placed on node-1 by a nodeSelector.
	var ztunnelPods []string
	for _, n := range e.m.Topo.Nodes {
		ztunnelPods = append(ztunnelPods, e.ztunnelPod(ctx, n.Name))
	}
	if !e.onCluster {
		ds, err := e.cs.AppsV1().DaemonSets("ambit-system").Get(ctx, "ztunnel", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range ztunnelPods {
			z, err := e.cs.CoreV1().Pods("ambit-system").Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			maps.Copy(z.Labels, ds.Spec.Template.Labels)
			z.Annotations = maps.Clone(ds.Spec.Template.Annotations)
			if _, err := e.cs.CoreV1().Pods("ambit-system").Update(ctx, z, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	dep := istiodDeployment(ctx, t, e)
	istiodPod := &corev1.Pod{ObjectMeta: dep.Spec.Template.ObjectMeta, Spec: dep.Spec.Template.Spec}
	istiodPod.Name, istiodPod.Namespace = "istiod-lite-0", "ambit-system"
	istiodPod.Spec.HostNetwork = true
	e.placeOn(&istiodPod.Spec, e.m.Topo.Nodes[0].Name)
	if _, err := e.cs.CoreV1().Pods("ambit-system").Create(ctx, istiodPod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitReady(ctx, "ambit-system/istiod-lite-0")
	if p, err := e.cs.CoreV1().Pods("ambit-system").Get(ctx, "istiod-lite-0", metav1.GetOptions{}); err != nil || p.Spec.NodeName != e.m.Topo.Nodes[0].Name {
		t.Fatalf("istiod-lite-0 is not on %s (%v)", e.m.Topo.Nodes[0].Name, err)
	}
	// What each scraped pod must declare (manifests/ztunnel.yaml,
	// manifests/istiod-lite.yaml, the deployer's waypoint Deployment).
	wpKey := e.key(waypointPod)
	want := map[string][2]string{ // pod -> port, path
		"istiod-lite-0":                     {"15014", "/metrics"},
		strings.TrimPrefix(wpKey, shop+"/"): {"15020", "/stats/prometheus"},
	}
	keys := []string{"ambit-system/istiod-lite-0", wpKey}
	for _, name := range ztunnelPods {
		want[name] = [2]string{"15020", "/stats/prometheus"}
		keys = append(keys, "ambit-system/"+name)
	}
	if len(want) != len(e.m.Topo.Nodes)+2 {
		t.Fatalf("pods to scrape %v: names not distinct", keys)
	}
	wantURL := map[string]string{}
	for _, key := range keys {
		ns, name, _ := strings.Cut(key, "/")
		p, err := e.cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		a := p.Annotations
		if a["prometheus.io/scrape"] != "true" || a["prometheus.io/port"] != want[name][0] || a["prometheus.io/path"] != want[name][1] {
			t.Fatalf("pod %s's scrape annotations %v, want port %s path %s", key, a, want[name][0], want[name][1])
		}
		if p.Status.PodIP == "" {
			t.Fatalf("pod %s has no IP", key)
		}
		wantURL[name] = "http://" + net.JoinHostPort(p.Status.PodIP, a["prometheus.io/port"]) + a["prometheus.io/path"]
	}

	// Prometheus finds them through the API server (kubernetes_sd, role
	// pod) as a service account allowed to list and watch pods, and keeps
	// those annotated for scraping: Istio's kubernetes-pods job
	// (samples/addons/prometheus.yaml), unchanged but for the API server's
	// address (the forwarder in node-1) and credentials.
	e.kubectlApply(t, `apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: prometheus, namespace: monitoring}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: prometheus}
rules:
- {apiGroups: [""], resources: [pods], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: prometheus}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: prometheus}
subjects:
- {kind: ServiceAccount, name: prometheus, namespace: monitoring}
`)
	dir := t.TempDir()
	tok, err := e.cluster.ServiceAccountToken(ctx, "monitoring", "prometheus", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), e.cluster.Config().TLSClientConfig.CAData, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
- job_name: kubernetes-pods
  honor_labels: true
  kubernetes_sd_configs:
  - role: pod
    api_server: https://127.0.0.1:6443
    tls_config: {ca_file: %[1]s/ca.crt}
    authorization: {credentials_file: %[1]s/token}
  relabel_configs:
  - action: keep
    regex: true
    source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
  - action: drop
    regex: true
    source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape_slow]
  - action: replace
    regex: (https?)
    source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scheme]
    target_label: __scheme__
  - action: replace
    regex: (.+)
    source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
    target_label: __metrics_path__
  - action: replace
    regex: (\d+);(([A-Fa-f0-9]{1,4}::?){1,7}[A-Fa-f0-9]{1,4})
    replacement: '[$2]:$1'
    source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_port, __meta_kubernetes_pod_ip]
    target_label: __address__
  - action: replace
    regex: (\d+);((([0-9]+?)(\.|$)){4})
    replacement: $2:$1
    source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_port, __meta_kubernetes_pod_ip]
    target_label: __address__
  - action: labelmap
    regex: __meta_kubernetes_pod_annotation_prometheus_io_param_(.+)
    replacement: __param_$1
  - action: labelmap
    regex: __meta_kubernetes_pod_label_(.+)
  - action: replace
    source_labels: [__meta_kubernetes_namespace]
    target_label: namespace
  - action: replace
    source_labels: [__meta_kubernetes_pod_name]
    target_label: pod
  - action: drop
    regex: Pending|Succeeded|Failed|Completed
    source_labels: [__meta_kubernetes_pod_phase]
`, dir)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	node1 := e.m.Topo.Nodes[0]
	logf, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", "--net="+node1.NS.Path(), "--", prom,
		"--config.file="+filepath.Join(dir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(dir, "data"),
		fmt.Sprintf("--web.listen-address=127.0.0.1:%d", promPort))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return node1.NS.Dial(ctx, nil, network, addr)
		}}}
	var lastValues []string // the last query's sample values
	query := func(expr string) (int, error) {
		resp, err := hc.Get(fmt.Sprintf("http://127.0.0.1:%d/api/v1/query?query=%s", promPort, url.QueryEscape(expr)))
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		var r struct {
			Status string `json:"status"`
			Error  string `json:"error"`
			Data   struct {
				Result []struct {
					Value [2]any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return 0, err
		}
		if r.Status != "success" {
			return 0, fmt.Errorf("%s: %s", r.Status, r.Error)
		}
		lastValues = lastValues[:0]
		for _, v := range r.Data.Result {
			lastValues = append(lastValues, fmt.Sprint(v.Value[1]))
		}
		return len(r.Data.Result), nil
	}
	// Every annotated pod, and nothing else, is a target, scraped at the
	// address and path its annotations give, and up.
	type target struct {
		Labels    map[string]string `json:"labels"`
		ScrapeURL string            `json:"scrapeUrl"`
		Health    string            `json:"health"`
		LastError string            `json:"lastError"`
	}
	var targets []target
	upPods := func() (map[string]string, error) {
		resp, err := hc.Get(fmt.Sprintf("http://127.0.0.1:%d/api/v1/targets?state=active", promPort))
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		var r struct {
			Data struct {
				ActiveTargets []target `json:"activeTargets"`
			} `json:"data"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return nil, err
		}
		targets = r.Data.ActiveTargets
		out := map[string]string{}
		for _, tg := range targets {
			out[tg.Labels["pod"]] = tg.Health
		}
		return out, nil
	}
	if !eventually(60*time.Second, func() bool {
		h, err := upPods()
		if err != nil || len(h) != len(want) {
			return false
		}
		for pod := range want {
			if h[pod] != "up" {
				return false
			}
		}
		return true
	}) {
		b, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
		t.Fatalf("Prometheus did not discover and scrape exactly %v: targets %+v\n%s", slices.Sorted(maps.Keys(want)), targets, b)
	}
	t.Logf("Prometheus scrapes exactly %v", wantURL)
	for _, tg := range targets {
		pod := tg.Labels["pod"]
		if tg.ScrapeURL != wantURL[pod] || tg.Labels["job"] != "kubernetes-pods" {
			t.Errorf("target of pod %s: %s (job %s), want %s", pod, tg.ScrapeURL, tg.Labels["job"], wantURL[pod])
		}
	}
	// up == 1 for each, by the pod labels Prometheus attached.
	for pod := range want {
		q := fmt.Sprintf(`up{job="kubernetes-pods", pod=%q} == 1`, pod)
		if n, err := query(q); err != nil || n != 1 {
			t.Errorf("%s: %d series (%v)", q, n, err)
		}
	}
	for _, q := range []string{`up{app="ztunnel", namespace="ambit-system"} == 1`, `up{app="istiod-lite"} == 1`,
		`up{gateway_networking_k8s_io_gateway_name="waypoint", namespace="shop"} == 1`} {
		if n, err := query(q); err != nil || n == 0 {
			t.Errorf("%s: %d series (%v)", q, n, err)
		}
	}

	// A config change while Prometheus watches: a Service, pushed to every
	// ztunnel (istiod-lite's push and convergence times).
	e.service(ctx, shop, "extra", map[string]string{"app": "extra"}, 80, 8080)

	// istiod-lite's metrics: every ztunnel and the waypoint connected over
	// xDS, pushes sent, certificates issued.
	for _, q := range []string{
		fmt.Sprintf(`sum(pilot_xds{app="istiod-lite", kind="node-proxy"}) == %d`, len(e.m.Topo.Nodes)),
		`sum(pilot_xds{app="istiod-lite", kind="waypoint"}) >= 1`,
		`sum(pilot_xds_pushes{app="istiod-lite", type="wds"}) > 0`,
		`sum(pilot_xds_pushes{app="istiod-lite", type="lds"}) > 0`,
		`sum(pilot_xds_send_time_count{app="istiod-lite"}) > 0`,
		`sum(pilot_xds_push_time_count{app="istiod-lite", type="svc"}) > 0`,
		`sum(pilot_xds_push_time_count{app="istiod-lite", type="lds"}) > 0`,
		fmt.Sprintf(`sum(increase(pilot_proxy_convergence_time_count{app="istiod-lite"}[5m])) >= %d`, len(e.m.Topo.Nodes)),
		`sum(citadel_server_success_cert_issue_count{app="istiod-lite"}) > 0`,
	} {
		var n int
		var qerr error
		if !eventually(30*time.Second, func() bool { n, qerr = query(q); return qerr == nil && n > 0 }) {
			t.Errorf("istiod-lite query %s: %d series (%v)", q, n, qerr)
		}
	}

	// Traffic: served connections through the service, failed ones (a pod
	// port nobody listens on), and requests through the waypoint (the
	// first may wait for its config). Each kind goes in two rounds with a
	// scrape in between: a counter Prometheus first sees at its value has
	// not increased (rate and increase are 0, a ratio of them NaN) until a
	// later scrape sees it move, as after any process start in a cluster.
	client := e.httpClient("shop/client-1", true)
	reviews := fmt.Sprintf("http://%s/", netip.AddrPortFrom(reviewsVIP, 80))
	var ok int
	traffic := func(served, failed, requests int) {
		t.Helper()
		for range served {
			if r := e.exchange(t, "shop/client-1", netip.AddrPortFrom(vip, 80), 64<<10); r.err != nil {
				t.Fatalf("%s -> %s: %v", r.from, r.to, r.err)
			}
		}
		for range failed {
			if r := e.exchange(t, "shop/client-1", e.addr("shop/server-2", 9), 10); r.err == nil {
				t.Fatal("a connection to a closed port succeeded")
			}
		}
		want := ok + requests
		if !eventually(30*time.Second, func() bool {
			if code, _, err := get(client, http.MethodGet, reviews); err == nil && code == http.StatusOK {
				ok++
			}
			return ok >= want
		}) {
			t.Fatalf("%d requests answered 200 through the waypoint in 30s\n%s", ok, e.waypointTail())
		}
	}
	traffic(1, 1, 1)
	for _, q := range []string{
		`istio_tcp_connections_opened_total{reporter="destination", destination_workload="server-2"}`,
		`istio_tcp_connections_failed_total`,
		`istio_requests_total{reporter="waypoint", response_code="200"}`,
	} {
		if !eventually(30*time.Second, func() bool { n, err := query(q); return err == nil && n > 0 }) {
			t.Fatalf("Prometheus never scraped %s", q)
		}
	}
	traffic(4, 1, 19)

	// Queries of Istio's stock dashboards (mesh, service and workload; their
	// template variables filled in) return ambit's traffic.
	for _, q := range []string{
		`round(sum(irate(istio_requests_total{reporter=~"source|waypoint"}[1m])), 0.001)`,
		`sum(rate(istio_requests_total{reporter=~"source|waypoint", response_code!~"5.*"}[1m])) / sum(rate(istio_requests_total{reporter=~"source|waypoint"}[1m]))`,
		`sum(irate(istio_tcp_sent_bytes_total{reporter=~"source|waypoint"}[1m])) + sum(irate(istio_tcp_received_bytes_total{reporter=~"source|waypoint"}[1m]))`,
		`sum(irate(istio_requests_total{reporter=~"source|waypoint",destination_service=~"reviews.shop.svc.cluster.local"}[1m])) by (source_workload, source_workload_namespace, response_code)`,
		`histogram_quantile(0.90, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"source|waypoint",destination_service=~"reviews.shop.svc.cluster.local"}[1m])) by (le))`,
		`sum(irate(istio_tcp_received_bytes_total{reporter="destination", destination_workload_namespace=~"shop", destination_workload=~"server-2"}[1m])) by (source_workload, source_workload_namespace)`,
		`sum(istio_tcp_connections_opened_total{reporter="source", source_workload_namespace=~"shop", source_workload=~"client-1"}) by (destination_service, destination_canonical_service, destination_canonical_revision)`,
	} {
		var n int
		var qerr error
		if !eventually(30*time.Second, func() bool { n, qerr = query(q); return qerr == nil && n > 0 }) {
			t.Errorf("Istio dashboard query %s: %d series (%v)", q, n, qerr)
		}
	}

	// Every panel's query of every dashboard returns data.
	files, err := fs.Glob(dashboards.FS, "*.json")
	if err != nil || len(files) == 0 {
		t.Fatalf("no dashboards: %v", err)
	}
	for _, f := range files {
		b, err := fs.ReadFile(dashboards.FS, f)
		if err != nil {
			t.Fatal(err)
		}
		var d struct {
			Title  string `json:"title"`
			Panels []struct {
				Title   string `json:"title"`
				Targets []struct {
					Expr string `json:"expr"`
				} `json:"targets"`
			} `json:"panels"`
		}
		if err := json.Unmarshal(b, &d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, p := range d.Panels {
			if len(p.Targets) == 0 {
				t.Errorf("%s: panel %q has no query", f, p.Title)
			}
			for _, tg := range p.Targets {
				// Grafana's own variable, as it would substitute it
				// for a view of the last few minutes (the traffic is
				// over by now, and a rate of nothing is 0/0 = NaN).
				expr := strings.ReplaceAll(tg.Expr, "$__rate_interval", "5m")
				var n int
				var qerr error
				// Data: a series with a number (a quantile of no
				// observations is NaN).
				if !eventually(30*time.Second, func() bool {
					n, qerr = query(expr)
					return qerr == nil && n > 0 && slices.ContainsFunc(lastValues, func(v string) bool { return v != "NaN" })
				}) {
					t.Errorf("%s: panel %q: %s: %d series %v (%v)", f, p.Title, expr, n, lastValues, qerr)
				} else {
					t.Logf("%s: panel %q: %d series %v", f, p.Title, n, lastValues)
				}
			}
		}
	}
}

// istiodDeployment is istiod-lite's Deployment: the API server's on the
// light harness, else (setup deleted it on the cluster) the one in manifests/.
func istiodDeployment(ctx context.Context, t *testing.T, e *env) *appsv1.Deployment {
	t.Helper()
	if !e.onCluster {
		dep, err := e.cs.AppsV1().Deployments("ambit-system").Get(ctx, "istiod-lite", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return dep
	}
	f, err := os.Open(filepath.Join("..", "manifests", "istiod-lite.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	for {
		var dep appsv1.Deployment
		if err := dec.Decode(&dep); err != nil {
			t.Fatalf("manifests/istiod-lite.yaml: no istiod-lite Deployment: %v", err)
		}
		if dep.Kind == "Deployment" && dep.Name == "istiod-lite" {
			return &dep
		}
	}
}

// prometheusBin is $AMBIT_PROMETHEUS, else the Prometheus that
// integration/apiserver/build-prometheus.sh (make tools) caches: Debian's
// package is built without Kubernetes service discovery.
func prometheusBin() (string, error) {
	if p := os.Getenv("AMBIT_PROMETHEUS"); p != "" {
		return p, nil
	}
	cache := os.Getenv("AMBIT_CACHE")
	if cache == "" {
		d, err := os.UserCacheDir()
		if err != nil {
			return "", err
		}
		cache = filepath.Join(d, "ambit")
	}
	ver := cmp.Or(os.Getenv("AMBIT_PROMETHEUS_VERSION"), "v0.316.0")
	p := filepath.Join(cache, "prometheus-"+ver, "prometheus")
	if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("no Prometheus with Kubernetes service discovery at %s: run `make tools` (integration/apiserver/build-prometheus.sh) or set AMBIT_PROMETHEUS", p)
	}
	return p, nil
}
