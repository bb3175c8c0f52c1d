package spire

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"

	"github.com/ambit-mesh/ambit/certs"
)

// Default bounds of the delay before a lost stream to the agent is
// re-established; short, because a workload's identities wait on it.
const (
	DefaultMinBackoff = 200 * time.Millisecond
	DefaultMaxBackoff = 5 * time.Second
)

// ErrNoSVID is returned (wrapped) for an identity the agent's last update did
// not carry: no registration entry gives it (for the ztunnel's selectors, or
// to the waypoint's process).
var ErrNoSVID = errors.New("spire: no svid for this identity")

// holder keeps what SPIRE pushed: the SVID of every identity asked for, the
// bundles, the last stream error of each. Delegated and Workload feed it.
type holder struct {
	clock clock.Clock
	log   *slog.Logger
	// start is called, with mu held, for an identity that enters the set;
	// stop for one that leaves it.
	start func(*held)

	mu        sync.Mutex // guards every field below and every held's mutable fields
	ids       map[spiffeid.ID]*held
	bundles   map[spiffeid.TrustDomain]*x509bundle.Bundle
	bundleErr error
	// bundlesIn is closed when the first bundles arrive.
	bundlesIn chan struct{}
	closed    bool
}

// held is one identity.
type held struct {
	id     spiffeid.ID
	cancel context.CancelFunc // stops its feed (Delegated); nil otherwise
	// Guarded by holder.mu:
	svid      *x509svid.SVID
	err       error         // of the last attempt or update; nil while the stream delivers
	failures  int           // consecutive stream failures
	rotations int           // SVIDs received after the first
	changed   chan struct{} // closed (and replaced) on every change of the fields above
}

func newHolder(clk clock.Clock, log *slog.Logger) *holder {
	if clk == nil {
		clk = clock.RealClock{}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &holder{clock: clk, log: log, ids: map[spiffeid.ID]*held{}, bundles: map[spiffeid.TrustDomain]*x509bundle.Bundle{},
		bundlesIn: make(chan struct{})}
}

// get implements certs.Provider.GetX509SVID: the held SVID while it is valid;
// an error at once when it has expired or the agent failed (fail closed);
// otherwise (first SVID not there yet) it waits, bounded by ctx.
func (h *holder) get(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	if id.IsZero() {
		return nil, errors.New("get svid: empty spiffe id")
	}
	h.mu.Lock()
	for {
		if h.closed {
			h.mu.Unlock()
			return nil, certs.ErrClosed
		}
		e := h.ids[id]
		if e == nil {
			e = h.addLocked(id)
		}
		if s := e.svid; s != nil {
			leaf := s.Certificates[0]
			now := h.clock.Now()
			if !now.Before(leaf.NotBefore) && now.Before(leaf.NotAfter) {
				if len(h.bundles) == 0 {
					// The SVID came first (separate streams): without
					// bundles the handshake could not verify its peer.
					in := h.bundlesIn
					h.mu.Unlock()
					select {
					case <-ctx.Done():
						return nil, fmt.Errorf("get svid %s: no trust bundle from the spire agent yet: %w", id, ctx.Err())
					case <-in:
					}
					h.mu.Lock()
					continue
				}
				h.mu.Unlock()
				return s, nil
			}
			err := e.err
			h.mu.Unlock()
			if err == nil {
				err = errors.New("spire agent has not rotated it")
			}
			return nil, fmt.Errorf("get svid %s: expired at %s: %w", id, leaf.NotAfter.Format(time.RFC3339), err)
		}
		if err := e.err; err != nil {
			h.mu.Unlock()
			return nil, fmt.Errorf("get svid %s: %w", id, err)
		}
		ch := e.changed
		h.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("get svid %s: waiting for the spire agent: %w", id, ctx.Err())
		case <-ch:
		}
		h.mu.Lock()
	}
}

// bundle implements x509bundle.Source over the bundles SPIRE pushed (its own
// trust domain's and the federated ones).
func (h *holder) bundle(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if b := h.bundles[td]; b != nil {
		return b, nil
	}
	if h.bundleErr != nil {
		return nil, fmt.Errorf("no trust bundle for %s: %w", td, h.bundleErr)
	}
	return nil, fmt.Errorf("no trust bundle for %s from the spire agent", td)
}

// setIdentities makes ids the held set.
func (h *holder) setIdentities(ids []spiffeid.ID) {
	want := make(map[spiffeid.ID]bool, len(ids))
	for _, id := range ids {
		if !id.IsZero() {
			want[id] = true
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return
	}
	for id, e := range h.ids {
		if !want[id] {
			h.dropLocked(e)
		}
	}
	for id := range want {
		if h.ids[id] == nil {
			h.addLocked(id)
		}
	}
}

func (h *holder) addLocked(id spiffeid.ID) *held {
	e := &held{id: id, changed: make(chan struct{})}
	h.ids[id] = e
	if h.start != nil {
		h.start(e)
	}
	return e
}

func (h *holder) dropLocked(e *held) {
	if e.cancel != nil {
		e.cancel()
	}
	delete(h.ids, e.id)
	e.notifyLocked()
}

func (e *held) notifyLocked() {
	close(e.changed)
	e.changed = make(chan struct{})
}

// update records what the agent sent for e.id: svid, or none (err says why).
func (h *holder) update(id spiffeid.ID, svid *x509svid.SVID, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.ids[id]
	if e == nil || h.closed {
		return
	}
	e.failures = 0
	if svid == nil {
		if e.svid != nil {
			h.log.Warn("spire agent no longer gives this identity: dropped", "id", id.String(), "err", err)
		}
		e.svid, e.err = nil, err
		e.notifyLocked()
		return
	}
	leaf := svid.Certificates[0]
	if old := e.svid; old != nil {
		if old.Certificates[0].Equal(leaf) {
			e.err = nil
			e.notifyLocked()
			return // the agent re-sent it (another entry's change)
		}
		e.rotations++
	}
	e.svid, e.err = svid, nil
	e.notifyLocked()
	h.log.Info("svid from spire", "id", id.String(), "serial", leaf.SerialNumber.Text(16),
		"notAfter", leaf.NotAfter, "rotations", e.rotations)
}

// failed records a broken or refused stream for id: the SVID stays (until
// it expires), new callers without a valid one get err.
func (h *holder) failed(id spiffeid.ID, err error) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.ids[id]
	if e == nil || h.closed {
		return 0
	}
	e.failures++
	e.err = err
	e.notifyLocked()
	if e.failures == 1 {
		h.log.Warn("spire agent stream failed: keeping the last svid until it expires", "id", id.String(), "err", err)
	}
	return e.failures
}

// setBundles replaces the bundles (the agent sends them all each time).
func (h *holder) setBundles(bs []*x509bundle.Bundle) {
	m := make(map[spiffeid.TrustDomain]*x509bundle.Bundle, len(bs))
	names := make([]string, 0, len(bs))
	for _, b := range bs {
		m[b.TrustDomain()] = b
		names = append(names, fmt.Sprintf("%s(%d)", b.TrustDomain().Name(), len(b.X509Authorities())))
	}
	slices.Sort(names)
	h.mu.Lock()
	if len(h.bundles) == 0 && len(m) > 0 {
		close(h.bundlesIn)
	}
	h.bundles, h.bundleErr = m, nil
	h.mu.Unlock()
	h.log.Info("trust bundles from spire", "bundles", strings.Join(names, " "))
}

// haveBundles reports whether the agent has sent bundles.
func (h *holder) haveBundles() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.bundles) > 0
}

// bundlesFailed records a broken bundle stream; the last bundles stay.
func (h *holder) bundlesFailed(err error) {
	h.mu.Lock()
	h.bundleErr = err
	h.mu.Unlock()
}

// status implements certs.Provider.Certificates. RenewAt is when SPIRE's
// agent rotates by default (half of the lifetime).
func (h *holder) status() []certs.CertStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]certs.CertStatus, 0, len(h.ids))
	for _, e := range h.ids {
		st := certs.CertStatus{ID: e.id, Failures: e.failures}
		if e.err != nil {
			st.LastError = e.err.Error()
		}
		if e.svid != nil {
			leaf := e.svid.Certificates[0]
			st.Serial = leaf.SerialNumber.Text(16)
			st.NotBefore, st.NotAfter = leaf.NotBefore, leaf.NotAfter
			st.RenewAt = leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b certs.CertStatus) int { return strings.Compare(a.ID.String(), b.ID.String()) })
	return out
}

// rotations returns how many SVIDs after the first id received.
func (h *holder) rotations(id spiffeid.ID) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e := h.ids[id]; e != nil {
		return e.rotations
	}
	return 0
}

// close drops every identity (waking waiters with ErrClosed); it reports
// whether this call closed it.
func (h *holder) close() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return false
	}
	h.closed = true
	for _, e := range h.ids {
		h.dropLocked(e)
	}
	return true
}

// backoff returns the delay before retry n (n >= 1): min * 2^(n-1) capped at
// max, jittered to [d/2, d].
func backoff(n int, lo, hi time.Duration) time.Duration {
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

// sleep waits d on clk or until ctx ends; false if ctx ended.
func sleep(ctx context.Context, clk clock.Clock, d time.Duration) bool {
	t := clk.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C():
		return true
	}
}
