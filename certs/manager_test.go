package certs

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ambit-mesh/ambit/identity"
)

// testIssuer wraps a CA (which the test may swap) and can be made to fail.
type testIssuer struct {
	mu    sync.Mutex
	ca    *CA
	fail  error
	block bool
	calls map[spiffeid.ID]int
	total atomic.Int32
}

func (i *testIssuer) Issue(ctx context.Context, id spiffeid.ID, csr []byte) ([]*x509.Certificate, error) {
	i.total.Add(1)
	i.mu.Lock()
	if i.calls == nil {
		i.calls = map[spiffeid.ID]int{}
	}
	i.calls[id]++
	ca, fail, block := i.ca, i.fail, i.block
	i.mu.Unlock()
	if block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if fail != nil {
		return nil, fail
	}
	return ca.Issue(ctx, id, csr)
}

func (i *testIssuer) TrustBundle(ctx context.Context) (*x509bundle.Bundle, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.ca.TrustBundle(ctx)
}

func (i *testIssuer) set(ca *CA, fail error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if ca != nil {
		i.ca = ca
	}
	i.fail = fail
}

func (i *testIssuer) count(id spiffeid.ID) int {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.calls[id]
}

type managerFixture struct {
	clk *clocktesting.FakeClock
	ca  *CA
	iss *testIssuer
	m   *Manager
}

func newManagerFixture(t *testing.T) *managerFixture {
	t.Helper()
	clk := clocktesting.NewFakeClock(testNow)
	ca, err := NewSelfSignedCA(identity.DefaultTrustDomain, Options{Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	f := &managerFixture{clk: clk, ca: ca, iss: &testIssuer{ca: ca}}
	f.m = &Manager{Issuer: f.iss, Clock: clk, MinBackoff: time.Second, MaxBackoff: time.Minute}
	t.Cleanup(func() { f.m.Close() })
	return f
}

// eventually polls cond (real time) for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitTimers waits until the manager's n goroutines sleep on the fake clock.
func (f *managerFixture) waitTimers(t *testing.T, n int) {
	t.Helper()
	eventually(t, "renewal timers", func() bool { return f.clk.Waiters() >= n })
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestManagerIssuesVerifiableSVID(t *testing.T) {
	f := newManagerFixture(t)
	id := mustID(t, "shop", "cart")
	svid, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := x509svid.Verify(svid.Certificates, f.m, x509svid.WithTime(f.clk.Now()))
	if err != nil || got != id {
		t.Fatalf("verify against the manager's bundle: %s, %v", got, err)
	}
	if _, err := f.m.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.example")); err == nil {
		t.Fatal("bundle for a foreign trust domain")
	}
	again, err := f.m.GetX509SVID(ctxTimeout(t, time.Second), id)
	if err != nil || again != svid {
		t.Fatalf("second call did not return the held certificate (%v)", err)
	}
	if n := f.iss.count(id); n != 1 {
		t.Fatalf("issuer called %d times, want 1", n)
	}
}

func TestManagerRenewsAtHalfLife(t *testing.T) {
	f := newManagerFixture(t)
	id := mustID(t, "shop", "cart")
	first, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
	if err != nil {
		t.Fatal(err)
	}
	leaf := first.Certificates[0]
	half := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
	f.waitTimers(t, 1)
	f.clk.SetTime(half.Add(-time.Second))
	time.Sleep(20 * time.Millisecond)
	if n := f.iss.count(id); n != 1 {
		t.Fatalf("renewed before half-life (%d requests)", n)
	}
	f.clk.SetTime(half)
	eventually(t, "renewal", func() bool { return f.iss.count(id) == 2 })
	eventually(t, "new certificate", func() bool {
		s, err := f.m.GetX509SVID(ctxTimeout(t, time.Second), id)
		return err == nil && s.Certificates[0].SerialNumber.Cmp(leaf.SerialNumber) != 0
	})
	st := f.m.Certificates()
	if len(st) != 1 || st[0].ID != id || !st[0].NotAfter.After(leaf.NotAfter) || st[0].Failures != 0 {
		t.Fatalf("Certificates() = %+v", st)
	}
}

func TestManagerBacksOffWithJitterAndRecovers(t *testing.T) {
	f := newManagerFixture(t)
	id := mustID(t, "shop", "cart")
	f.iss.set(nil, errors.New("ca unavailable"))
	f.m.SetIdentities([]spiffeid.ID{id})
	// Retry n waits in [d/2, d], d = 1s * 2^(n-1), capped at 1 minute.
	for n := 1; n <= 8; n++ {
		eventually(t, "failed attempt", func() bool { return f.iss.count(id) == n })
		f.waitTimers(t, 1)
		d := min(time.Second<<(n-1), time.Minute)
		st := f.m.Certificates()[0]
		wait := st.RenewAt.Sub(f.clk.Now())
		if wait < d/2 || wait > d || st.Failures != n || st.LastError == "" {
			t.Fatalf("attempt %d: retry in %s (want %s..%s), status %+v", n, wait, d/2, d, st)
		}
		f.clk.Step(d/2 - time.Millisecond)
		time.Sleep(5 * time.Millisecond)
		if got := f.iss.count(id); got != n {
			t.Fatalf("attempt %d: retried before the backoff (%d requests)", n, got)
		}
		f.clk.Step(d/2 + time.Millisecond)
	}
	// A caller gets the last error at once, not a certificate and not a hang.
	_, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
	if err == nil || !strings.Contains(err.Error(), "ca unavailable") {
		t.Fatalf("GetX509SVID while failing: %v", err)
	}
	// The last step started attempt 9; let it fail and arm its retry timer
	// before the clock moves, or the step could land before the timer exists.
	eventually(t, "ninth attempt", func() bool { return f.iss.count(id) == 9 })
	f.waitTimers(t, 1)
	f.iss.set(nil, nil)
	f.clk.Step(time.Minute)
	eventually(t, "recovery", func() bool {
		_, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
		return err == nil
	})
	if st := f.m.Certificates()[0]; st.Failures != 0 || st.LastError != "" {
		t.Fatalf("status after recovery: %+v", st)
	}
}

func TestManagerNeverReturnsExpiredCertificate(t *testing.T) {
	f := newManagerFixture(t)
	id := mustID(t, "shop", "cart")
	svid, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
	if err != nil {
		t.Fatal(err)
	}
	f.iss.set(nil, errors.New("ca down"))
	f.waitTimers(t, 1)
	f.clk.SetTime(svid.Certificates[0].NotAfter.Add(-time.Second))
	if s, err := f.m.GetX509SVID(ctxTimeout(t, time.Second), id); err != nil || s != svid {
		t.Fatalf("still-valid certificate not returned: %v", err)
	}
	f.clk.SetTime(svid.Certificates[0].NotAfter)
	eventually(t, "renewal attempts", func() bool { return f.iss.count(id) >= 2 })
	s, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
	if err == nil {
		t.Fatalf("got a certificate that expired at %s (now %s)", s.Certificates[0].NotAfter, f.clk.Now())
	}
	if !strings.Contains(err.Error(), "ca down") {
		t.Fatalf("error %v", err)
	}
	// Once the CA is back, the next retry brings a valid certificate.
	f.iss.set(nil, nil)
	eventually(t, "recovery", func() bool {
		// Move time only once the retry is waiting on the clock: a step
		// taken before its timer is set would be lost (the test was flaky).
		if f.clk.Waiters() > 0 {
			f.clk.Step(2 * time.Minute)
		}
		s, err = f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
		return err == nil
	})
	if !f.clk.Now().Before(s.Certificates[0].NotAfter) {
		t.Fatal("after recovery: an expired certificate")
	}
}

func TestManagerSetIdentitiesPrefetchesAndDrops(t *testing.T) {
	f := newManagerFixture(t)
	a, b, c := mustID(t, "shop", "a"), mustID(t, "shop", "b"), mustID(t, "shop", "c")
	f.m.SetIdentities([]spiffeid.ID{a, b})
	eventually(t, "prefetch", func() bool {
		st := f.m.Certificates()
		return len(st) == 2 && st[0].Serial != "" && st[1].Serial != ""
	})
	if f.iss.count(a) != 1 || f.iss.count(b) != 1 {
		t.Fatalf("requests: a=%d b=%d", f.iss.count(a), f.iss.count(b))
	}
	// c on demand, then dropped with a.
	if _, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), c); err != nil {
		t.Fatal(err)
	}
	f.m.SetIdentities([]spiffeid.ID{b})
	st := f.m.Certificates()
	if len(st) != 1 || st[0].ID != b {
		t.Fatalf("Certificates() after drop = %+v", st)
	}
	// The dropped identities' goroutines are gone: only b's timer remains.
	f.waitTimers(t, 1)
	eventually(t, "dropped goroutines to exit", func() bool { return f.clk.Waiters() == 1 })
	// A dropped identity's old certificate is not served: asking again fetches anew.
	if _, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), a); err != nil {
		t.Fatal(err)
	}
	if n := f.iss.count(a); n != 2 {
		t.Fatalf("a requested %d times, want 2", n)
	}
}

// Root rotation: the CA moves to a new root while the bundle carries both;
// peers holding certificates from the old root keep verifying, and the new
// bundle reaches the manager without a restart.
func TestManagerRootRotation(t *testing.T) {
	f := newManagerFixture(t)
	id := mustID(t, "shop", "cart")
	peerID := mustID(t, "shop", "peer")
	first, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
	if err != nil {
		t.Fatal(err)
	}
	oldPeer, err := f.ca.IssueSVID(peerID, 0)
	if err != nil {
		t.Fatal(err)
	}

	// Step 1: a new root, signing; the old root stays in the bundle.
	next, err := NewSelfSignedCA(identity.DefaultTrustDomain, Options{Now: f.clk.Now, ExtraRoots: []*x509.Certificate{f.ca.SigningCertificate()}})
	if err != nil {
		t.Fatal(err)
	}
	f.iss.set(next, nil)
	f.waitTimers(t, 1)
	leaf := first.Certificates[0]
	f.clk.SetTime(leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2))
	var renewed *x509svid.SVID
	eventually(t, "renewal under the new root", func() bool {
		renewed, err = f.m.GetX509SVID(ctxTimeout(t, time.Second), id)
		return err == nil && renewed != first
	})
	now := x509svid.WithTime(f.clk.Now())
	if _, chains, err := x509svid.Verify(renewed.Certificates, f.m, now); err != nil || !chains[0][len(chains[0])-1].Equal(next.SigningCertificate()) {
		t.Fatalf("renewed certificate does not chain to the new root: %v", err)
	}
	if _, _, err := x509svid.Verify(oldPeer.Certificates, f.m, now); err != nil {
		t.Fatalf("a peer with an old-root certificate no longer verifies during rotation: %v", err)
	}
	newPeer, _ := next.IssueSVID(peerID, 0)
	if _, _, err := x509svid.Verify(newPeer.Certificates, f.m, now); err != nil {
		t.Fatalf("new-root peer: %v", err)
	}

	// Step 2: the old root leaves the bundle; old-root certificates stop verifying.
	final, err := NewCA(identity.DefaultTrustDomain, next.cert, next.signer, nil, []*x509.Certificate{next.cert}, Options{Now: f.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	f.iss.set(final, nil)
	f.waitTimers(t, 1)
	leaf = renewed.Certificates[0]
	f.clk.SetTime(leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2))
	eventually(t, "bundle without the old root", func() bool {
		b, err := f.m.GetX509BundleForTrustDomain(identity.DefaultTrustDomain)
		return err == nil && len(b.X509Authorities()) == 1
	})
	if _, _, err := x509svid.Verify(oldPeer.Certificates, f.m, x509svid.WithTime(f.clk.Now())); err == nil {
		t.Fatal("old-root certificate verifies after the old root left the bundle")
	}
}

func TestManagerClose(t *testing.T) {
	f := newManagerFixture(t)
	id := mustID(t, "shop", "cart")
	f.iss.mu.Lock()
	f.iss.block = true // requests hang until canceled
	f.iss.mu.Unlock()
	errc := make(chan error, 1)
	go func() {
		_, err := f.m.GetX509SVID(t.Context(), id)
		errc <- err
	}()
	eventually(t, "first attempt", func() bool { return f.iss.count(id) >= 1 })
	if err := f.m.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("waiting caller got %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake a waiting caller")
	}
	if f.clk.Waiters() != 0 {
		t.Fatal("a goroutine still sleeps after Close")
	}
	if err := f.m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := f.m.GetX509SVID(t.Context(), id); !errors.Is(err, ErrClosed) {
		t.Fatalf("GetX509SVID after Close: %v", err)
	}
	f.m.SetIdentities([]spiffeid.ID{id}) // no-op, must not start anything
	if n := len(f.m.Certificates()); n != 0 {
		t.Fatalf("%d certificates after Close", n)
	}
	var zero Manager
	if err := zero.Close(); err != nil {
		t.Fatal(err)
	}
}

// A manager checks what it gets: a certificate from a CA outside the bundle
// is refused.
func TestManagerRejectsUnverifiableCertificate(t *testing.T) {
	f := newManagerFixture(t)
	rogue := newTestCA(t)
	f.iss.set(nil, nil)
	f.m.Issuer = &splitIssuer{signer: rogue, bundle: f.ca}
	id := mustID(t, "shop", "cart")
	_, err := f.m.GetX509SVID(ctxTimeout(t, 10*time.Second), id)
	if err == nil || !strings.Contains(err.Error(), "does not verify against the bundle") {
		t.Fatalf("accepted a certificate that does not chain to the bundle (err %v)", err)
	}
	if st := f.m.Certificates(); len(st) != 1 || st[0].Failures == 0 {
		t.Fatalf("status: %+v", st)
	}
}

type splitIssuer struct{ signer, bundle *CA }

func (s *splitIssuer) Issue(ctx context.Context, id spiffeid.ID, csr []byte) ([]*x509.Certificate, error) {
	return s.signer.Issue(ctx, id, csr)
}

func (s *splitIssuer) TrustBundle(ctx context.Context) (*x509bundle.Bundle, error) {
	return s.bundle.TrustBundle(ctx)
}
