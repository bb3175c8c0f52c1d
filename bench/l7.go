package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/istiod-lite/envoy"
	"github.com/ambit-mesh/ambit/model"
)

// The L7 paths: an HTTP proxy in its own pod on node2, between a client pod
// on node1 and a server pod on node2.
//
//	waypoint      client-mesh -> ztunnel node1 =HBONE=> waypoint pod =HBONE=> ztunnel node2 -> server-waypoint
//	nginx         client-plain -> nginx pod (proxy_pass, keepalive upstream) -> server-plain
//	haproxy-http  client-plain -> haproxy pod (mode http) -> server-plain
const (
	PathWaypoint    = "waypoint"
	PathNginx       = "nginx"
	PathHAProxyHTTP = "haproxy-http"
)

// WorkHTTPThroughput is the L7 paths' throughput run: 1 KB requests as
// fast as they are answered (fortio -qps 0) over httpThroughputConns
// connections; it also runs on the direct path, the baseline.
const WorkHTTPThroughput = "http-throughput"

const (
	// httpThroughputConns is the concurrency of the HTTP throughput runs.
	httpThroughputConns = 16
	// l7ProxyPort is where nginx and haproxy-http listen in their pods.
	l7ProxyPort = 8080
	// benchNamespace is the model namespace of every bench workload.
	benchNamespace = "bench"
	// waypointName is the waypoint Gateway's name (and service account).
	waypointName = "waypoint"
	// serverHost is the hostname of the service bound to the waypoint.
	serverHost = waypointServerPod + ".bench.svc.cluster.local"
	// waypointServerPod is the waypoint path's server pod (enrolled, on
	// node2, the same servers as the others): ztunnel lets only the
	// waypoint reach a pod behind a waypoint-bound service, so the ambit
	// path cannot share it.
	waypointServerPod = "server-waypoint"
)

// serverVIP is the virtual IP of the service bound to the waypoint: not
// routed anywhere but the client's default route; node1's ztunnel captures
// it and sends it to the waypoint.
var serverVIP = netip.MustParseAddr("10.96.0.10")

// isL7 reports whether path name is one of the L7 paths.
func isL7(name string) bool {
	return name == PathWaypoint || name == PathNginx || name == PathHAProxyHTTP
}

// l7Pods are the pods the L7 paths' proxies run in (on node2).
var l7Pods = map[string]string{PathWaypoint: "waypoint", PathNginx: "nginx", PathHAProxyHTTP: "haproxy-http"}

// benchModel is the model both ztunnels (local mode) and the waypoint are
// configured from: every pod as a workload (the mesh ones enrolled), and,
// when waypoint is a pod, the service server-waypoint (VIP serverVIP, port
// 8080, HTTP) bound to the waypoint at that pod's address.
func benchModel(topo *netns.Topology, enrolled map[string]bool, waypoint *netns.Pod) ([]*model.Workload, []*model.Service) {
	var ws []*model.Workload
	var server *model.Workload
	for _, n := range topo.Nodes {
		for _, p := range n.Pods {
			w := &model.Workload{UID: "bench/Pod/bench/" + p.Name, Name: p.Name, Namespace: benchNamespace, ServiceAccount: p.Name,
				Node: n.Name, Addresses: []netip.Addr{p.IP}, Enrolled: enrolled[p.Name], Ready: true, Labels: map[string]string{"app": p.Name}}
			if waypoint != nil && p == waypoint {
				w.ServiceAccount = waypointName // the waypoint's identity is its Gateway's
			}
			if p.Name == waypointServerPod {
				server = w
			}
			ws = append(ws, w)
		}
	}
	if waypoint == nil || server == nil {
		return ws, nil
	}
	svc := &model.Service{Name: waypointServerPod, Namespace: benchNamespace, Hostname: serverHost, VIPs: []netip.Addr{serverVIP},
		Ports:     []model.ServicePort{{Name: "http", Port: fortioPort, TargetPort: fortioPort, Protocol: "HTTP"}},
		Endpoints: []model.Endpoint{{WorkloadUID: server.UID}},
		Waypoint:  (&model.Waypoint{Name: waypointName, Namespace: benchNamespace, Address: waypoint.IP}).Ref()}
	return ws, []*model.Service{svc}
}

// ztunnelConfig is the ztunnels' local-mode config file for the model.
func ztunnelConfig(ws []*model.Workload, svcs []*model.Service) ([]byte, error) {
	b, err := json.MarshalIndent(struct {
		Workloads []*model.Workload `json:"workloads"`
		Services  []*model.Service  `json:"services,omitempty"`
	}{ws, svcs}, "", " ")
	if err != nil {
		return nil, fmt.Errorf("ztunnel config: %w", err)
	}
	return b, nil
}

// waypointConfig is the waypoint's --config file: the Envoy resources
// istiod-lite's envoy.ForWaypoint builds for it from the same model, as a
// JSON DiscoveryResponse.
func waypointConfig(ws []*model.Workload, svcs []*model.Service, waypoint *netns.Pod) ([]byte, error) {
	s := model.NewSnapshot(ws, svcs, nil, nil)
	wp := &model.Waypoint{Name: waypointName, Namespace: benchNamespace, For: "service", Address: waypoint.IP, ServiceAccount: waypointName}
	s.Waypoints[wp.Key()] = wp
	r, err := envoy.ForWaypoint(s, envoy.Waypoint{Namespace: benchNamespace, Name: waypointName})
	if err != nil {
		return nil, fmt.Errorf("waypoint config: %w", err)
	}
	var msgs []proto.Message
	for _, m := range r.Listeners {
		msgs = append(msgs, m)
	}
	for _, m := range r.Routes {
		msgs = append(msgs, m)
	}
	for _, m := range r.Clusters {
		msgs = append(msgs, m)
	}
	for _, m := range r.Endpoints {
		msgs = append(msgs, m)
	}
	dr := &discovery.DiscoveryResponse{VersionInfo: "bench"}
	for _, m := range msgs {
		a, err := anypb.New(m)
		if err != nil {
			return nil, fmt.Errorf("waypoint config: %w", err)
		}
		dr.Resources = append(dr.Resources, a)
	}
	b, err := protojson.MarshalOptions{Indent: " "}.Marshal(dr)
	if err != nil {
		return nil, fmt.Errorf("waypoint config: %w", err)
	}
	return b, nil
}

// startWaypoint runs cmd/waypoint in its pod with the config file built by
// waypointConfig and the bench's CA, and waits until it is ready.
func startWaypoint(ctx context.Context, niceness int, bin, dir, caDir string, pod *netns.Pod, cfg []byte) (*process, error) {
	path := filepath.Join(dir, "waypoint.json")
	if err := os.WriteFile(path, cfg, 0o644); err != nil {
		return nil, fmt.Errorf("waypoint: %w", err)
	}
	// Access logs off (log level warn), as Istio's default mesh config has
	// them; nginx and HAProxy log nothing either.
	p, err := start(niceness, pod.NS, "waypoint", filepath.Join(dir, "waypoint.log"), bin,
		"--node", pod.Name, "--namespace", benchNamespace, "--gateway", waypointName,
		"--config", path, "--ca-dir", caDir, "--drain-timeout", "1s", "--log-level", "warn")
	if err != nil {
		return nil, err
	}
	if err := waitReady(ctx, pod.NS, p); err != nil {
		p.stop(2 * time.Second)
		return nil, err
	}
	return p, nil
}

// nginxConfig is nginx as a reverse proxy in its pod: proxy_pass to the
// server pod with a keepalive upstream (HTTP/1.1 both sides), two workers
// (the machine's cores; HAProxy runs two threads, the waypoint GOMAXPROCS=2),
// no access log.
func nginxConfig(dir string, listen, upstream netip.AddrPort) string {
	return fmt.Sprintf(`daemon off;
master_process on;
worker_processes 2;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path %[1]s/client_body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    keepalive_requests 1000000;
    upstream server {
        server %[3]s;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {
        listen %[2]s;
        location / {
            proxy_pass http://server;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
`, dir, listen, upstream)
}

// haproxyHTTPConfig is HAProxy in mode http in its pod, keeping server-side
// connections alive (http-reuse safe, HAProxy's default), no logging.
func haproxyHTTPConfig(listen, upstream netip.AddrPort) string {
	return fmt.Sprintf(`global
    maxconn 8000
defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend http
    bind %s
    default_backend server
backend server
    server pod %s
`, listen, upstream)
}

// startNginx writes nginx's config into dir and runs it in pod.
func startNginx(ctx context.Context, niceness int, bin, dir string, pod *netns.Pod, upstream netip.AddrPort) (*process, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("nginx: %w", err)
	}
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(nginxConfig(dir, netip.AddrPortFrom(pod.IP, l7ProxyPort), upstream)), 0o644); err != nil {
		return nil, fmt.Errorf("nginx: %w", err)
	}
	p, err := start(niceness, pod.NS, "nginx", filepath.Join(dir, "nginx.log"), bin, "-c", path, "-p", dir+"/")
	if err != nil {
		return nil, err
	}
	p.tree = true // master and workers
	if err := waitListening(ctx, pod.NS, netip.AddrPortFrom(pod.IP, l7ProxyPort)); err != nil {
		p.stop(2 * time.Second)
		b, _ := os.ReadFile(filepath.Join(dir, "nginx-error.log"))
		return nil, fmt.Errorf("nginx: %w: %s %s", err, p.tail(), strings.TrimSpace(string(b)))
	}
	return p, nil
}

// startHAProxyHTTP writes HAProxy's mode-http config into dir and runs it
// in pod.
func startHAProxyHTTP(ctx context.Context, niceness int, bin, dir string, pod *netns.Pod, upstream netip.AddrPort) (*process, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("haproxy-http: %w", err)
	}
	path := filepath.Join(dir, "haproxy-http.cfg")
	if err := os.WriteFile(path, []byte(haproxyHTTPConfig(netip.AddrPortFrom(pod.IP, l7ProxyPort), upstream)), 0o644); err != nil {
		return nil, fmt.Errorf("haproxy-http: %w", err)
	}
	p, err := start(niceness, pod.NS, "haproxy-http", filepath.Join(dir, "haproxy-http.log"), bin, "-db", "-f", path)
	if err != nil {
		return nil, err
	}
	if err := waitListening(ctx, pod.NS, netip.AddrPortFrom(pod.IP, l7ProxyPort)); err != nil {
		p.stop(2 * time.Second)
		return nil, fmt.Errorf("haproxy-http: %w: %s", err, p.tail())
	}
	return p, nil
}

// runs reports whether workload kind runs on path name: the L7 paths carry
// HTTP only (no iperf3 throughput), and the HTTP throughput run is for them
// and their baseline, direct.
func runs(name, kind string) bool {
	switch {
	case kind == WorkHTTPThroughput:
		return name == PathDirect || isL7(name)
	case kind == WorkThroughput:
		return !isL7(name)
	}
	return true
}

// startWaypointPath builds cmd/waypoint, writes its config from the bench's
// model and runs it in its pod; the path's proxies are the waypoint and
// both ztunnels (client -> ztunnel -> waypoint -> ztunnel -> server), and it
// counts the waypoint's requests.
func startWaypointPath(ctx context.Context, cfg Config, work, caDir string, topo *netns.Topology, enrolled map[string]bool,
	pod *netns.Pod, zt *ztunnelPair, p *path, stops *[]func()) error {
	if pod == nil || zt == nil {
		return fmt.Errorf("%w: no waypoint pod or ztunnels", errNotMeasured)
	}
	dir := filepath.Join(work, "waypoint")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	bin := filepath.Join(work, "waypoint.bin")
	cfg.Logger.Info("building waypoint", "module", cfg.RepoDir)
	cmd := goBuild(ctx, cfg.RepoDir, "-o", bin, "./cmd/waypoint")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: go build ./cmd/waypoint: %w: %s", errNotMeasured, err, strings.TrimSpace(string(out)))
	}
	ws, svcs := benchModel(topo, enrolled, pod)
	conf, err := waypointConfig(ws, svcs, pod)
	if err != nil {
		return fmt.Errorf("%w: %w", errNotMeasured, err)
	}
	wp, err := startWaypoint(ctx, cfg.Nice, bin, dir, caDir, pod, conf)
	if err != nil {
		return fmt.Errorf("%w: waypoint did not start: %w", errNotMeasured, err)
	}
	*stops = append(*stops, func() { wp.stop(3 * time.Second) })
	p.procs = append([]*process{wp}, zt.procs()...)
	p.counted = func(ctx context.Context) (float64, error) {
		return sumMetric(ctx, pod.NS, "istio_requests_total")
	}
	return nil
}
