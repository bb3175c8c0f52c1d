package h3

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/identity"
)

// testCerts is a CertSource over certs.CA: it issues (and caches) SVIDs
// from issuer and serves the bundles of every CA in trusts.
type testCerts struct {
	issuer *certs.CA
	trusts []*certs.CA

	mu    sync.Mutex // guards svids
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
	s, err := tc.issuer.IssueSVID(id, 0)
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

// dbgLog is nil (discard) unless HBONE_TEST_DEBUG is set.
var dbgLog = func() *slog.Logger {
	if os.Getenv("HBONE_TEST_DEBUG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}()

// transport is one of the two ways to the same handler.
type transport struct {
	name  string
	addr  netip.AddrPort // where its server listens (TCP or UDP)
	dial  func(ctx context.Context, r hbone.DialRequest) (*hbone.Stream, error)
	conns func() int
}

// env is a client identity, an HBONE server on TCP and one on UDP (HTTP/3)
// for the workload at 127.0.0.1 (identity srvID), both with handler.
type env struct {
	t      testing.TB
	ca     *certs.CA
	certs  *testCerts
	cliID  spiffeid.ID
	srvID  spiffeid.ID
	h2     *hbone.Server
	h3     *Server
	h2Addr netip.AddrPort
	h3Addr netip.AddrPort
	target netip.AddrPort // the :authority used (127.0.0.1, port unused)
	skew   atomic.Int64   // added to the CA's clock

	mu      sync.Mutex // guards rejects
	rejects []hbone.Rejection
}

func localOnly(id spiffeid.ID) func(netip.Addr) (spiffeid.ID, bool) {
	return func(dst netip.Addr) (spiffeid.ID, bool) {
		if dst == netip.MustParseAddr("127.0.0.1") {
			return id, true
		}
		return spiffeid.ID{}, false
	}
}

func newEnv(t testing.TB, handler hbone.HandlerFunc, configure func(*Server)) *env {
	t.Helper()
	e := &env{t: t}
	ca := newCA(t, "cluster.local", func() time.Time { return time.Now().Add(time.Duration(e.skew.Load())) })
	*e = env{
		t:      t,
		ca:     ca,
		certs:  newTestCerts(ca),
		cliID:  workloadID(t, "cluster.local", "shop", "client"),
		srvID:  workloadID(t, "cluster.local", "shop", "server"),
		target: netip.MustParseAddrPort("127.0.0.1:8080"),
	}
	onReject := func(r hbone.Rejection) {
		e.mu.Lock()
		e.rejects = append(e.rejects, r)
		e.mu.Unlock()
	}
	e.h2 = &hbone.Server{Certs: e.certs, LocalIdentity: localOnly(e.srvID), Handler: handler, OnReject: onReject, Logger: dbgLog}
	e.h3 = &Server{Certs: e.certs, LocalIdentity: localOnly(e.srvID), Handler: handler, OnReject: onReject, Logger: dbgLog}
	if configure != nil {
		configure(e.h3)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.h2Addr = ln.Addr().(*net.TCPAddr).AddrPort()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.h3Addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()
	h2Done, h3Done := make(chan error, 1), make(chan error, 1)
	go func() { h2Done <- e.h2.Serve(ln) }()
	go func() { h3Done <- e.h3.Serve(pc) }()
	t.Cleanup(func() {
		e.h2.Close()
		e.h3.Close()
		if err := <-h2Done; !errors.Is(err, hbone.ErrServerClosed) {
			t.Errorf("h2 Serve: %v", err)
		}
		if err := <-h3Done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("h3 Serve: %v", err)
		}
	})
	return e
}

// transports returns a client for each transport, with certs as the
// client's CertSource.
func (e *env) transports(cs hbone.CertSource) []transport {
	d2 := &hbone.Dialer{Certs: cs, Logger: dbgLog}
	d3 := &Dialer{Certs: cs, Logger: dbgLog}
	e.t.Cleanup(func() { d2.Close(); d3.Close() })
	return []transport{
		{name: "h2", addr: e.h2Addr, dial: d2.Dial, conns: d2.Conns},
		{name: "h3", addr: e.h3Addr, dial: d3.Dial, conns: d3.Conns},
	}
}

func (e *env) request(tr transport) hbone.DialRequest {
	return hbone.DialRequest{
		Source:       e.cliID,
		Peers:        []spiffeid.ID{e.srvID},
		Addr:         tr.addr,
		Target:       e.target,
		ForwardedFor: netip.MustParseAddrPort("10.1.2.3:45678"),
		Baggage:      "k8s.namespace.name=shop",
	}
}

func (e *env) rejections() []hbone.Rejection {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]hbone.Rejection(nil), e.rejects...)
}

// waitFor polls cond until it holds or 5s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
