package waypoint

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
)

// TestReTunnelHBONE: endpoints with hbone_port are reached over HBONE with
// the waypoint's own identity, requiring the endpoint's identity; a wrong
// identity fails the connect (503 UF); HTTP/2 upstreams multiplex on one
// tunnel. Metrics carry the destination's labels.
func TestReTunnelHBONE(t *testing.T) {
	e := newEnv(t, nil)
	podID := wid(t, "shop", "reviews")
	var mu sync.Mutex
	var peers []string
	front := &hbone.Server{Certs: e.certs,
		LocalIdentity: func(netip.Addr) (spiffeid.ID, bool) { return podID, true },
		Handler: hbone.HandlerFunc(func(ctx context.Context, r *hbone.Request) {
			mu.Lock()
			peers = append(peers, r.Peer.String())
			mu.Unlock()
			var nd net.Dialer
			up, err := nd.DialContext(ctx, "tcp", r.Target.String())
			if err != nil {
				r.Reject(503)
				return
			}
			s, err := r.Accept()
			if err != nil {
				up.Close()
				return
			}
			hbone.Join(ctx, s, up)
		})}
	ln := listen(t)
	done := make(chan error, 1)
	go func() { done <- front.Serve(ln) }()
	t.Cleanup(func() {
		front.Close()
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			t.Error(err)
		}
	})
	hbonePort := ln.Addr().(*net.TCPAddr).Port
	b := newH2CBackend(t, whoami("pod"))
	md := func(id string) map[string]any {
		return map[string]any{"identity": id, "hbone_port": float64(hbonePort), "workload": "reviews-v1",
			"namespace": "shop", "canonical_service": "reviews", "canonical_revision": "v1"}
	}
	cl := clusterName(svc)
	good := simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr, md: md(podID.String())}}},
		protocolOptions(true, 0))
	e.apply(good...)
	c := e.client(e.cliID, target, false)
	for range 5 {
		if code, body, hdr := get(t, c, "http://"+svc+"/"); code != 200 || !strings.HasPrefix(body, "pod") || hdr.Get("X-Seen-Proto") != "HTTP/2.0" {
			t.Fatalf("%d %q %v", code, body, hdr)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(peers) != 1 || peers[0] != e.wpID.String() {
		t.Errorf("destination saw peers %v; want one tunnel from the waypoint's own identity %s", peers, e.wpID)
	}
	if n := scrape(t, e.metric, "istio_requests_total", `reporter="waypoint"`, `destination_workload="reviews-v1"`,
		`destination_principal="spiffe://cluster.local/ns/shop/sa/reviews"`, `destination_canonical_service="reviews"`,
		`source_principal="spiffe://cluster.local/ns/shop/sa/client"`, `source_workload="client"`, `source_workload_namespace="shop"`,
		`destination_service="`+svc+`"`, `destination_service_name="reviews"`, `destination_service_namespace="shop"`,
		`connection_security_policy="mutual_tls"`, `request_protocol="http"`, `response_code="200"`); n != 5 {
		t.Errorf("labelled requests %v, want 5", n)
	}
	// The endpoint claims another identity: the waypoint refuses the tunnel.
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr, md: md("spiffe://cluster.local/ns/shop/sa/impostor")}}})...)
	code, _, _ := get(t, c, "http://"+svc+"/")
	if code != 503 {
		t.Errorf("wrong identity: %d, want 503", code)
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_flags="UF"`); n != 1 {
		t.Errorf("UF counted %v", n)
	}
}

// TestTCPChain: a tcp_proxy chain relays bytes; a CONNECT to an unknown
// authority is refused with 503 (NR).
func TestTCPChain(t *testing.T) {
	e := newEnv(t, nil)
	echo := echoListener(t)
	cl := "outbound|9000||db.shop.svc.cluster.local"
	e.apply(res(listener(tcpFC(testVIP, 9000, "db.shop.svc.cluster.local", cl))), res(edsCluster(cl)),
		res(cla(cl, ep{addr: echo.Addr().(*net.TCPAddr).AddrPort()})))
	s := e.rawStream(testVIP + ":9000")
	s.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(s, "ping")
	echoed := make([]byte, 4)
	if _, err := io.ReadFull(s, echoed); err != nil || string(echoed) != "ping" {
		t.Fatalf("relay: %q %v", echoed, err)
	}
	// Open: in the connection table, counted opened, its bytes counted as
	// they moved, not closed.
	db := `destination_service="db.shop.svc.cluster.local"`
	eventually(t, 2*time.Second, func() bool {
		return scrape(t, e.metric, "istio_tcp_sent_bytes_total", db, `reporter="waypoint"`) == 4
	}, "tcp bytes not counted while the connection is open")
	if n := e.p.conns.Len(); n != 1 {
		t.Errorf("connection table: %d open, want 1", n)
	}
	if o, c := scrape(t, e.metric, "istio_tcp_connections_opened_total", db), scrape(t, e.metric, "istio_tcp_connections_closed_total", db); o != 1 || c != 0 {
		t.Errorf("open connection: opened %v closed %v, want 1 and 0", o, c)
	}
	s.(interface{ CloseWrite() error }).CloseWrite()
	b, err := io.ReadAll(s)
	if err != nil || len(b) != 0 {
		t.Errorf("relay: %q %v", b, err)
	}
	d := &hbone.Dialer{Certs: e.certs}
	defer d.Close()
	_, err = d.Dial(t.Context(), hbone.DialRequest{Source: e.cliID, Peers: []spiffeid.ID{e.wpID}, Addr: e.hbone,
		Target: netip.MustParseAddrPort("10.9.9.9:80")})
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != 503 {
		t.Errorf("unknown authority: %v, want HBONE 503", err)
	}
	if n := scrape(t, e.metric, "ambit_waypoint_no_filter_chain_total"); n != 1 {
		t.Errorf("NR counted %v", n)
	}
	eventually(t, 2*time.Second, func() bool {
		return scrape(t, e.metric, "istio_tcp_connections_closed_total", db, `response_flags="-"`) == 1 && e.p.conns.Len() == 0
	}, "tcp connection not counted closed")
	if n := scrape(t, e.metric, "istio_tcp_received_bytes_total", db); n != 4 {
		t.Errorf("received bytes %v, want 4", n)
	}
}

// TestTelemetryAndAccessLog: one access-log line per request with Istio's
// field names; duration and size histograms observed.
func TestTelemetryAndAccessLog(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, whoami("x"))
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})...)
	c := e.client(e.cliID, target, false)
	get(t, c, "http://"+svc+"/log?me=1", "X-Request-Id", "req-42", "User-Agent", "tester")
	var line map[string]any
	eventually(t, 2*time.Second, func() bool {
		for _, l := range strings.Split(e.logs.String(), "\n") {
			if strings.Contains(l, "req-42") {
				return json.Unmarshal([]byte(l), &line) == nil
			}
		}
		return false
	}, "no access log line")
	for k, want := range map[string]any{"method": "GET", "path": "/log?me=1", "response_code": float64(200), "response_flags": "-",
		"request_id": "req-42", "user_agent": "tester", "authority": svc, "upstream_cluster": cl, "upstream_host": b.addr.String(),
		"route_name": "r-" + cl, "source_principal": e.cliID.String(), "downstream_local_address": target} {
		if line[k] != want {
			t.Errorf("access log %s = %v, want %v", k, line[k], want)
		}
	}
	for _, k := range []string{"start_time", "duration", "bytes_sent", "bytes_received", "upstream_service_time", "traceparent"} {
		if _, ok := line[k]; !ok {
			t.Errorf("access log lacks %s", k)
		}
	}
	if n := scrape(t, e.metric, "istio_request_duration_milliseconds_count", `reporter="waypoint"`); n != 1 {
		t.Errorf("duration count %v", n)
	}
	if n := scrape(t, e.metric, "istio_response_bytes_sum", `reporter="waypoint"`); n < 3 {
		t.Errorf("response bytes %v", n)
	}
	if n := scrape(t, e.metric, "istio_request_bytes_count", `reporter="waypoint"`); n != 1 {
		t.Errorf("request bytes count %v", n)
	}
}

// TestReadyAndDrain: ready only once config is in; on shutdown an
// in-flight request finishes and readiness drops.
func TestReadyAndDrain(t *testing.T) {
	e := newEnv(t, nil)
	ready := func() int {
		resp, err := http.Get(e.ready + "/healthz/ready")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	eventually(t, 2*time.Second, func() bool { return e.p.serving.Load() }, "not serving")
	if code := ready(); code != 503 {
		t.Errorf("ready before config: %d", code)
	}
	started := make(chan struct{})
	release := make(chan struct{})
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-release
		fmt.Fprint(w, "finished")
	})
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})...)
	if code := ready(); code != 200 {
		t.Errorf("ready after config: %d", code)
	}
	c := e.client(e.cliID, target, true)
	type result struct {
		code int
		body string
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := c.Get("http://" + svc + "/")
		if err != nil {
			got <- result{err: err}
			return
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		got <- result{resp.StatusCode, string(b), err}
	}()
	<-started
	e.cancel() // SIGTERM
	eventually(t, 2*time.Second, func() bool { return e.p.draining.Load() }, "not draining")
	close(release)
	r := <-got
	if r.err != nil || r.code != 200 || r.body != "finished" {
		t.Errorf("in-flight request during drain: %+v", r)
	}
	select {
	case err := <-e.done:
		if err != nil {
			t.Error(err)
		}
		e.done <- nil // for the cleanup
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after the drain")
	}
}
