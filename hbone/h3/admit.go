package h3

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"

	"github.com/quic-go/quic-go"
)

// DefaultMaxConnsPerSource bounds a Server's connections (in their
// handshake or established) from one source if MaxConnsPerSource is zero.
const DefaultMaxConnsPerSource = 1024

// errTooManyHandshakes and errTooManyConns refuse a connection attempt
// (quic-go answers CONNECTION_REFUSED) before any TLS work is done.
var (
	errTooManyHandshakes = errors.New("h3: too many pending handshakes")
	errTooManyConns      = errors.New("h3: too many connections from this source")
)

// admission counts a Server's QUIC connections per source, those in their
// handshake and all of them, as hbone.Server's pending set does for TCP:
// each pending handshake holds quic-go state, an SVID lookup and a
// signature before the peer proved anything. Unlike TCP, a connection
// attempt past a bound is refused (the Initial costs us nothing yet), not
// the oldest one shed. A source is an IPv4 address, or the /64 of an IPv6
// address. Past half of a handshake bound, address validation (Retry) is
// required, so spoofed sources cannot fill a real source's share.
type admission struct {
	maxPending, perSource, connsPerSource int

	// mu guards the fields below.
	mu      sync.Mutex
	pending int // handshakes in flight, all sources
	bySrc   map[netip.Addr]*srcCount
	refused int // attempts refused (for tests and logs)
}

type srcCount struct{ pending, conns int }

// admitted is one connection's entry; done and closed are idempotent.
type admitted struct {
	a          *admission
	src        netip.Addr
	handshakes bool // still counted as pending; guarded by a.mu
	live       bool // still counted in conns; guarded by a.mu
}

type admittedKey struct{}

// sourceKey is the source a peer address counts against: the address for
// IPv4 (and v4-mapped IPv6), its /64 for IPv6 (as hbone's).
func sourceKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.WithZone("").Prefix(64)
		return p.Addr()
	}
	return a
}

// needsRetry is Transport.VerifySourceAddress: address validation is
// required once half of the total or of the source's handshake bound is in
// use (or the source is at its connection bound).
func (a *admission) needsRetry(addr net.Addr) bool {
	src := sourceKey(addrPort(addr).Addr())
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.pending >= a.maxPending/2 {
		return true
	}
	c := a.bySrc[src]
	return c != nil && (c.pending >= a.perSource/2 || c.conns >= a.connsPerSource)
}

// connContext is Transport.ConnContext: it refuses a connection attempt
// past a bound, else counts it until its context ends (handshake failed or
// connection closed); handshakeDone uncounts it from the pending ones.
func (a *admission) connContext(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
	src := sourceKey(addrPort(info.RemoteAddr).Addr())
	a.mu.Lock()
	if a.bySrc == nil {
		a.bySrc = make(map[netip.Addr]*srcCount)
	}
	c := a.bySrc[src]
	if c == nil {
		c = &srcCount{}
	}
	var err error
	switch {
	case a.pending >= a.maxPending || c.pending >= a.perSource:
		err = errTooManyHandshakes
	case c.conns >= a.connsPerSource:
		err = errTooManyConns
	}
	if err != nil {
		a.refused++
		a.mu.Unlock()
		return nil, err
	}
	a.bySrc[src] = c
	c.pending++
	c.conns++
	a.pending++
	a.mu.Unlock()
	e := &admitted{a: a, src: src, handshakes: true, live: true}
	context.AfterFunc(ctx, e.closed)
	return context.WithValue(ctx, admittedKey{}, e), nil
}

// handshakeDone uncounts the connection of ctx from the pending ones.
func handshakeDone(ctx context.Context) {
	e, _ := ctx.Value(admittedKey{}).(*admitted)
	if e == nil {
		return
	}
	e.a.mu.Lock()
	defer e.a.mu.Unlock()
	if e.handshakes {
		e.handshakes = false
		e.a.pending--
		e.a.bySrc[e.src].pending--
	}
}

// closed uncounts the connection altogether.
func (e *admitted) closed() {
	a := e.a
	a.mu.Lock()
	defer a.mu.Unlock()
	c := a.bySrc[e.src]
	if e.handshakes {
		e.handshakes = false
		a.pending--
		c.pending--
	}
	if e.live {
		e.live = false
		c.conns--
	}
	if c.pending == 0 && c.conns == 0 {
		delete(a.bySrc, e.src)
	}
}

// counts returns the pending handshakes, the counted sources and the
// attempts refused.
func (a *admission) counts() (pending, sources, refused int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pending, len(a.bySrc), a.refused
}
