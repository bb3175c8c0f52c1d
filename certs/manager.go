package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"
)

// Issuer signs certificate requests for a Manager. Implementations: *CA
// (local, in-process) and the gRPC client of istiod-lite's certificate
// service (caclient.Client).
type Issuer interface {
	// Issue signs the DER-encoded PKCS#10 request for id and returns the
	// chain, leaf first.
	Issue(ctx context.Context, id spiffeid.ID, csrDER []byte) ([]*x509.Certificate, error)
	// TrustBundle returns the current trust bundle of the issuer's trust
	// domain (several roots while a root rotates).
	TrustBundle(ctx context.Context) (*x509bundle.Bundle, error)
}

// Provider is the identity source the proxies (ztunnel, waypoint, hbone)
// consume. Manager implements it over an Issuer; a SPIRE-backed provider
// (Delegated Identity API) can implement it without CSRs.
type Provider interface {
	// GetX509SVID returns a currently valid SVID for id, fetching it first
	// if needed; it waits (bounded by ctx) rather than return an expired one.
	GetX509SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error)
	x509bundle.Source
	// SetIdentities names the identities present on the node: they are
	// prefetched and kept fresh; the others are dropped.
	SetIdentities(ids []spiffeid.ID)
	// Certificates lists the held certificates, for admin endpoints.
	Certificates() []CertStatus
	Close() error
}

// CertStatus describes one identity a Manager holds, for debugging.
type CertStatus struct {
	ID        spiffeid.ID `json:"id"`
	Serial    string      `json:"serial,omitempty"` // hex; empty until the first certificate
	NotBefore time.Time   `json:"notBefore"`
	NotAfter  time.Time   `json:"notAfter"`
	RenewAt   time.Time   `json:"renewAt"` // the next attempt (renewal or retry)
	Failures  int         `json:"failures"`
	LastError string      `json:"lastError,omitempty"`
}

// ErrClosed is returned by a closed Manager.
var ErrClosed = errors.New("certificate manager closed")

// Default retry bounds of a Manager.
const (
	DefaultMinBackoff     = time.Second
	DefaultMaxBackoff     = 2 * time.Minute
	DefaultRequestTimeout = 30 * time.Second
)

// Manager holds one X.509-SVID per workload identity present on the node and
// renews each at half of its lifetime; failed requests are retried with
// jittered exponential backoff. It never returns an expired certificate.
// Trust bundle updates (from every successful request) apply to the next
// handshake. It runs one goroutine per held identity and nothing when it
// holds none.
//
// The zero value with Issuer set is ready to use; it must not be copied after
// first use. Close stops it.
type Manager struct {
	// Issuer signs the requests (required).
	Issuer Issuer
	// Clock drives renewals and expiry checks (real time if nil); tests set a
	// fake one.
	Clock clock.Clock
	// Logger (discard if nil).
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the retry delay after a failed request
	// (DefaultMinBackoff, DefaultMaxBackoff if zero); the delay doubles per
	// failure and is jittered to [d/2, d].
	MinBackoff, MaxBackoff time.Duration
	// RequestTimeout bounds one request to the Issuer (DefaultRequestTimeout
	// if zero).
	RequestTimeout time.Duration

	initOnce sync.Once
	baseCtx  context.Context // canceled by Close; the parent of every fetch
	cancel   context.CancelFunc
	wg       sync.WaitGroup // the per-identity goroutines

	mu      sync.Mutex // guards entries, bundle, closed and every entry's mutable fields
	entries map[spiffeid.ID]*entry
	bundle  *x509bundle.Bundle
	closed  bool
}

var _ Provider = (*Manager)(nil)

type entry struct {
	id     spiffeid.ID
	cancel context.CancelFunc
	// Guarded by Manager.mu:
	svid     *x509svid.SVID
	renewAt  time.Time
	failures int
	lastErr  error
	changed  chan struct{} // closed (and replaced) whenever the fields above change, or the entry goes away
	gone     bool
}

func (m *Manager) init() {
	m.initOnce.Do(func() {
		// The Manager's own lifetime is the root of its goroutines' contexts;
		// Close cancels it. Callers' contexts bound only their waits.
		m.baseCtx, m.cancel = context.WithCancel(context.Background())
		m.entries = make(map[spiffeid.ID]*entry)
	})
}

func (m *Manager) clock() clock.Clock {
	if m.Clock != nil {
		return m.Clock
	}
	return clock.RealClock{}
}

func (m *Manager) log() *slog.Logger {
	if m.Logger != nil {
		return m.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// GetX509SVID implements Provider. It returns the held certificate while it
// is valid; otherwise it waits for the attempt in flight (bounded by ctx), and
// when the last attempt failed it returns that error at once rather than
// block a handshake through the backoff. An identity not named by
// SetIdentities is fetched on demand and kept until the next SetIdentities
// that omits it. The returned SVID must not be modified.
func (m *Manager) GetX509SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	if id.IsZero() {
		return nil, errors.New("get svid: empty spiffe id")
	}
	m.init()
	m.mu.Lock()
	for {
		if m.closed {
			m.mu.Unlock()
			return nil, ErrClosed
		}
		e := m.entries[id]
		if e == nil {
			e = m.startLocked(id)
		}
		if e.svid != nil && m.usable(e.svid) {
			s := e.svid
			m.mu.Unlock()
			return s, nil
		}
		if err := e.lastErr; err != nil {
			// Fail fast: the last attempt failed and there is no valid
			// certificate; the next attempt is scheduled with backoff.
			m.mu.Unlock()
			return nil, fmt.Errorf("get svid %s: %w", id, err)
		}
		ch := e.changed
		m.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("get svid %s: %w", id, ctx.Err())
		case <-ch:
		}
		m.mu.Lock()
	}
}

// usable reports whether now is inside the certificate's validity.
func (m *Manager) usable(s *x509svid.SVID) bool {
	now := m.clock().Now()
	leaf := s.Certificates[0]
	return !now.Before(leaf.NotBefore) && now.Before(leaf.NotAfter)
}

// GetX509BundleForTrustDomain implements x509bundle.Source with the bundle
// of the last successful request. The returned bundle must not be modified.
func (m *Manager) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	m.init()
	m.mu.Lock()
	b := m.bundle
	m.mu.Unlock()
	if b == nil {
		return nil, fmt.Errorf("no trust bundle yet for %s", td)
	}
	if b.TrustDomain() != td {
		return nil, fmt.Errorf("no trust bundle for trust domain %s (have %s)", td, b.TrustDomain())
	}
	return b, nil
}

// SetIdentities implements Provider: it starts fetching new identities and
// drops the certificates of those not listed.
func (m *Manager) SetIdentities(ids []spiffeid.ID) {
	m.init()
	want := make(map[spiffeid.ID]bool, len(ids))
	for _, id := range ids {
		if !id.IsZero() {
			want[id] = true
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	for id, e := range m.entries {
		if !want[id] {
			m.dropLocked(e)
		}
	}
	for id := range want {
		if m.entries[id] == nil {
			m.startLocked(id)
		}
	}
}

// Certificates implements Provider, sorted by identity.
func (m *Manager) Certificates() []CertStatus {
	m.init()
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]CertStatus, 0, len(m.entries))
	for _, e := range m.entries {
		st := CertStatus{ID: e.id, RenewAt: e.renewAt, Failures: e.failures}
		if e.lastErr != nil {
			st.LastError = e.lastErr.Error()
		}
		if e.svid != nil {
			leaf := e.svid.Certificates[0]
			st.Serial = leaf.SerialNumber.Text(16)
			st.NotBefore, st.NotAfter = leaf.NotBefore, leaf.NotAfter
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b CertStatus) int {
		switch {
		case a.ID.String() < b.ID.String():
			return -1
		case a.ID.String() > b.ID.String():
			return 1
		}
		return 0
	})
	return out
}

// Close stops all renewals, wakes waiting callers with ErrClosed and waits
// for the goroutines. It is idempotent.
func (m *Manager) Close() error {
	m.init()
	m.mu.Lock()
	if !m.closed {
		m.closed = true
		for _, e := range m.entries {
			m.dropLocked(e)
		}
	}
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	return nil
}

func (m *Manager) startLocked(id spiffeid.ID) *entry {
	ctx, cancel := context.WithCancel(m.baseCtx)
	e := &entry{id: id, cancel: cancel, changed: make(chan struct{})}
	m.entries[id] = e
	m.wg.Add(1)
	go m.run(ctx, e)
	return e
}

func (m *Manager) dropLocked(e *entry) {
	e.cancel()
	e.gone = true
	close(e.changed)
	e.changed = make(chan struct{})
	delete(m.entries, e.id)
}

// run keeps e's certificate fresh until ctx is canceled.
func (m *Manager) run(ctx context.Context, e *entry) {
	defer m.wg.Done()
	clk := m.clock()
	for {
		svid, bundle, err := m.fetch(ctx, e.id)
		if ctx.Err() != nil {
			return
		}
		now := clk.Now()
		m.mu.Lock()
		if e.gone {
			m.mu.Unlock()
			return
		}
		var wait time.Duration
		if err == nil {
			leaf := svid.Certificates[0]
			e.svid, e.failures, e.lastErr = svid, 0, nil
			e.renewAt = leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
			m.bundle = bundle
			wait = e.renewAt.Sub(now)
			m.log().Debug("certificate issued", "id", e.id.String(), "notAfter", leaf.NotAfter, "renewAt", e.renewAt)
		} else {
			e.failures++
			e.lastErr = err
			wait = m.backoff(e.failures)
			e.renewAt = now.Add(wait)
			m.log().Warn("certificate request failed", "id", e.id.String(), "failures", e.failures, "retryIn", wait, "err", err)
		}
		close(e.changed)
		e.changed = make(chan struct{})
		m.mu.Unlock()

		t := clk.NewTimer(max(wait, 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C():
		}
	}
}

// backoff returns the delay before retry number n (n >= 1), jittered to
// [d/2, d] where d = min(MaxBackoff, MinBackoff * 2^(n-1)).
func (m *Manager) backoff(n int) time.Duration {
	lo, hi := m.MinBackoff, m.MaxBackoff
	if lo <= 0 {
		lo = DefaultMinBackoff
	}
	if hi <= 0 {
		hi = DefaultMaxBackoff
	}
	d := lo
	for i := 1; i < n && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	return d/2 + mrand.N(d/2+1)
}

// fetch generates a key, has the Issuer sign a CSR for it, and checks the
// result against the Issuer's bundle.
func (m *Manager) fetch(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, *x509bundle.Bundle, error) {
	timeout := m.RequestTimeout
	if timeout <= 0 {
		timeout = DefaultRequestTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	csr, err := NewCSR(key, id)
	if err != nil {
		return nil, nil, err
	}
	chain, err := m.Issuer.Issue(ctx, id, csr)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: %w", id, err)
	}
	bundle, err := m.Issuer.TrustBundle(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("trust bundle: %w", err)
	}
	if len(chain) == 0 {
		return nil, nil, fmt.Errorf("issue %s: empty chain", id)
	}
	if !publicKeysEqual(chain[0].PublicKey, key.Public()) {
		return nil, nil, fmt.Errorf("issue %s: certificate is not for the requested key", id)
	}
	got, _, err := x509svid.Verify(chain, bundle, x509svid.WithTime(m.clock().Now()))
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: issued certificate does not verify against the bundle: %w", id, err)
	}
	if got != id {
		return nil, nil, fmt.Errorf("issue %s: issued certificate is for %s", id, got)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, bundle, nil
}

// NewCSR returns a DER PKCS#10 request for id whose only SAN is id's URI.
func NewCSR(key any, id spiffeid.ID) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return nil, fmt.Errorf("create csr: %w", err)
	}
	return der, nil
}
