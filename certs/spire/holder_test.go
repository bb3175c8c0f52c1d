package spire

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/ambit-mesh/ambit/certs"
)

// Pure logic of what the holder serves as time passes and the agent comes
// and goes; the streams run against a real agent in spire_test.go.

func testSVID(t *testing.T, id spiffeid.ID, serial int64, from, to time.Time) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), NotBefore: from, NotAfter: to, URIs: []*url.URL{id.URL()}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

func TestHolderLifecycle(t *testing.T) {
	now := time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakeClock(now)
	h := newHolder(clk, nil)
	id := spiffeid.RequireFromString("spiffe://spire.test/ns/shop/sa/client")
	h.setIdentities([]spiffeid.ID{id})

	// Before the first SVID: callers wait (bounded by their context).
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := h.get(ctx, id); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("before the first svid: %v, want the caller's deadline", err)
	}
	// A waiter is woken by the first SVID and the first bundles (separate
	// streams: an SVID without bundles is not handed out).
	s1 := testSVID(t, id, 1, now, now.Add(time.Minute))
	got := make(chan error, 1)
	go func() {
		s, err := h.get(context.Background(), id)
		if err == nil && s != s1 {
			err = errors.New("another svid")
		}
		got <- err
	}()
	h.update(id, s1, nil)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel2()
	if _, err := h.get(ctx2, id); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("svid without bundles: %v, want a wait", err)
	}
	h.setBundles([]*x509bundle.Bundle{x509bundle.FromX509Authorities(id.TrustDomain(), s1.Certificates)})
	if err := <-got; err != nil {
		t.Fatalf("waiter: %v", err)
	}
	// A re-sent SVID is not a rotation; a new one is.
	h.update(id, s1, nil)
	s2 := testSVID(t, id, 2, now.Add(30*time.Second), now.Add(90*time.Second))
	clk.SetTime(now.Add(30 * time.Second))
	h.update(id, s2, nil)
	if n := h.rotations(id); n != 1 {
		t.Fatalf("rotations = %d, want 1", n)
	}
	// The agent goes away: the SVID stays in use while valid...
	h.failed(id, errors.New("connection refused"))
	if s, err := h.get(context.Background(), id); err != nil || s != s2 {
		t.Fatalf("agent gone, svid valid: %v", err)
	}
	st := h.status()
	if len(st) != 1 || st[0].Failures != 1 || st[0].LastError == "" || st[0].Serial != "2" {
		t.Fatalf("status: %+v", st)
	}
	// ...and is refused, at once, from its NotAfter on (fail closed).
	clk.SetTime(now.Add(90 * time.Second))
	if _, err := h.get(context.Background(), id); err == nil {
		t.Fatal("an expired svid was served")
	}
	// The agent returns with a new one.
	s3 := testSVID(t, id, 3, now.Add(90*time.Second), now.Add(150*time.Second))
	h.update(id, s3, nil)
	if s, err := h.get(context.Background(), id); err != nil || s != s3 {
		t.Fatalf("after the agent returned: %v", err)
	}
	// An update without it (entry deleted) drops it.
	h.update(id, nil, ErrNoSVID)
	if _, err := h.get(context.Background(), id); !errors.Is(err, ErrNoSVID) {
		t.Fatalf("after the entry went: %v", err)
	}
	// An expired SVID with a live stream (agent not rotating) fails too.
	h.update(id, s3, nil)
	clk.SetTime(now.Add(151 * time.Second))
	if _, err := h.get(context.Background(), id); err == nil {
		t.Fatal("expired svid served while the stream was up")
	}
	// Dropped identities and Close wake waiters.
	other := spiffeid.RequireFromString("spiffe://spire.test/ns/shop/sa/other")
	h.setIdentities([]spiffeid.ID{other})
	if st := h.status(); len(st) != 1 || st[0].ID != other {
		t.Fatalf("after SetIdentities: %+v", st)
	}
	go func() { _, err := h.get(context.Background(), other); got <- err }()
	if !h.close() || h.close() {
		t.Fatal("close is not once")
	}
	if err := <-got; !errors.Is(err, certs.ErrClosed) {
		t.Fatalf("waiter at close: %v", err)
	}
}

func TestBackoff(t *testing.T) {
	for n, want := range map[int]time.Duration{1: 200 * time.Millisecond, 2: 400 * time.Millisecond, 5: 3200 * time.Millisecond, 9: 5 * time.Second} {
		for range 20 {
			if d := backoff(n, 0, 0); d < want/2 || d > want {
				t.Fatalf("backoff(%d) = %s, want in [%s, %s]", n, d, want/2, want)
			}
		}
	}
}

func TestParseBundlesRejectsGarbage(t *testing.T) {
	if _, err := parseBundles(map[string][]byte{"spiffe://a.test": []byte("junk")}); err == nil {
		t.Error("junk DER accepted")
	}
	if _, err := parseBundles(map[string][]byte{"not a td!": nil}); err == nil {
		t.Error("bad trust domain accepted")
	}
}
