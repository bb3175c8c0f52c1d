package waypoint

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
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/identity"
)

// testCerts is a CertSource over certs.CA, issuing (and caching) SVIDs.
type testCerts struct {
	ca *certs.CA

	mu    sync.Mutex // guards svids
	svids map[spiffeid.ID]*x509svid.SVID
}

func (tc *testCerts) GetX509SVID(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if s, ok := tc.svids[id]; ok {
		return s, nil
	}
	s, err := tc.ca.IssueSVID(id, time.Hour)
	if err != nil {
		return nil, err
	}
	tc.svids[id] = s
	return s, nil
}

func (tc *testCerts) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td == tc.ca.TrustDomain() {
		return tc.ca.Bundle(), nil
	}
	return nil, fmt.Errorf("no bundle for %s", td)
}

func wid(t testing.TB, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := identity.Workload(spiffeid.RequireTrustDomainFromString("cluster.local"), ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

var testLog = func() *slog.Logger {
	if os.Getenv("WAYPOINT_TEST_DEBUG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}()

// env is a running waypoint with a test CA, plus clients.
type env struct {
	t      testing.TB
	certs  *testCerts
	wpID   spiffeid.ID
	cliID  spiffeid.ID
	p      *Proxy
	hbone  netip.AddrPort
	admin  string
	metric string
	ready  string
	cancel context.CancelFunc
	done   chan error
	logs   *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func listen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// echoListener is a TCP server that echoes every connection, closed at the
// test's end.
func echoListener(t testing.TB) net.Listener {
	t.Helper()
	ln := listen(t)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return ln
}

func newEnv(t testing.TB, configure func(*Config)) *env {
	t.Helper()
	ca, err := certs.NewSelfSignedCA(spiffeid.RequireTrustDomainFromString("cluster.local"), certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, certs: &testCerts{ca: ca, svids: map[spiffeid.ID]*x509svid.SVID{}},
		wpID: wid(t, "shop", "waypoint"), cliID: wid(t, "shop", "client"), logs: &syncBuffer{}}
	cfg := Config{Identity: e.wpID, Certs: e.certs, Logger: testLog,
		AccessLog: slog.New(slog.NewJSONHandler(e.logs, nil))}
	if configure != nil {
		configure(&cfg)
	}
	e.p, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ls := Listeners{HBONE: listen(t), Admin: listen(t), Metrics: listen(t), Ready: listen(t)}
	e.hbone = ls.HBONE.Addr().(*net.TCPAddr).AddrPort()
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
	return e
}

func (e *env) apply(rs ...Resource) {
	e.t.Helper()
	if err := e.p.Apply(rs); err != nil {
		e.t.Fatal(err)
	}
}

// client returns an HTTP client that reaches target (a VIP:port) through
// the waypoint over HBONE as id; h2 selects HTTP/2 prior knowledge.
func (e *env) client(id spiffeid.ID, target string, h2 bool) *http.Client {
	d := &hbone.Dialer{Certs: e.certs}
	e.t.Cleanup(func() { d.Close() })
	tgt := netip.MustParseAddrPort(target)
	dial := func(ctx context.Context) (net.Conn, error) {
		return d.Dial(ctx, hbone.DialRequest{Source: id, Peers: []spiffeid.ID{e.wpID}, Addr: e.hbone, Target: tgt,
			ForwardedFor: netip.MustParseAddrPort("10.1.0.7:40000"),
			Baggage:      "k8s.namespace.name=shop,k8s.deployment.name=client,service.name=client,service.version=v1"})
	}
	rt := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
		MaxIdleConnsPerHost: 100, Protocols: new(http.Protocols)}
	if h2 {
		rt.Protocols.SetUnencryptedHTTP2(true) // prior knowledge
	} else {
		rt.Protocols.SetHTTP1(true)
	}
	c := &http.Client{Transport: rt, Timeout: 20 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	e.t.Cleanup(c.CloseIdleConnections)
	return c
}

// rawStream opens one HBONE stream to target, for hand-written bytes.
func (e *env) rawStream(target string) net.Conn {
	e.t.Helper()
	d := &hbone.Dialer{Certs: e.certs}
	e.t.Cleanup(func() { d.Close() })
	s, err := d.Dial(e.t.Context(), hbone.DialRequest{Source: e.cliID, Peers: []spiffeid.ID{e.wpID}, Addr: e.hbone,
		Target: netip.MustParseAddrPort(target)})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { s.Close() })
	return s
}

// backend is an HTTP server on loopback.
type backend struct {
	*httptest.Server
	addr netip.AddrPort
}

func newBackend(t testing.TB, h http.HandlerFunc) *backend {
	t.Helper()
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	return &backend{Server: s, addr: netip.MustParseAddrPort(strings.TrimPrefix(s.URL, "http://"))}
}

// newH2CBackend serves HTTP/2 prior knowledge (and HTTP/1.1).
func newH2CBackend(t testing.TB, h http.HandlerFunc) *backend {
	t.Helper()
	s := httptest.NewUnstartedServer(h)
	s.Config.Protocols = new(http.Protocols)
	s.Config.Protocols.SetHTTP1(true)
	s.Config.Protocols.SetUnencryptedHTTP2(true)
	s.Start()
	t.Cleanup(s.Close)
	return &backend{Server: s, addr: netip.MustParseAddrPort(strings.TrimPrefix(s.URL, "http://"))}
}

// get does a GET and returns status, body and headers.
func get(t testing.TB, c *http.Client, url string, hdr ...string) (int, string, http.Header) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: body: %v", url, err)
	}
	return resp.StatusCode, string(b), resp.Header
}

// scrape returns the sum of metric samples whose line contains all of
// substrs.
func scrape(t testing.TB, url, name string, substrs ...string) float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, s := range substrs {
			ok = ok && strings.Contains(line, s)
		}
		if ok {
			var v float64
			fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v)
			sum += v
		}
	}
	return sum
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, d time.Duration, cond func() bool, msg string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func getJSON(t testing.TB, url string, v any) {
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
