package h3

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"time"

	"github.com/ambit-mesh/ambit/hbone"
)

// Defaults of Fallback.
const (
	// DefaultFallbackDialTimeout bounds a QUIC dial before falling back:
	// where UDP is dropped nothing answers at all.
	DefaultFallbackDialTimeout = 2 * time.Second
	// DefaultRetryAfter is how long an address whose QUIC dial failed is
	// dialed over HTTP/2 only.
	DefaultRetryAfter = 5 * time.Minute
	// maxFailures bounds the addresses remembered.
	maxFailures = 4096
)

// Fallback tunnels over HTTP/3 where Use allows it and over HTTP/2
// otherwise. A QUIC dial that fails without an answer from the server (UDP
// blocked, no QUIC listener, a refused handshake, DialTimeout) falls back to
// HTTP/2 at once, and that address is dialed over HTTP/2 only for
// RetryAfter. An answer (401, 503: an *hbone.StatusError) is final. It never
// falls back to anything but HTTP/2 over mutual TLS. H2 and H3 are
// required (give H3 a HandshakeTimeout near DialTimeout: an abandoned QUIC
// dial goes on in the background until then); it is safe for concurrent
// use.
type Fallback struct {
	H2 *hbone.Dialer
	H3 *Dialer
	// Use reports whether r's destination speaks HTTP/3 (nil: all do).
	Use func(r hbone.DialRequest) bool
	// DialTimeout bounds the QUIC attempt (DefaultFallbackDialTimeout if
	// zero).
	DialTimeout time.Duration
	// RetryAfter: see above (DefaultRetryAfter if zero).
	RetryAfter time.Duration
	// OnFallback, if set, is told of each fallback (to log and count).
	OnFallback func(r hbone.DialRequest, err error)

	mu     sync.Mutex                   // guards failed
	failed map[netip.AddrPort]time.Time // address -> QUIC again after
}

// Dial opens a stream as hbone.Dialer.Dial does, over HTTP/3 when it can.
func (f *Fallback) Dial(ctx context.Context, r hbone.DialRequest) (*hbone.Stream, error) {
	if !f.useQUIC(r) {
		return f.H2.Dial(ctx, r)
	}
	qctx, cancel := context.WithTimeout(ctx, orDefault(f.DialTimeout, DefaultFallbackDialTimeout))
	st, err := f.H3.Dial(qctx, r)
	cancel()
	if err == nil {
		return st, nil
	}
	var se *hbone.StatusError
	if errors.As(err, &se) || ctx.Err() != nil {
		return nil, err
	}
	f.remember(r.Addr)
	if f.OnFallback != nil {
		f.OnFallback(r, err)
	}
	return f.H2.Dial(ctx, r)
}

func (f *Fallback) useQUIC(r hbone.DialRequest) bool {
	if f.Use != nil && !f.Use(r) {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	until, ok := f.failed[r.Addr]
	if !ok {
		return true
	}
	if time.Now().Before(until) {
		return false
	}
	delete(f.failed, r.Addr)
	return true
}

func (f *Fallback) remember(a netip.AddrPort) {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failed == nil {
		f.failed = map[netip.AddrPort]time.Time{}
	}
	if len(f.failed) >= maxFailures {
		for k, until := range f.failed {
			if now.After(until) {
				delete(f.failed, k)
			}
		}
		if len(f.failed) >= maxFailures {
			clear(f.failed) // worst case: some try QUIC again early
		}
	}
	f.failed[a] = now.Add(orDefault(f.RetryAfter, DefaultRetryAfter))
}

// Conns counts both transports' connections.
func (f *Fallback) Conns() int { return f.H2.Conns() + f.H3.Conns() }

// Close closes both dialers.
func (f *Fallback) Close() error {
	f.H3.Close()
	return f.H2.Close()
}
