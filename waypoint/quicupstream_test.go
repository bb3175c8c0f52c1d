package waypoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
	"github.com/ambit-mesh/ambit/telemetry"
)

// destZtunnel is a destination's ztunnel inbound on loopback: HBONE over
// HTTP/2 on TCP, and on UDP at the same port (udp) HBONE over HTTP/3
// ("h3"), a socket that never reads ("drop": UDP dropped) or nothing
// ("refuse": the port is closed). It relays each tunnel to its target and
// counts tunnels by transport.
type destZtunnel struct {
	port uint16

	mu      sync.Mutex // guards tunnels and peers
	tunnels map[string]int
	peers   []string
}

func newDestZtunnel(t *testing.T, certs hbone.CertSource, id spiffeid.ID, udp string) *destZtunnel {
	t.Helper()
	d := &destZtunnel{tunnels: map[string]int{}}
	handler := hbone.HandlerFunc(func(ctx context.Context, r *hbone.Request) {
		var nd net.Dialer
		up, err := nd.DialContext(ctx, "tcp", r.Target.String())
		if err != nil {
			r.Reject(http.StatusServiceUnavailable)
			return
		}
		st, err := r.Accept()
		if err != nil {
			up.Close()
			return
		}
		d.mu.Lock()
		d.tunnels[st.Transport()]++
		d.peers = append(d.peers, r.Peer.String())
		d.mu.Unlock()
		hbone.Join(ctx, st, up)
	})
	local := func(netip.Addr) (spiffeid.ID, bool) { return id, true }
	ln := listen(t)
	var pc net.PacketConn
	if udp == "h3" || udp == "drop" {
		var err error
		ln, pc, err = listenQUIC(ln, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
	}
	d.port = uint16(ln.Addr().(*net.TCPAddr).Port)
	hs := &hbone.Server{Certs: certs, LocalIdentity: local, Handler: handler}
	done := make(chan error, 2)
	go func() { done <- hs.Serve(ln) }()
	t.Cleanup(func() {
		hs.Close()
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			t.Errorf("destination hbone: %v", err)
		}
	})
	switch udp {
	case "h3":
		qs := &h3.Server{Certs: certs, LocalIdentity: local, Handler: handler}
		go func() { done <- qs.Serve(pc) }()
		t.Cleanup(func() {
			qs.Close()
			if err := <-done; !errors.Is(err, h3.ErrServerClosed) {
				t.Errorf("destination h3: %v", err)
			}
		})
	case "drop":
		t.Cleanup(func() { pc.Close() })
	}
	return d
}

func (d *destZtunnel) counts() (h2, h3 int, peers []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.tunnels[hbone.TransportH2], d.tunnels[hbone.TransportH3], append([]string(nil), d.peers...)
}

// quicEndpoint is the EDS metadata of an endpoint behind d that
// advertises HBONE over QUIC, on node.
func quicEndpoint(id spiffeid.ID, d *destZtunnel, node string) map[string]any {
	return map[string]any{"identity": id.String(), "hbone_port": float64(d.port), "hbone_quic": true, "node": node,
		"workload": "reviews-v1", "namespace": "shop", "canonical_service": "reviews", "canonical_revision": "v1"}
}

// TestQUICUpstream: with QUICUpstream, the waypoint reaches an endpoint
// that advertises HBONE over QUIC over HTTP/3, with its own identity:
// HTTP/1.1 requests reuse one pooled tunnel, concurrent HTTP/2 requests
// multiplex on one. The access line names both legs' transports, and the
// upstream tunnel is counted in ambit_hbone_* as reporter
// waypoint_upstream, transport h3; istio_requests_total keeps Istio's
// labels.
func TestQUICUpstream(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			e := newEnv(t, func(c *Config) { c.QUICUpstream, c.Node = true, "node-1" })
			podID := wid(t, "shop", "reviews")
			dest := newDestZtunnel(t, e.certs, podID, "h3")
			const n = 8
			var arrived atomic.Int32
			all := make(chan struct{})
			handler := whoami("pod")
			if h2 { // every request waits for all n: they are in flight together
				handler = func(w http.ResponseWriter, r *http.Request) {
					if arrived.Add(1) == n {
						close(all)
					}
					select {
					case <-all:
					case <-time.After(10 * time.Second):
						http.Error(w, "not concurrent", http.StatusGatewayTimeout)
						return
					}
					whoami("pod")(w, r)
				}
			}
			var b *backend
			if h2 {
				b = newH2CBackend(t, handler)
			} else {
				b = newBackend(t, handler)
			}
			cl := clusterName(svc)
			e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)},
				map[string][]ep{cl: {{addr: b.addr, md: quicEndpoint(podID, dest, "node-2")}}}, protocolOptions(h2, 0))...)
			c := e.client(e.cliID, target, true)
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for i := range n {
				req := func() {
					resp, err := c.Get("http://" + svc + "/")
					if err != nil {
						errs <- fmt.Errorf("request %d: %w", i, err)
						return
					}
					body, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					want := "HTTP/1.1"
					if h2 {
						want = "HTTP/2.0"
					}
					if err != nil || resp.StatusCode != 200 || !strings.HasPrefix(string(body), "pod") || resp.Header.Get("X-Seen-Proto") != want {
						errs <- fmt.Errorf("request %d: %d %q %s %v", i, resp.StatusCode, body, resp.Header.Get("X-Seen-Proto"), err)
					}
				}
				if !h2 {
					req() // one after another: the pooled connection is reused
					continue
				}
				wg.Add(1)
				go func() { defer wg.Done(); req() }()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			tun2, tun3, peers := dest.counts()
			if tun2 != 0 || tun3 != 1 {
				t.Errorf("destination tunnels: h2 %d, h3 %d; want one h3 tunnel for %d requests", tun2, tun3, n)
			}
			for _, p := range peers {
				if p != e.wpID.String() {
					t.Errorf("destination saw %s, want the waypoint's own identity", p)
				}
			}
			logs := e.logs.String()
			if got := strings.Count(logs, `"transport":"h2","upstream_transport":"h3"`); got != n {
				t.Errorf("%d access lines with transport h2, upstream_transport h3; want %d:\n%s", got, n, logs)
			}
			up := []string{`reporter="waypoint_upstream"`, `transport="h3"`}
			if v := scrape(t, e.metric, "ambit_hbone_connections_opened_total", up...); v != 1 {
				t.Errorf("upstream h3 tunnels opened %v, want 1", v)
			}
			if v := scrape(t, e.metric, "ambit_hbone_received_bytes_total", up...); v <= 0 {
				t.Errorf("upstream h3 request bytes %v", v)
			}
			if v := scrape(t, e.metric, "ambit_hbone_sent_bytes_total", up...); v <= 0 {
				t.Errorf("upstream h3 response bytes %v", v)
			}
			if v := scrape(t, e.metric, "ambit_hbone_connections_opened_total", `transport="h2"`); v != 0 {
				t.Errorf("h2 tunnels counted %v, want 0", v)
			}
			if v := scrape(t, e.metric, "istio_requests_total", `reporter="waypoint"`, `response_code="200"`); v != n {
				t.Errorf("istio_requests_total %v, want %d", v, n)
			}
			if strings.Contains(scrapeFamily(t, e.metric, "istio_requests_total"), "transport") {
				t.Error("istio_requests_total has a transport label")
			}
		})
	}
}

// scrapeFamily returns the exposition lines of one family.
func scrapeFamily(t *testing.T, url, name string) string {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, name+"{") {
			sb.WriteString(l + "\n")
		}
	}
	return sb.String()
}

// TestQUICUpstreamFallback: where UDP to the endpoint's 15008 is dropped
// or refused, the first tunnel falls back to HTTP/2 after one QUIC
// attempt, and later tunnels (one request per connection: a tunnel each)
// go straight over HTTP/2: one fallback in all. An endpoint on the
// waypoint's own node, and a waypoint without QUICUpstream, use HTTP/2
// without trying QUIC.
func TestQUICUpstreamFallback(t *testing.T) {
	cases := []struct {
		name, udp, node string
		quic            bool
		fallbacks       int
	}{
		{name: "dropped", udp: "drop", node: "node-2", quic: true, fallbacks: 1},
		{name: "refused", udp: "refuse", node: "node-2", quic: true, fallbacks: 1},
		{name: "same-node", udp: "h3", node: "node-1", quic: true},
		{name: "off", udp: "h3", node: "node-2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			opLog := &syncBuffer{}
			e := newEnv(t, func(c *Config) {
				c.QUICUpstream, c.Node, c.QUICDialTimeout = tc.quic, "node-1", 500*time.Millisecond
				c.Logger = slog.New(slog.NewJSONHandler(opLog, nil))
			})
			podID := wid(t, "shop", "reviews")
			dest := newDestZtunnel(t, e.certs, podID, tc.udp)
			b := newBackend(t, whoami("pod"))
			cl := clusterName(svc)
			e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)},
				map[string][]ep{cl: {{addr: b.addr, md: quicEndpoint(podID, dest, tc.node)}}}, protocolOptions(false, 1))...)
			c := e.client(e.cliID, target, true)
			const n = 3
			for i := range n {
				if code, body, _ := get(t, c, "http://"+svc+"/"); code != 200 || !strings.HasPrefix(body, "pod") {
					t.Fatalf("request %d: %d %q", i, code, body)
				}
			}
			tun2, tun3, _ := dest.counts()
			if tun2 != n || tun3 != 0 {
				t.Errorf("destination tunnels: h2 %d, h3 %d; want %d over h2", tun2, tun3, n)
			}
			if got := strings.Count(opLog.String(), "falling back to http/2"); got != tc.fallbacks {
				t.Errorf("%d fallbacks logged, want %d:\n%s", got, tc.fallbacks, opLog.String())
			}
			if got := strings.Count(e.logs.String(), `"upstream_transport":"h2"`); got != n {
				t.Errorf("%d access lines with upstream_transport h2, want %d", got, n)
			}
			if v := scrape(t, e.metric, "ambit_hbone_connections_opened_total", `reporter="waypoint_upstream"`, `transport="h2"`); v != n {
				t.Errorf("upstream h2 tunnels opened %v, want %d", v, n)
			}
			eventually(t, 5*time.Second, func() bool {
				return scrape(t, e.metric, "ambit_hbone_connections_closed_total", `reporter="waypoint_upstream"`, `transport="h2"`) >= n-1
			}, "upstream tunnels retired after one request not counted closed")
		})
	}
}

// TestQUICEndpointMetadata: hbone_quic is a bool that needs hbone_port;
// node is kept with it, and both are part of the host's key (a pod that
// starts or stops advertising QUIC is a new host, with new pools).
func TestQUICEndpointMetadata(t *testing.T) {
	id := wid(t, "shop", "reviews").String()
	addr := netip.MustParseAddrPort("10.1.2.12:8080")
	compile := func(md map[string]any) ([]endpointSpec, error) {
		return compileEndpoints(cla("c", ep{addr: addr, md: md}))
	}
	got, err := compile(map[string]any{"identity": id, "hbone_port": float64(15008), "hbone_quic": true, "node": "node-2"})
	if err != nil || len(got) != 1 || !got[0].quic || got[0].node != "node-2" {
		t.Fatalf("%+v %v", got, err)
	}
	plain, err := compile(map[string]any{"identity": id, "hbone_port": float64(15008)})
	if err != nil || len(plain) != 1 || plain[0].quic || plain[0].key() == got[0].key() {
		t.Errorf("without hbone_quic: %+v %v (same key: %v)", plain, err, plain[0].key() == got[0].key())
	}
	for _, bad := range []map[string]any{
		{"identity": id, "hbone_port": float64(15008), "hbone_quic": "true"},
		{"identity": id, "hbone_quic": true},
	} {
		if _, err := compile(bad); err == nil || !strings.Contains(err.Error(), "hbone_quic") {
			t.Errorf("%v: %v, want an error naming hbone_quic", bad, err)
		}
	}
}

// TestQUICBothLegs: a waypoint run with QUIC (serving it, and so dialing
// it) carries a request over HTTP/3 on both legs: the access line says h3
// for both, the request's flow event h3 for the client's tunnel.
func TestQUICBothLegs(t *testing.T) {
	e, qaddr := newQUICEnv(t, func(c *Config) { c.Node = "node-1" })
	podID := wid(t, "shop", "reviews")
	dest := newDestZtunnel(t, e.certs, podID, "h3")
	b := newH2CBackend(t, whoami("pod"))
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)},
		map[string][]ep{cl: {{addr: b.addr, md: quicEndpoint(podID, dest, "node-2")}}}, protocolOptions(true, 0))...)
	sub := e.p.m.flows.Subscribe(telemetry.FlowFilter{Type: telemetry.FlowRequest}, 0)
	defer sub.Close()
	c := e.h3Client(e.certs, e.cliID, qaddr, true, nil)
	if code, body, hdr := get(t, c, "http://"+svc+"/"); code != 200 || !strings.HasPrefix(body, "pod") || hdr.Get("X-Seen-Proto") != "HTTP/2.0" {
		t.Fatalf("%d %q %v", code, body, hdr)
	}
	if _, tun3, _ := dest.counts(); tun3 != 1 {
		t.Errorf("destination h3 tunnels %d, want 1", tun3)
	}
	if !strings.Contains(e.logs.String(), `"transport":"h3","upstream_transport":"h3"`) {
		t.Errorf("no access line with both transports h3:\n%s", e.logs.String())
	}
	select {
	case fl := <-sub.C():
		if fl.HBONETransport != hbone.TransportH3 {
			t.Errorf("request flow hboneTransport %q, want h3", fl.HBONETransport)
		}
	case <-time.After(5 * time.Second):
		t.Error("no request flow")
	}
}

// TestQUICUpstreamTCPChain: a tcp_proxy chain's upstream tunnel to an
// endpoint that advertises QUIC is HTTP/3 too, and relays both ways.
func TestQUICUpstreamTCPChain(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.QUICUpstream = true })
	podID := wid(t, "shop", "db")
	dest := newDestZtunnel(t, e.certs, podID, "h3")
	echo := echoListener(t)
	cl := "outbound|9000||db.shop.svc.cluster.local"
	e.apply(res(listener(tcpFC(testVIP, 9000, "db.shop.svc.cluster.local", cl))), res(edsCluster(cl)),
		res(cla(cl, ep{addr: echo.Addr().(*net.TCPAddr).AddrPort(), md: quicEndpoint(podID, dest, "node-2")})))
	s := e.rawStream(testVIP + ":9000")
	s.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(s, "ping")
	got := make([]byte, 4)
	if _, err := io.ReadFull(s, got); err != nil || string(got) != "ping" {
		t.Fatalf("relay over h3: %q %v", got, err)
	}
	if tun2, tun3, _ := dest.counts(); tun2 != 0 || tun3 != 1 {
		t.Errorf("destination tunnels: h2 %d, h3 %d; want one h3", tun2, tun3)
	}
}
