//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/dashboards"
	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/model"
)

// promPort is where the test's Prometheus listens, on node-1's loopback.
const promPort = 19090

// TestObservability runs a real Prometheus (Debian's prometheus package) in
// node-1's network namespace, scraping every node's ztunnel on its node
// address and the waypoint on its pod address, sends traffic (served and
// failed connections, requests through the waypoint), and checks that
// every panel query of every dashboard in dashboards/ returns data.
func TestObservability(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and eBPF")
	}
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatal("no prometheus binary: run scripts/install-deps.sh integration (Debian's prometheus package)")
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

	// Prometheus, scraping each ztunnel where the scraper of a cluster
	// would: its node's address, port 15020 (manifests/ztunnel.yaml).
	dir := t.TempDir()
	var targets []string
	for _, n := range e.m.Topo.Nodes {
		targets = append(targets, fmt.Sprintf("%q", netip.AddrPortFrom(n.IP, model.PortMetrics).String()))
	}
	waypointTarget := fmt.Sprintf("%q", netip.AddrPortFrom(e.ip(waypointPod), model.PortMetrics).String())
	// istiod-lite on its monitoring port (Istio's istiod: 15014), on its
	// node's address (manifests/istiod-lite.yaml: the pod's).
	istiodTarget := fmt.Sprintf("%q", netip.AddrPortFrom(e.m.Topo.Nodes[0].IP, 15014).String())
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
- job_name: ztunnel
  metrics_path: /stats/prometheus
  static_configs:
  - targets: [%s]
- job_name: waypoint
  metrics_path: /stats/prometheus
  static_configs:
  - targets: [%s]
- job_name: istiod
  metrics_path: /metrics
  static_configs:
  - targets: [%s]
`, strings.Join(targets, ", "), waypointTarget, istiodTarget)
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
				Result []json.RawMessage `json:"result"`
			} `json:"data"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return 0, err
		}
		if r.Status != "success" {
			return 0, fmt.Errorf("%s: %s", r.Status, r.Error)
		}
		return len(r.Data.Result), nil
	}
	if !eventually(60*time.Second, func() bool {
		n, err := query(`up == 1`)
		return err == nil && n == len(e.m.Topo.Nodes)+2
	}) {
		b, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
		t.Fatalf("Prometheus does not scrape every ztunnel, the waypoint and istiod-lite:\n%s", b)
	}

	// istiod-lite's metrics: every ztunnel and the waypoint connected over
	// xDS, pushes sent, certificates issued.
	for _, q := range []string{
		fmt.Sprintf(`sum(pilot_xds{job="istiod", kind="node-proxy"}) == %d`, len(e.m.Topo.Nodes)),
		`sum(pilot_xds{job="istiod", kind="waypoint"}) >= 1`,
		`sum(pilot_xds_pushes{job="istiod", type="wds"}) > 0`,
		`sum(pilot_xds_pushes{job="istiod", type="lds"}) > 0`,
		`sum(pilot_xds_send_time_count{job="istiod"}) > 0`,
		`sum(citadel_server_success_cert_issue_count{job="istiod"}) > 0`,
	} {
		var n int
		var qerr error
		if !eventually(30*time.Second, func() bool { n, qerr = query(q); return qerr == nil && n > 0 }) {
			t.Errorf("istiod-lite query %s: %d series (%v)", q, n, qerr)
		}
	}

	// Traffic: served connections through the service, and failed ones (a
	// pod port nobody listens on).
	for range 5 {
		if r := e.exchange(t, "shop/client-1", netip.AddrPortFrom(vip, 80), 64<<10); r.err != nil {
			t.Fatalf("%s -> %s: %v", r.from, r.to, r.err)
		}
	}
	for range 2 {
		if r := e.exchange(t, "shop/client-1", e.addr("shop/server-2", 9), 10); r.err == nil {
			t.Fatal("a connection to a closed port succeeded")
		}
	}

	// Requests through the waypoint (the first may wait for its config).
	client := e.httpClient("shop/client-1", true)
	reviews := fmt.Sprintf("http://%s/", netip.AddrPortFrom(reviewsVIP, 80))
	var ok int
	if !eventually(30*time.Second, func() bool {
		if code, _, err := get(client, http.MethodGet, reviews); err == nil && code == http.StatusOK {
			ok++
		}
		return ok >= 20
	}) {
		t.Fatalf("%d requests answered 200 through the waypoint in 30s\n%s", ok, e.waypointTail())
	}

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
				// Grafana's own variable, as it would substitute it.
				expr := strings.ReplaceAll(tg.Expr, "$__rate_interval", "30s")
				var n int
				var qerr error
				if !eventually(30*time.Second, func() bool { n, qerr = query(expr); return qerr == nil && n > 0 }) {
					t.Errorf("%s: panel %q: %s: %d series (%v)", f, p.Title, expr, n, qerr)
				} else {
					t.Logf("%s: panel %q: %d series", f, p.Title, n)
				}
			}
		}
	}
}
