package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
)

// testCerts is a CertSource over certs.CA: it issues (and caches) SVIDs
// from issuer and serves the bundles of every CA in trusts.
type testCerts struct {
	issuer *certs.CA
	trusts []*certs.CA
	ttl    time.Duration

	mu    sync.Mutex
	svids map[spiffeid.ID]*x509svid.SVID
}

func newTestCerts(issuer *certs.CA, trusts ...*certs.CA) *testCerts {
	if len(trusts) == 0 {
		trusts = []*certs.CA{issuer}
	}
	return &testCerts{issuer: issuer, trusts: trusts, svids: map[spiffeid.ID]*x509svid.SVID{}}
}

func (tc *testCerts) GetX509SVID(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if s, ok := tc.svids[id]; ok {
		return s, nil
	}
	s, err := tc.issuer.IssueSVID(id, tc.ttl)
	if err != nil {
		return nil, err
	}
	tc.svids[id] = s
	return s, nil
}

func (tc *testCerts) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	for _, ca := range tc.trusts {
		if ca.TrustDomain() == td {
			return ca.Bundle(), nil
		}
	}
	return nil, fmt.Errorf("no bundle for %s", td)
}

func newCA(t testing.TB, td string, now func() time.Time) *certs.CA {
	t.Helper()
	ca, err := certs.NewSelfSignedCA(spiffeid.RequireTrustDomainFromString(td), certs.Options{Now: now})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func workloadID(t testing.TB, td, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := identity.Workload(spiffeid.RequireTrustDomainFromString(td), ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// env is a client identity, an HBONE server for the workload at 127.0.0.1
// (identity srvID) and an upstream "pod" listener on 127.0.0.1.
type env struct {
	t        testing.TB
	ca       *certs.CA
	certs    *testCerts
	cliID    spiffeid.ID
	srvID    spiffeid.ID
	server   *Server
	addr     netip.AddrPort // the HBONE listener
	upstream net.Listener
	target   netip.AddrPort // the upstream listener
	serveErr chan error
	skew     atomic.Int64 // added to the CA's clock
}

// newEnv starts the server (configure tweaks it before Serve) and an
// upstream that runs pod for every connection. The default handler allows
// every peer and dials the target.
func newEnv(t testing.TB, pod func(net.Conn), configure func(*Server)) *env {
	t.Helper()
	e := &env{t: t}
	ca := newCA(t, "cluster.local", func() time.Time { return time.Now().Add(time.Duration(e.skew.Load())) })
	*e = env{
		t:     t,
		ca:    ca,
		certs: newTestCerts(ca),
		cliID: workloadID(t, "cluster.local", "shop", "client"),
		srvID: workloadID(t, "cluster.local", "shop", "server"),
	}
	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.upstream = up
	e.target = up.Addr().(*net.TCPAddr).AddrPort()
	var podWG sync.WaitGroup
	podWG.Add(1)
	go func() {
		defer podWG.Done()
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			podWG.Add(1)
			go func() {
				defer podWG.Done()
				defer c.Close()
				pod(c)
			}()
		}
	}()
	t.Cleanup(func() { up.Close(); podWG.Wait() })

	e.server = &Server{
		Certs: e.certs,
		LocalIdentity: func(dst netip.Addr) (spiffeid.ID, bool) {
			if dst == netip.MustParseAddr("127.0.0.1") {
				return e.srvID, true
			}
			return spiffeid.ID{}, false
		},
		Handler: HandlerFunc(dialHandler),
	}
	e.server.Logger = dbgLog
	if configure != nil {
		configure(e.server)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	e.serveErr = make(chan error, 1)
	go func() { e.serveErr <- e.server.Serve(ln) }()
	t.Cleanup(func() {
		e.server.Close()
		if err := <-e.serveErr; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v, want ErrServerClosed", err)
		}
	})
	return e
}

// dialHandler connects to the target and joins the stream with it.
func dialHandler(ctx context.Context, r *Request) {
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
	Join(ctx, s, up)
}

// dbgLog is nil (discard) unless HBONE_TEST_DEBUG is set.
var dbgLog = func() *slog.Logger {
	if os.Getenv("HBONE_TEST_DEBUG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}()

func (e *env) dialer() *Dialer {
	d := &Dialer{Certs: e.certs, Logger: dbgLog}
	e.t.Cleanup(func() { d.Close() })
	return d
}

func (e *env) request() DialRequest {
	return DialRequest{
		Source:       e.cliID,
		Peers:        []spiffeid.ID{e.srvID},
		Addr:         e.addr,
		Target:       e.target,
		ForwardedFor: netip.MustParseAddrPort("10.1.2.3:45678"),
	}
}

// tlsClient completes a TLS handshake to the server presenting svid.
func (e *env) tlsClient(svid *x509svid.SVID) (*tls.Conn, error) {
	var cfg *tls.Config
	if svid != nil {
		cfg = clientTLSConfig(svid, e.certs, []spiffeid.ID{e.srvID})
	} else {
		cfg = tlsconfig.TLSClientConfig(e.certs, tlsconfig.AuthorizeID(e.srvID))
		cfg.MinVersion = tls.VersionTLS13
		cfg.NextProtos = []string{alpn}
	}
	nc, err := net.Dial("tcp", e.addr.String())
	if err != nil {
		return nil, err
	}
	c := tls.Client(nc, cfg)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Handshake(); err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// checkGoroutines fails the test if goroutines started during it are still
// running after its cleanups. Register it first: cleanups run last-in
// first-out.
func checkGoroutines(t testing.TB) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutine leak: %d before, %d after\n%s", before, n, relevantStacks(string(buf)))
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func relevantStacks(all string) string {
	var out []string
	for _, g := range strings.Split(all, "\n\n") {
		if strings.Contains(g, "hbone") && !strings.Contains(g, "testing.tRunner") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

// echo copies the connection back to itself, then half-closes.
func echo(c net.Conn) {
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
}
