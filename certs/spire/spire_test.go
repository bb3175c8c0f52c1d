package spire_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/spire"
	spireenv "github.com/ambit-mesh/ambit/integration/spire"
)

var td = spiffeid.RequireTrustDomainFromString("spire.test")

// env is a real spire-server and spire-agent; this test binary is an
// authorized delegate (a unix:path entry for it) and a workload.
type env struct {
	server *spireenv.Server
	agent  *spireenv.Agent
	nodes  spiffeid.ID // the agents' alias, parent of the workload entries
	exe    string
	dir    string
}

func start(t *testing.T, delegates bool) *env {
	t.Helper()
	serverBin, agentBin, err := spireenv.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	s, err := spireenv.StartServer(ctx, spireenv.ServerOptions{Bin: serverBin, Dir: filepath.Join(dir, "server"), TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	e := &env{server: s, nodes: spiffeid.RequireFromPath(td, "/ambit/nodes"), dir: dir}
	tok, err := s.JoinToken(ctx, e.nodes)
	if err != nil {
		t.Fatal(err)
	}
	if e.exe, err = os.Executable(); err != nil {
		t.Fatal(err)
	}
	if e.exe, err = filepath.EvalSymlinks(e.exe); err != nil {
		t.Fatal(err)
	}
	delegate := spiffeid.RequireFromPath(td, "/ns/ambit-system/sa/ztunnel")
	// The caller of the admin socket is attested like a workload: this test
	// binary, by its path.
	e.entry(t, spireenv.Entry{ID: delegate, Parent: e.nodes, Selectors: []string{"unix:path:" + e.exe}})
	var authorized []string
	if delegates {
		authorized = []string{delegate.String()}
	}
	a, err := spireenv.StartAgent(ctx, spireenv.AgentOptions{Bin: agentBin, Dir: filepath.Join(dir, "agent"), Server: s,
		JoinToken: tok, AuthorizedDelegates: authorized, SyncInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	e.agent = a
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{s.Log(), a.Log()} {
				b, _ := os.ReadFile(f)
				if len(b) > 6000 {
					b = b[len(b)-6000:]
				}
				t.Logf("%s:\n%s", f, b)
			}
		}
	})
	return e
}

func (e *env) entry(t *testing.T, en spireenv.Entry) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id, err := e.server.CreateEntry(ctx, en)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func logger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Logf("%s", p); return len(p), nil }

// eventually polls cond every 50ms until it holds or d passes.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func get(p certs.Provider, id spiffeid.ID) (*x509svid.SVID, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return p.GetX509SVID(ctx, id)
}

// TestDelegated runs the ztunnel's provider against a real agent: SVIDs by
// k8s selectors that verify against SPIRE's bundle, rotation as SPIRE
// pushes it, the last SVID kept while the agent is gone and refused once it
// expires, recovery when the agent returns, an entry's deletion.
func TestDelegated(t *testing.T) {
	e := start(t, true)
	const ttl = 8 * time.Second
	client := spiffeid.RequireFromPath(td, "/ns/shop/sa/client")
	server := spiffeid.RequireFromPath(td, "/ns/shop/sa/server")
	nobody := spiffeid.RequireFromPath(td, "/ns/shop/sa/nobody")
	// A federated trust domain's bundle (as a federation relationship
	// would store it): the agent sends it with the client's SVIDs.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	foreign := spiffeid.RequireTrustDomainFromString("partner.test")
	foreignCA, err := certs.NewSelfSignedCA(foreign, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.server.SetFederatedBundle(ctx, foreignCA.Bundle()); err != nil {
		t.Fatal(err)
	}
	e.entry(t, spireenv.Entry{ID: client, Parent: e.nodes, Selectors: []string{"k8s:ns:shop", "k8s:sa:client"}, X509SVIDTTL: ttl,
		FederatesWith: []spiffeid.TrustDomain{foreign}})
	serverEntry := e.entry(t, spireenv.Entry{ID: server, Parent: e.nodes, Selectors: []string{"k8s:ns:shop", "k8s:sa:server"}, X509SVIDTTL: time.Hour})
	// Another entry matching a subset of client's selectors: the provider
	// must still pick client's own.
	e.entry(t, spireenv.Entry{ID: spiffeid.RequireFromPath(td, "/shop-any"), Parent: e.nodes, Selectors: []string{"k8s:ns:shop"}})

	p := &spire.Delegated{AdminSocket: e.agent.AdminSocketPath(), Logger: logger(t)}
	defer p.Close()
	p.SetIdentities([]spiffeid.ID{client, server})

	bundle, err := e.server.Bundle(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var first *x509svid.SVID
	t.Run("svids-by-selectors-verify-against-spire", func(t *testing.T) {
		for _, id := range []spiffeid.ID{client, server} {
			// Until the agent has synced the delegate's own entry it answers
			// "no identity issued"; the provider retries.
			var s *x509svid.SVID
			var err error
			if !eventually(15*time.Second, func() bool { s, err = get(p, id); return err == nil }) {
				t.Fatalf("%s: %v", id, err)
			}
			got, _, err := x509svid.Verify(s.Certificates, bundle)
			if err != nil || got != id {
				t.Fatalf("%s: verify against spire-server's bundle: %s, %v", id, got, err)
			}
			if id == client {
				first = s
				if life := s.Certificates[0].NotAfter.Sub(s.Certificates[0].NotBefore); life > ttl+time.Minute {
					t.Errorf("client's svid lives %s, want the entry's %s", life, ttl)
				}
			}
		}
		b, err := p.GetX509BundleForTrustDomain(td)
		if err != nil || !b.Equal(bundle) {
			t.Fatalf("provider's bundle = %v (%v), want spire-server's %v", b, err, bundle)
		}
		if _, err := p.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.test")); err == nil {
			t.Error("a bundle for an unknown trust domain")
		}
		var fb *x509bundle.Bundle
		if !eventually(10*time.Second, func() bool { fb, _ = p.GetX509BundleForTrustDomain(foreign); return fb != nil }) {
			t.Fatal("no federated bundle from the agent")
		}
		if !fb.Equal(foreignCA.Bundle()) {
			t.Errorf("federated bundle %v, want %v", fb.X509Authorities(), foreignCA.Bundle().X509Authorities())
		}
		if _, err := get(p, nobody); !errors.Is(err, spire.ErrNoSVID) {
			t.Errorf("identity without an entry: %v, want ErrNoSVID", err)
		}
	})
	if first == nil {
		t.FailNow()
	}

	t.Run("rotation-follows-spire", func(t *testing.T) {
		if !eventually(4*ttl, func() bool { return p.Rotations(client) >= 2 }) {
			t.Fatalf("%d rotations of an %s svid in %s", p.Rotations(client), ttl, 4*ttl)
		}
		s, err := get(p, client)
		if err != nil {
			t.Fatal(err)
		}
		if s.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) == 0 {
			t.Fatal("same serial after rotations")
		}
		t.Logf("%d rotations of the client's %s svid", p.Rotations(client), ttl)
	})

	t.Run("agent-gone-keeps-then-fails-closed-then-recovers", func(t *testing.T) {
		// Just after a rotation, so the held SVID has most of its life left.
		n := p.Rotations(client)
		if !eventually(2*ttl, func() bool { return p.Rotations(client) > n }) {
			t.Fatal("no rotation to start from")
		}
		held, err := get(p, client)
		if err != nil {
			t.Fatal(err)
		}
		e.agent.Stop()
		stopped := time.Now()
		notAfter := held.Certificates[0].NotAfter
		// Still served while valid, and the failure is visible.
		if !eventually(5*time.Second, func() bool {
			for _, st := range p.Certificates() {
				if st.ID == client {
					return st.LastError != "" && st.Serial != ""
				}
			}
			return false
		}) {
			t.Fatalf("agent loss not reported: %+v", p.Certificates())
		}
		if s, err := get(p, client); err != nil || s != held {
			t.Fatalf("with the agent gone, before expiry: %v", err)
		}
		if _, err := get(p, server); err != nil {
			t.Fatalf("server's 1h svid with the agent gone: %v", err)
		}
		// Fails closed once it expires.
		time.Sleep(time.Until(notAfter) + 10*time.Millisecond)
		_, err = get(p, client)
		if err == nil {
			t.Fatal("an expired svid was served")
		}
		t.Logf("agent stopped; svid (valid %s more) served until expiry, then: %v", notAfter.Sub(stopped).Round(time.Millisecond), err)

		restart := time.Now()
		if err := e.agent.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if !eventually(15*time.Second, func() bool { _, err := get(p, client); return err == nil }) {
			t.Fatalf("no svid after the agent returned: %+v", p.Certificates())
		}
		t.Logf("svid again %s after the agent restart began", time.Since(restart).Round(time.Millisecond))
	})

	t.Run("entry-deleted-drops-svid", func(t *testing.T) {
		if err := e.server.DeleteEntry(ctx, serverEntry); err != nil {
			t.Fatal(err)
		}
		if !eventually(15*time.Second, func() bool { _, err := get(p, server); return errors.Is(err, spire.ErrNoSVID) }) {
			t.Fatalf("svid of a deleted entry still served: %+v", p.Certificates())
		}
	})

	t.Run("set-identities-drops", func(t *testing.T) {
		p.SetIdentities([]spiffeid.ID{client})
		if st := p.Certificates(); len(st) != 1 || st[0].ID != client {
			t.Fatalf("after SetIdentities(client): %+v", st)
		}
	})
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := get(p, client); !errors.Is(err, certs.ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
	p.Close() // idempotent
}

// TestDelegatedNotAuthorized: a caller the agent does not list as a delegate
// gets nothing, at once.
func TestDelegatedNotAuthorized(t *testing.T) {
	e := start(t, false)
	client := spiffeid.RequireFromPath(td, "/ns/shop/sa/client")
	e.entry(t, spireenv.Entry{ID: client, Parent: e.nodes, Selectors: []string{"k8s:ns:shop", "k8s:sa:client"}})
	p := &spire.Delegated{AdminSocket: e.agent.AdminSocketPath(), Logger: logger(t)}
	defer p.Close()
	// Once the agent knows the caller (its entry synced), it refuses it for
	// not being a delegate; the provider fails at once, never an SVID.
	var err error
	if !eventually(15*time.Second, func() bool {
		start := time.Now()
		_, err = get(p, client)
		if err == nil {
			t.Fatal("an undelegated caller got an svid")
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("refusal took %s", took)
		}
		return strings.Contains(err.Error(), "authorized delegate")
	}) {
		t.Fatalf("refused, but not as an undelegated caller: %v", err)
	}
	t.Logf("refused: %v", err)
}

// TestWorkload runs the waypoint's provider on the agent's Workload API:
// its own SVID (the agent attests this process), the bundle, nothing else.
func TestWorkload(t *testing.T) {
	e := start(t, true)
	wp := spiffeid.RequireFromPath(td, "/ns/shop/sa/waypoint")
	e.entry(t, spireenv.Entry{ID: wp, Parent: e.nodes, Selectors: []string{"unix:path:" + e.exe}, X509SVIDTTL: 6 * time.Second})
	// Registered, but not for this process.
	other := spiffeid.RequireFromPath(td, "/ns/shop/sa/other")
	e.entry(t, spireenv.Entry{ID: other, Parent: e.nodes, Selectors: []string{"unix:path:/nonexistent"}})

	p := &spire.Workload{Socket: e.agent.SocketPath(), Logger: logger(t)}
	defer p.Close()
	p.SetIdentities([]spiffeid.ID{wp})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bundle, err := e.server.Bundle(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var s *x509svid.SVID
	// The agent may need a sync for the new entry.
	if !eventually(10*time.Second, func() bool { s, err = get(p, wp); return err == nil }) {
		t.Fatal(err)
	}
	if got, _, err := x509svid.Verify(s.Certificates, bundle); err != nil || got != wp {
		t.Fatalf("verify: %s %v", got, err)
	}
	if b, err := p.GetX509BundleForTrustDomain(td); err != nil || !b.Equal(bundle) {
		t.Fatalf("bundle: %v", err)
	}
	if _, err := get(p, other); !errors.Is(err, spire.ErrNoSVID) {
		t.Fatalf("another process's identity: %v, want ErrNoSVID", err)
	}
	first := s.Certificates[0].SerialNumber
	if !eventually(20*time.Second, func() bool {
		s, err := get(p, wp)
		return err == nil && s.Certificates[0].SerialNumber.Cmp(first) != 0
	}) {
		t.Fatal("the waypoint's 6s svid did not rotate in 20s")
	}
}
