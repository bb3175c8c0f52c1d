//go:build integration

package integration

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/delayline"
	"github.com/ambit-mesh/ambit/integration/mesh"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// TestQUICBinary runs the real binaries in local mode with eBPF capture and
// --hbone-quic on both ztunnels. node-2 is a Node labelled
// ambit.dev/hbone-quic=enabled in istiod-lite's config (node-level
// advertisement), so its pods advertise QUIC: a connection from a client
// pod on node-1 to the server pod on node-2 goes through HBONE over HTTP/3,
// as node-2's /debug/connections (while it is open), both access logs and
// ambit_hbone_connections_opened_total{transport="h3"} say. Then UDP 15008
// is dropped on the underlay and node-1's ztunnel restarted (no pooled
// QUIC connection, nothing remembered): the next connection falls back to
// HTTP/2 and is served.
//
// A waypoint on node-1 (--hbone-quic-upstream) fronts the service web on
// server-2: a request through it goes upstream to node-2 over HTTP/3, as
// its access line (upstream_transport) and
// ambit_hbone_connections_opened_total{reporter="waypoint_upstream",transport="h3"}
// say.
func TestQUICBinary(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces, eBPF)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	repo, _ := filepath.Abs("..")
	work := t.TempDir()
	bin := filepath.Join(work, "bin")
	if err := mesh.Build(ctx, repo, bin); err != nil {
		t.Fatal(err)
	}
	clientIP, serverIP := netip.MustParseAddr("10.1.0.10"), netip.MustParseAddr("10.2.0.20")
	waypointIP, webVIP := netip.MustParseAddr("10.1.0.40"), netip.MustParseAddr("10.96.0.40")
	cfgDir := filepath.Join(work, "config")
	if err := os.MkdirAll(cfgDir, 0o755); err != nil {
		t.Fatal(err)
	}
	yaml := fmt.Sprintf(`apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {ambit.dev/hbone-quic: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client-1, namespace: shop, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client, containers: [{name: client, image: client}]}
status: {phase: Running, podIP: %[1]s, podIPs: [{ip: %[1]s}], conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-2, namespace: shop, labels: {app: server}}
spec: {nodeName: node-2, serviceAccountName: server, containers: [{name: server, image: server, ports: [{containerPort: 8080}]}]}
status: {phase: Running, podIP: %[2]s, podIPs: [{ip: %[2]s}], conditions: [{type: Ready, status: "True"}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: IPAddress, value: %[3]s}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}}
spec: {nodeName: node-1, serviceAccountName: wp, containers: [{name: istio-proxy, image: waypoint}]}
status: {phase: Running, podIP: %[3]s, podIPs: [{ip: %[3]s}], conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: %[4]s, clusterIPs: [%[4]s], selector: {app: server}, ports: [{name: http, port: 80, targetPort: 8081}]}
`, clientIP, serverIP, waypointIP, webVIP)
	if err := os.WriteFile(filepath.Join(cfgDir, "mesh.yaml"), []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	m, err := mesh.Start(ctx, mesh.Options{
		BinDir: bin, WorkDir: work, Prefix: fmt.Sprintf("aqb%d", os.Getpid()%10000),
		Nodes:       []netns.NodeConfig{{Name: "node-1"}, {Name: "node-2"}},
		ConfigDir:   cfgDir,
		ZtunnelArgs: func(string) []string { return []string{"--hbone-quic"} },
		Waypoints:   []string{"shop/wp"},
		Logger:      log,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range []*mesh.Proc{m.Istiod(), m.Ztunnel("node-1"), m.Ztunnel("node-2")} {
				if p != nil {
					t.Logf("---- %s (tail)\n%s", p.Name, p.Tail(40))
				}
			}
		}
		m.Close()
	})
	client, err := m.Topo.Node("node-1").AddPodIP("shop.client-1", clientIP)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := m.Topo.Node("node-2").AddPodIP("shop.server-2", serverIP)
	if err != nil {
		t.Fatal(err)
	}
	wpPod, err := m.Topo.Node("node-1").AddPodIP("shop.wp-0", waypointIP)
	if err != nil {
		t.Fatal(err)
	}
	for _, node := range []string{"node-1", "node-2"} {
		if err := m.StartZtunnel(ctx, node); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := srv.NS.Listen(ctx, nil, "tcp", ":8080")
	if err != nil {
		t.Fatal(err)
	}
	s := &app.Server{Name: "shop/server-2"}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	webLn, err := srv.NS.Listen(ctx, nil, "tcp", ":8081")
	if err != nil {
		t.Fatal(err)
	}
	web := &app.HTTP{Name: "server-2"}
	go web.Serve(webLn)
	t.Cleanup(func() { web.Close() })
	dst := netip.AddrPortFrom(serverIP, 8080)

	// node-1 learns that server-2 advertises QUIC (from node-2's label).
	if !eventually(30*time.Second, func() bool {
		var ws []struct {
			Name string `json:"name"`
			QUIC bool   `json:"quic"`
		}
		if m.Admin(ctx, "node-1", "/debug/workloads", &ws) != nil {
			return false
		}
		for _, w := range ws {
			if w.Name == "server-2" && w.QUIC {
				return true
			}
		}
		return false
	}) {
		t.Fatal("node-1's ztunnel never learned that server-2 advertises QUIC (node-level label)")
	}

	// Over HTTP/3: node-2's dump shows it while it is open.
	local := netip.AddrPortFrom(clientIP, 20001)
	h := holdFrom(t, client.NS, local, dst)
	var conns []struct {
		Src       string `json:"src"`
		Direction string `json:"direction"`
		Transport string `json:"transport"`
	}
	if !eventually(10*time.Second, func() bool {
		if m.Admin(ctx, "node-2", "/debug/connections", &conns) != nil {
			return false
		}
		for _, c := range conns {
			if c.Direction == "inbound" && c.Transport == "h3" {
				return true
			}
		}
		return false
	}) {
		t.Fatalf("node-2's /debug/connections shows no inbound h3 connection: %+v", conns)
	}
	h.roundTrip(t)
	h.Close()
	for _, node := range []string{"node-1", "node-2"} {
		if a := waitAccessLog(t, m, node, local); a.Transport != "h3" || a.Outcome != "ok" {
			t.Errorf("%s access log: transport %q, outcome %q; want h3, ok", node, a.Transport, a.Outcome)
		}
		if n, err := m.Metrics(ctx, node, "ambit_hbone_connections_opened_total", map[string]string{"transport": "h3"}); err != nil || n < 1 {
			t.Errorf("%s: ambit_hbone_connections_opened_total{transport=h3} = %v (%v)", node, n, err)
		}
	}
	if r, err := exchangeFrom(client.NS, netip.AddrPortFrom(clientIP, 20002), dst, 1<<20); err != nil || r.Bytes != 1<<20 {
		t.Fatalf("1 MiB exchange over h3: %+v, %v", r, err)
	}

	// Through the waypoint on node-1: its upstream leg to server-2 is h3.
	if _, err := m.StartWaypoint(ctx, mesh.WaypointOptions{Name: "wp-0", NS: wpPod.NS, Namespace: "shop", Gateway: "wp",
		Args: []string{"--hbone-quic-upstream", "--node-name", "node-1"}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			if p := m.Waypoint("wp-0"); p != nil {
				t.Logf("---- %s (tail)\n%s", p.Name, p.Tail(40))
			}
		}
	})
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return client.NS.Dial(ctx, nil, network, addr)
		}}}
	var code int
	if !eventually(20*time.Second, func() bool { // until the waypoint has web's routes
		resp, err := hc.Get("http://" + netip.AddrPortFrom(webVIP, 80).String() + "/")
		if err != nil {
			return false
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		code = resp.StatusCode
		return code == http.StatusOK
	}) {
		t.Fatalf("GET web through the waypoint: last code %d", code)
	}
	var upstream string
	eventually(10*time.Second, func() bool {
		logs, err := m.RequestLogs("wp-0")
		for i := len(logs) - 1; err == nil && i >= 0; i-- {
			if logs[i].Code == http.StatusOK {
				upstream = logs[i].UpstreamTransport
				return true
			}
		}
		return false
	})
	if upstream != "h3" {
		t.Errorf("waypoint access line: upstream_transport %q, want h3", upstream)
	}
	if n, err := mesh.MetricsIn(ctx, wpPod.NS, "ambit_hbone_connections_opened_total",
		map[string]string{"reporter": "waypoint_upstream", "transport": "h3"}); err != nil || n < 1 {
		t.Errorf("waypoint: ambit_hbone_connections_opened_total{reporter=waypoint_upstream,transport=h3} = %v (%v)", n, err)
	}

	// UDP 15008 dropped on the way to node-2: after a restart of node-1's
	// ztunnel, its QUIC dial gets no answer and the tunnel is HTTP/2.
	line, err := delayline.Insert(m.Topo, m.Topo.Node("node-2"), delayline.Config{Drop: func(f []byte) bool {
		return len(f) > 37 && binary.BigEndian.Uint16(f[12:]) == 0x0800 && f[23] == 17 && binary.BigEndian.Uint16(f[36:]) == 15008
	}}, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { line.Close() })
	if err := m.StopZtunnel("node-1"); err != nil {
		t.Fatal(err)
	}
	if err := m.StartZtunnel(ctx, "node-1"); err != nil {
		t.Fatal(err)
	}
	local = netip.AddrPortFrom(clientIP, 20003)
	if r, err := exchangeFrom(client.NS, local, dst, 1<<20); err != nil || r.Bytes != 1<<20 {
		t.Fatalf("exchange with UDP 15008 dropped: %+v, %v", r, err)
	}
	for _, node := range []string{"node-1", "node-2"} {
		if a := waitAccessLog(t, m, node, local); a.Transport != "h2" || a.Outcome != "ok" {
			t.Errorf("%s access log with UDP 15008 dropped: transport %q, outcome %q; want h2, ok", node, a.Transport, a.Outcome)
		}
	}
	if st := line.Stats(); st.Dropped == 0 {
		t.Error("the line dropped no UDP 15008: QUIC was never tried, the fallback is not shown")
	}
}

// holdFrom opens a connection from local to dst in ns, reads the app's
// greeting and makes one round trip.
func holdFrom(t *testing.T, ns *netns.NS, local, dst netip.AddrPort) *held {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := ns.Dial(ctx, &net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local)}, "tcp", dst.String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
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

// exchangeFrom runs one app exchange of size bytes from local to dst in ns.
func exchangeFrom(ns *netns.NS, local, dst netip.AddrPort, size int) (app.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return app.Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
		return ns.Dial(ctx, &net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local)}, "tcp", dst.String())
	}, size)
}

// waitAccessLog waits for node's access-log line of the connection from
// local (the source's outbound, the destination's inbound).
func waitAccessLog(t *testing.T, m *mesh.Mesh, node string, local netip.AddrPort) mesh.AccessLog {
	t.Helper()
	var found *mesh.AccessLog
	eventually(10*time.Second, func() bool {
		logs, err := m.AccessLogs(node)
		if err != nil {
			return false
		}
		for i := range logs {
			if logs[i].Src == local.String() {
				found = &logs[i]
				return true
			}
		}
		return false
	})
	if found == nil {
		t.Fatalf("%s: no access-log line for %s", node, local)
	}
	return *found
}
