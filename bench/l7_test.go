package bench

import (
	"math"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/istiod-lite/envoy"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/waypoint"
	"github.com/ambit-mesh/ambit/ztunnel/configfile"
)

// fakeTopology is the bench's topology as data (no namespaces): what the
// config generators read.
func fakeTopology() (*netns.Topology, *netns.Pod) {
	pod := func(name, ip string) *netns.Pod { return &netns.Pod{Name: name, IP: netip.MustParseAddr(ip)} }
	wp := pod("waypoint", "10.2.0.4")
	return &netns.Topology{Nodes: []*netns.Node{
		{Name: "node1", Pods: []*netns.Pod{pod("client-plain", "10.1.0.2"), pod("client-mesh", "10.1.0.3")}},
		{Name: "node2", Pods: []*netns.Pod{pod("server-plain", "10.2.0.2"), pod("server-mesh", "10.2.0.3"), wp, pod("server-waypoint", "10.2.0.5")}},
	}}, wp
}

// The ztunnels' config binds the service VIP to the waypoint at its pod's
// address, and the waypoint's own config (from envoy.ForWaypoint) is a
// DiscoveryResponse a real waypoint accepts, routing the VIP to the server
// pod.
func TestWaypointConfig(t *testing.T) {
	topo, wpPod := fakeTopology()
	enrolled := map[string]bool{"client-mesh": true, "server-mesh": true, "server-waypoint": true}
	ws, svcs := benchModel(topo, enrolled, wpPod)

	zc, err := ztunnelConfig(ws, svcs)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := configfile.Parse(zc)
	if err != nil {
		t.Fatalf("ztunnel config does not parse: %v\n%s", err, zc)
	}
	svc := snap.ServiceByVIP(serverVIP)
	if svc == nil || svc.Hostname != serverHost {
		t.Fatalf("no service on %s: %+v", serverVIP, snap.Services)
	}
	if want := netip.AddrPortFrom(wpPod.IP, model.PortHBONE); !svc.Waypoint.Resolved() || svc.Waypoint.Address != want || svc.Waypoint.Name != waypointName {
		t.Errorf("service waypoint = %+v, want %s at %s", svc.Waypoint, waypointName, want)
	}
	if w := snap.WorkloadByIP(wpPod.IP); w == nil || w.Enrolled || w.ServiceAccount != waypointName {
		t.Errorf("waypoint workload = %+v, want not enrolled, service account %s", w, waypointName)
	}
	if w := snap.WorkloadByIP(netip.MustParseAddr("10.2.0.3")); w == nil || !w.Enrolled {
		t.Errorf("server-mesh workload = %+v, want enrolled", w)
	}
	if w := snap.WorkloadByIP(netip.MustParseAddr("10.2.0.5")); w == nil || !w.Enrolled {
		t.Errorf("server-waypoint workload = %+v, want enrolled", w)
	}
	// The ambit path's server is not behind the waypoint's service.
	for _, ep := range svc.Endpoints {
		if ep.WorkloadUID != "bench/Pod/bench/server-waypoint" {
			t.Errorf("service endpoint %s, want server-waypoint only", ep.WorkloadUID)
		}
	}
	if w := snap.WorkloadByIP(netip.MustParseAddr("10.2.0.2")); w == nil || w.Enrolled {
		t.Errorf("server-plain workload = %+v, want not enrolled", w)
	}

	b, err := waypointConfig(ws, svcs, wpPod)
	if err != nil {
		t.Fatal(err)
	}
	var dr discovery.DiscoveryResponse
	if err := protojson.Unmarshal(b, &dr); err != nil {
		t.Fatal(err)
	}
	var rs []waypoint.Resource
	for _, a := range dr.GetResources() {
		m, err := a.UnmarshalNew()
		if err != nil {
			t.Fatal(err)
		}
		rs = append(rs, waypoint.Resource{Version: dr.GetVersionInfo(), Resource: m})
	}
	for _, want := range []string{envoy.ListenerName, "inbound-vip|8080|http|" + serverHost, envoy.ClusterName(fortioPort, serverHost), `"10.2.0.5"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("waypoint config lacks %q", want)
		}
	}
	// A real waypoint takes it as one complete snapshot.
	td := spiffeid.RequireTrustDomainFromString(identity.DefaultTrustDomain.Name())
	ca, err := certs.LoadOrCreateCA(t.Context(), certs.FileStore{Dir: filepath.Join(t.TempDir(), "ca")}, td, certs.Options{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromPath(td, "/ns/bench/sa/"+waypointName)
	mgr := &certs.Manager{Issuer: ca}
	defer mgr.Close()
	p, err := waypoint.New(waypoint.Config{Identity: id, Certs: mgr})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Apply(rs); err != nil {
		t.Fatalf("waypoint refuses the bench's config: %v", err)
	}

	// Without a waypoint pod, the ztunnels' model has no service.
	if _, svcs := benchModel(topo, enrolled, nil); len(svcs) != 0 {
		t.Errorf("services without a waypoint: %+v", svcs)
	}
}

func TestProxyConfigs(t *testing.T) {
	listen, up := netip.MustParseAddrPort("10.2.0.5:8080"), netip.MustParseAddrPort("10.2.0.2:8080")
	n := nginxConfig("/w/nginx", listen, up)
	for _, want := range []string{"listen 10.2.0.5:8080;", "server 10.2.0.2:8080;", "keepalive 128;", "proxy_pass http://server;",
		"proxy_http_version 1.1;", `proxy_set_header Connection "";`, "access_log off;", "worker_processes 2;", "pid /w/nginx/nginx.pid;"} {
		if !strings.Contains(n, want) {
			t.Errorf("nginx config lacks %q:\n%s", want, n)
		}
	}
	h := haproxyHTTPConfig(listen, up)
	for _, want := range []string{"mode http", "bind 10.2.0.5:8080", "server pod 10.2.0.2:8080", "option http-keep-alive"} {
		if !strings.Contains(h, want) {
			t.Errorf("haproxy config lacks %q:\n%s", want, h)
		}
	}
	if strings.Contains(h, "ssl") || strings.Contains(h, "mode tcp") {
		t.Errorf("haproxy HTTP config is not plain HTTP:\n%s", h)
	}
}

// Which workload runs on which path: the L7 paths have no iperf3, the HTTP
// throughput run is theirs and direct's.
func TestRuns(t *testing.T) {
	for _, tc := range []struct {
		path, kind string
		want       bool
	}{
		{PathDirect, WorkThroughput, true}, {PathDirect, WorkHTTPThroughput, true}, {PathAmbit, WorkHTTPThroughput, false},
		{PathHAProxy, WorkHTTPThroughput, false}, {PathWaypoint, WorkThroughput, false}, {PathNginx, WorkHTTPThroughput, true},
		{PathHAProxyHTTP, WorkLatency, true}, {PathWaypoint, WorkConnRate, true},
	} {
		if got := runs(tc.path, tc.kind); got != tc.want {
			t.Errorf("runs(%s, %s) = %v, want %v", tc.path, tc.kind, got, tc.want)
		}
	}
}

// The L7 section: added latency over direct, per-proxy vCPU and RSS of the
// L7 proxy (not the ztunnels), HTTP throughput, the anchor, and "not
// measured" for a path that was not.
func TestL7ReportRows(t *testing.T) {
	hist := func(ms float64) []Bucket {
		return []Bucket{{Start: ms / 1e3, End: ms / 1e3, Count: 1000}}
	}
	lat := func(path string, ms float64, procs ...ProxyUsage) Run {
		return Run{Round: 1, Path: path, Workload: WorkLatency, Connections: 1, Requests: 1000, ActualQPS: 1000, Seconds: 10,
			Histogram: hist(ms), Proxies: procs}
	}
	r := &Results{
		Config:      Config{Rounds: 1, QPS: 1000, Connections: []int{1}, Payload: 1024}.public(),
		Machine:     map[string]string{"cpus": "2"},
		NotMeasured: map[string]string{PathHAProxyHTTP: "haproxy did not start"},
		PeakRSS:     map[string]int64{"waypoint": 30 << 20, "nginx": 12 << 20},
		Runs: []Run{
			lat(PathDirect, 0.2),
			lat(PathWaypoint, 0.9, ProxyUsage{Name: "waypoint", CPUSeconds: 1.5, MaxRSSBytes: 25 << 20},
				ProxyUsage{Name: "ztunnel-node1", CPUSeconds: 2}, ProxyUsage{Name: "ztunnel-node2", CPUSeconds: 2}),
			lat(PathNginx, 0.5, ProxyUsage{Name: "nginx", CPUSeconds: 0.5, MaxRSSBytes: 10 << 20}),
			{Round: 1, Path: PathNginx, Workload: WorkHTTPThroughput, Connections: 16, Requests: 40000, ActualQPS: 8000, Seconds: 5,
				Proxies: []ProxyUsage{{Name: "nginx", CPUSeconds: 4}}},
		},
	}
	r.Config.Paths = []string{PathDirect, PathWaypoint, PathNginx, PathHAProxyHTTP}
	r.Summarize()
	if got := r.Summary[PathNginx].HTTPReqPerSec; got != 8000 {
		t.Errorf("nginx HTTP req/s = %v, want 8000", got)
	}
	if got := r.Summary[PathNginx].HTTPCPUSecondsPer1000Req["nginx"]; math.Abs(got-0.1) > 1e-9 {
		t.Errorf("nginx CPU-s per 1000 requests = %v, want 0.1", got)
	}
	md := r.Markdown(nil)
	for _, want := range []string{
		"## The waypoint path (L7)",
		"| added p50 / p90 / p99 over direct, 1 conn (ms) | — | +0.700 / +0.700 / +0.700 | +0.300 / +0.300 / +0.300 | not measured |",
		"| L7 proxy vCPU @ 1000 req/s, 1 conn | — | 0.150 | 0.050 | not measured |",
		"| L7 proxy RSS @ 1000 req/s / peak (MB) | — | 25.0 / 30.0 | 10.0 / 12.0 | not measured |",
		"| its ztunnels' vCPU (both) @ 1000 req/s, 1 conn | — | 0.400 | — | not measured |",
		"| HTTP throughput, 16 conn (req/s) | — | — | 8000 | not measured |",
		"| vCPU, 1 conn | 0.25 | 0.150 | yes (60%) |",
		"| RSS (MB) | 60 | 25.0 | yes (42%) |",
		"**HAProxy HTTP mode**: haproxy did not start",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	// The L4 main table keeps its columns: no L7 path in it.
	i := strings.Index(md, "| figure |")
	if main, _, _ := strings.Cut(md[i:], "\n"); main != "| figure | direct |" {
		t.Errorf("main table header %q, want direct only", main)
	}
}
