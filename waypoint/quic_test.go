package waypoint

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
)

// newQUICEnv is newEnv with HBONE over HTTP/3 served too (Config.QUIC): it
// returns the env and the UDP address of the QUIC socket, on the HBONE TCP
// listener's port.
func newQUICEnv(t testing.TB, configure func(*Config)) (*env, netip.AddrPort) {
	t.Helper()
	ca, err := certs.NewSelfSignedCA(spiffeid.RequireTrustDomainFromString("cluster.local"), certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, certs: &testCerts{ca: ca, svids: map[spiffeid.ID]*x509svid.SVID{}},
		wpID: wid(t, "shop", "waypoint"), cliID: wid(t, "shop", "client"), logs: &syncBuffer{}}
	cfg := Config{Identity: e.wpID, Certs: e.certs, Logger: testLog, QUIC: true,
		AccessLog: slog.New(slog.NewJSONHandler(e.logs, nil))}
	if configure != nil {
		configure(&cfg)
	}
	e.p, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ls := Listeners{HBONE: listen(t), Admin: listen(t), Metrics: listen(t), Ready: listen(t)}
	ls.HBONE, ls.QUIC, err = listenQUIC(ls.HBONE, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.hbone = ls.HBONE.Addr().(*net.TCPAddr).AddrPort()
	quicAddr := ls.QUIC.LocalAddr().(*net.UDPAddr).AddrPort()
	if quicAddr != e.hbone {
		t.Fatalf("QUIC on %s, HBONE TCP on %s: want the same address", quicAddr, e.hbone)
	}
	e.admin, e.metric, e.ready = "http://"+ls.Admin.Addr().String(), "http://"+ls.Metrics.Addr().String(), "http://"+ls.Ready.Addr().String()
	ctx, cancel := context.WithCancel(t.Context())
	e.cancel, e.done = cancel, make(chan error, 1)
	go func() { e.done <- e.p.Serve(ctx, ls) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-e.done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return")
		}
	})
	return e, quicAddr
}

// h3Client is env.client over HBONE on HTTP/3: a client reaching target
// through the waypoint at addr (UDP) as id, its tunnels dialed by a
// dialer of its own with src's certificates; every tunnel's transport is
// checked to be h3, and dials (if not nil) counts them.
func (e *env) h3Client(src hbone.CertSource, id spiffeid.ID, addr netip.AddrPort, h2 bool, dials *atomic.Int32) *http.Client {
	d := &h3.Dialer{Certs: src}
	e.t.Cleanup(func() { d.Close() })
	tgt := netip.MustParseAddrPort(target)
	rt := &http.Transport{Protocols: new(http.Protocols), MaxIdleConnsPerHost: 4,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			st, err := d.Dial(ctx, hbone.DialRequest{Source: id, Peers: []spiffeid.ID{e.wpID}, Addr: addr, Target: tgt,
				ForwardedFor: netip.MustParseAddrPort("10.1.0.7:40000")})
			if err != nil {
				return nil, err
			}
			if tr := st.Transport(); tr != hbone.TransportH3 {
				st.Close()
				return nil, errors.New("tunnel over " + tr + ", want h3")
			}
			if dials != nil {
				dials.Add(1)
			}
			return st, nil
		}}
	if h2 {
		rt.Protocols.SetUnencryptedHTTP2(true)
	} else {
		rt.Protocols.SetHTTP1(true)
	}
	c := &http.Client{Transport: rt, Timeout: 10 * time.Second}
	e.t.Cleanup(c.CloseIdleConnections)
	return c
}

// TestQUICInbound: over HBONE on HTTP/3 the waypoint routes HTTP/1.1 and
// HTTP/2 by its config as over HTTP/2, with the caller's identity as the
// source principal: the allowed caller reaches the backend, another
// identity gets the same 403 from the filter chain's RBAC on both
// transports.
func TestQUICInbound(t *testing.T) {
	e, qaddr := newQUICEnv(t, nil)
	b := newBackend(t, whoami("b"))
	cl := clusterName(svc)
	other := wid(t, "shop", "other")
	allow := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[client-only]-rule[0]": {Permissions: []*rbacv3.Permission{methodIs("GET")},
			Principals: []*rbacv3.Principal{principalIs(e.cliID.String())}}}}
	e.apply(res(listener(httpFC(testVIP, 80, svc, allow))),
		res(routeConfig(chainName(80, svc), toCluster(prefixMatch("/"), cl))),
		res(edsCluster(cl)), res(cla(cl, ep{addr: b.addr})))

	for _, h2 := range []bool{false, true} {
		var dials atomic.Int32
		c := e.h3Client(e.certs, e.cliID, qaddr, h2, &dials)
		for range 2 {
			code, body, hdr := get(t, c, "http://"+svc+"/reviews/1")
			if code != 200 || body != "b:0" || hdr.Get("X-Seen-Path") != "/reviews/1" || hdr.Get("X-Seen-Host") != svc {
				t.Fatalf("h2c=%v over h3: %d %q %v", h2, code, body, hdr)
			}
		}
		if n := dials.Load(); n != 1 {
			t.Errorf("h2c=%v: %d h3 tunnels for 2 requests, want 1 (kept alive)", h2, n)
		}
	}
	// An answer after which the waypoint closes the tunnel (the client's
	// Connection: close) arrives whole: the tunnel ends with FIN, not a
	// reset that would discard it.
	for i := range 2 {
		c := e.h3Client(e.certs, e.cliID, qaddr, false, nil)
		code, body, hdr := get(t, c, "http://"+svc+"/closing", "Connection", "close")
		if code != 200 || body != "b:0" || hdr.Get("X-Seen-Path") != "/closing" {
			t.Fatalf("Connection: close over h3 (%d): %d %q", i, code, body)
		}
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_code="200"`, `source_principal="`+e.cliID.String()+`"`); n != 6 {
		t.Errorf("200s for the client counted %v, want 6", n)
	}

	// The caller the policy does not allow: the same answer on both.
	overH3 := e.h3Client(e.certs, other, qaddr, false, nil)
	overH2 := e.client(other, target, false)
	for name, c := range map[string]*http.Client{"h3": overH3, "h2": overH2} {
		if code, body, _ := get(t, c, "http://"+svc+"/reviews/1"); code != 403 || body != "RBAC: access denied" {
			t.Errorf("another identity over %s: %d %q, want 403 RBAC: access denied", name, code, body)
		}
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_code="403"`, `source_principal="`+other.String()+`"`); n != 2 {
		t.Errorf("403s for the other identity counted %v, want 2 (one per transport)", n)
	}
	if !strings.Contains(e.logs.String(), `"source_principal":"`+other.String()+`"`) {
		t.Errorf("no access log for the denied caller: %s", e.logs.String())
	}
}

// foreignCerts is a caller of another trust domain that trusts the
// waypoint's (so that the waypoint is the side that refuses).
type foreignCerts struct {
	ca    *certs.CA
	trust *testCerts
}

func (f *foreignCerts) GetX509SVID(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	return f.ca.IssueSVID(id, time.Hour)
}

func (f *foreignCerts) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td == f.ca.TrustDomain() {
		return f.ca.Bundle(), nil
	}
	return f.trust.GetX509BundleForTrustDomain(td)
}

// TestQUICForeignCaller: a caller with an SVID of another trust domain is
// refused in the handshake over HTTP/3 as over HTTP/2 (no HTTP answer, no
// fallback to anything), and nothing reaches the backend.
func TestQUICForeignCaller(t *testing.T) {
	e, qaddr := newQUICEnv(t, nil)
	var hits atomic.Int32
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) { hits.Add(1) })
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})...)
	ca, err := certs.NewSelfSignedCA(spiffeid.RequireTrustDomainFromString("example.org"), certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	fc := &foreignCerts{ca: ca, trust: e.certs}
	stranger := spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/client")
	req := hbone.DialRequest{Source: stranger, Peers: []spiffeid.ID{e.wpID}, Addr: qaddr, Target: netip.MustParseAddrPort(target)}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	qd := &h3.Dialer{Certs: fc}
	defer qd.Close()
	hd := &hbone.Dialer{Certs: fc}
	defer hd.Close()
	for name, dial := range map[string]func(context.Context, hbone.DialRequest) (*hbone.Stream, error){"h3": qd.Dial, "h2": hd.Dial} {
		st, err := dial(ctx, req)
		if err == nil {
			st.Close()
			t.Errorf("a caller of another trust domain got a tunnel over %s", name)
			continue
		}
		var se *hbone.StatusError
		if errors.As(err, &se) {
			t.Errorf("over %s: refused with HTTP %d, want a refused handshake", name, se.Code)
		}
	}
	// The same client with an SVID of the mesh gets through.
	c := e.h3Client(e.certs, e.cliID, qaddr, false, nil)
	if code, _, _ := get(t, c, "http://"+svc+"/"); code != 200 {
		t.Fatalf("the mesh's client: %d", code)
	}
	if n := hits.Load(); n != 1 {
		t.Errorf("backend hit %d times, want 1 (the mesh's client only)", n)
	}
}

// TestQUICDrain: on SIGTERM the HTTP/3 side drains as the HTTP/2 side: not
// ready, still accepting new QUIC connections for DrainDuration with
// answers that make the client reconnect, then no new connection; the
// request in flight over HTTP/3 finishes, and Serve returns after it.
func TestQUICDrain(t *testing.T) {
	const drainFor = time.Second
	e, qaddr := newQUICEnv(t, func(c *Config) { c.DrainDuration = drainFor })
	arrived, release := make(chan struct{}), make(chan struct{})
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(arrived)
			<-release
		}
		io.WriteString(w, "ok")
	})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unblock) // before the backend's Close, which waits for its handlers
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})...)
	ready := func() int {
		resp, err := http.Get(e.ready + "/healthz/ready")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	eventually(t, 2*time.Second, func() bool { return ready() == 200 }, "never ready")

	type result struct {
		code int
		body string
		err  error
	}
	slow := make(chan result, 1)
	go func() {
		c := e.h3Client(e.certs, e.cliID, qaddr, true, nil)
		resp, err := c.Get("http://" + svc + "/slow")
		if err != nil {
			slow <- result{err: err}
			return
		}
		defer resp.Body.Close()
		bb, err := io.ReadAll(resp.Body)
		slow <- result{code: resp.StatusCode, body: string(bb), err: err}
	}()
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request never reached the backend")
	}

	start := time.Now()
	e.cancel() // SIGTERM
	eventually(t, time.Second, func() bool { return ready() == 503 }, "still ready while draining")
	// Draining: a new QUIC connection is still accepted, and its answer
	// tells the client to reconnect.
	c := e.h3Client(e.certs, e.cliID, qaddr, false, nil)
	resp, err := c.Get("http://" + svc + "/")
	if err != nil {
		t.Fatalf("a new QUIC connection while draining: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !resp.Close {
		t.Errorf("answer while draining: %d, Connection: close %v; want 200 and close", resp.StatusCode, resp.Close)
	}
	if d := time.Since(start); d >= drainFor {
		t.Fatalf("the draining request took %s, more than the drain duration: nothing was shown", d)
	}
	// After the drain duration: no new QUIC connection.
	refused := func() bool {
		d := &h3.Dialer{Certs: e.certs, HandshakeTimeout: 300 * time.Millisecond}
		defer d.Close()
		ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
		defer cancel()
		st, err := d.Dial(ctx, hbone.DialRequest{Source: e.cliID, Peers: []spiffeid.ID{e.wpID}, Addr: qaddr,
			Target: netip.MustParseAddrPort(target)})
		if err != nil {
			return true
		}
		st.Close()
		return false
	}
	eventually(t, drainFor+5*time.Second, refused, "new QUIC connections still accepted after the drain duration")
	if d := time.Since(start); d < drainFor {
		t.Errorf("QUIC stopped accepting after %s, before the drain duration %s", d, drainFor)
	}
	select {
	case err := <-e.done:
		t.Fatalf("Serve returned (%v) with a request in flight over HTTP/3", err)
	default:
	}
	unblock()
	select {
	case r := <-slow:
		if r.err != nil || r.code != 200 || r.body != "ok" {
			t.Errorf("the request in flight over HTTP/3: %d %q %v", r.code, r.body, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the request in flight never finished")
	}
	select {
	case err := <-e.done:
		if err != nil {
			t.Error(err)
		}
		e.done <- nil // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after the drain")
	}
}

// TestQUICTCPChain: a tcp_proxy chain over HTTP/3 relays bytes exactly,
// half-closed both ways (the client's FIN reaches the backend, which
// answers after it); an unknown authority is refused with 503 as over
// HTTP/2.
func TestQUICTCPChain(t *testing.T) {
	e, qaddr := newQUICEnv(t, nil)
	const up, down = 1 << 20, 3 << 19
	got := make(chan [32]byte, 1)
	be := listen(t)
	t.Cleanup(func() { be.Close() })
	go func() {
		c, err := be.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		h := sha256.New()
		io.Copy(h, c) // until the client's FIN
		got <- [32]byte(h.Sum(nil))
		io.Copy(c, io.LimitReader(rand.NewChaCha8([32]byte{2}), down))
	}()
	cl := "outbound|9000||db.shop.svc.cluster.local"
	e.apply(res(listener(tcpFC(testVIP, 9000, "db.shop.svc.cluster.local", cl))), res(edsCluster(cl)),
		res(cla(cl, ep{addr: be.Addr().(*net.TCPAddr).AddrPort()})))
	d := &h3.Dialer{Certs: e.certs}
	defer d.Close()
	st, err := d.Dial(t.Context(), hbone.DialRequest{Source: e.cliID, Peers: []spiffeid.ID{e.wpID}, Addr: qaddr,
		Target: netip.MustParseAddrPort(testVIP + ":9000")})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetDeadline(time.Now().Add(20 * time.Second))
	sent := sha256.New()
	if _, err := io.Copy(io.MultiWriter(st, sent), io.LimitReader(rand.NewChaCha8([32]byte{1}), up)); err != nil {
		t.Fatal(err)
	}
	if err := st.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	recv := sha256.New()
	n, err := io.Copy(recv, st)
	if err != nil || n != down {
		t.Fatalf("read %d bytes (%v), want %d then EOF", n, err, down)
	}
	want := sha256.New()
	io.Copy(want, io.LimitReader(rand.NewChaCha8([32]byte{2}), down))
	if !bytes.Equal(recv.Sum(nil), want.Sum(nil)) {
		t.Error("the backend's bytes differ at the client")
	}
	select {
	case h := <-got:
		if !bytes.Equal(h[:], sent.Sum(nil)) {
			t.Error("the client's bytes differ at the backend")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the backend never saw the client's FIN")
	}

	if n := scrape(t, e.metric, "ambit_hbone_connections_opened_total", `transport="h3"`, `reporter="waypoint"`); n != 1 {
		t.Errorf("h3 connections counted %v, want 1", n)
	}

	_, err = d.Dial(t.Context(), hbone.DialRequest{Source: e.cliID, Peers: []spiffeid.ID{e.wpID}, Addr: qaddr,
		Target: netip.MustParseAddrPort("10.9.9.9:80")})
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != 503 {
		t.Errorf("unknown authority over h3: %v, want HBONE 503", err)
	}
}
