package auth

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc/peer"
)

// Defaults of Cache.
const (
	DefaultCacheMaxAge      = 5 * time.Minute
	DefaultCacheNegativeAge = 10 * time.Second
	DefaultCacheEntries     = 10000
	DefaultCacheInFlight    = 32
	// DefaultCacheInFlightPerSource is one source IP's share of the
	// checks in flight.
	DefaultCacheInFlightPerSource = 4
)

// ErrBusy is wrapped by Cache when too many checks are in flight for one
// more to wait, or its source has its share in flight; services answer
// codes.Unavailable (try again).
var ErrBusy = errors.New("too many token checks in flight")

// Cache remembers another Authenticator's answers by the token's SHA-256, so
// that a caller costs one check (a TokenReview and a pod Get) per token and
// not per call, and a flood of one refused token costs one check per
// NegativeAge. Concurrent checks of one token share one check, at most
// MaxInFlight checks run at once and at most MaxInFlightPerSource of them
// for one source IP (the gRPC peer of the call's context), so that no
// source takes every slot. Precheck, when set, refuses tokens that cannot
// be valid before they take a slot. Only refusals (errors wrapping
// ErrUnauthenticated) are remembered, never failures to check. Callers
// returned carry the token's expiry (Caller.Expires, from a JWT's exp
// claim). The zero value with Authenticator set is usable.
type Cache struct {
	// Authenticator answers what the cache does not know (required).
	Authenticator Authenticator
	// MaxAge bounds how long an accepted token is believed without a new
	// check (DefaultCacheMaxAge if zero); never past the token's own expiry
	// (a JWT's exp claim, read once the token was accepted). It is also how
	// long a deleted pod's token stays usable.
	MaxAge time.Duration
	// NegativeAge is how long a refused token is refused without a new
	// check (DefaultCacheNegativeAge if zero; negative: not remembered).
	NegativeAge time.Duration
	// MaxEntries bounds the accepted and the refused tokens remembered,
	// each (DefaultCacheEntries if zero); beyond, the oldest-expiring are
	// forgotten first.
	MaxEntries int
	// MaxInFlight bounds concurrent checks (DefaultCacheInFlight if zero);
	// a check that finds no slot before its context ends fails with ErrBusy.
	MaxInFlight int
	// MaxInFlightPerSource bounds the checks in flight for one source IP
	// (DefaultCacheInFlightPerSource if zero; at most MaxInFlight); a check
	// beyond it fails at once with ErrBusy. Calls without a gRPC peer in
	// their context are not counted per source.
	MaxInFlightPerSource int
	// Precheck, if set, runs before a token the cache does not know takes
	// a slot: a cheap local check (JWTFilter.Check) whose error (wrapping
	// ErrUnauthenticated) refuses the token without a check. Its refusals
	// are not remembered: they cost less than remembering them.
	Precheck func(token string) error
	// Now is the clock (time.Now if nil).
	Now func() time.Time

	once   sync.Once
	sem    chan struct{} // slots of MaxInFlight
	flight singleflight.Group

	srcMu    sync.Mutex // guards bySource
	bySource map[netip.Addr]int

	mu      sync.Mutex // guards ok and refused
	ok      map[[sha256.Size]byte]cachedCaller
	refused map[[sha256.Size]byte]cachedRefusal
}

type cachedCaller struct {
	c       *Caller
	expires time.Time
}

type cachedRefusal struct {
	err     error
	expires time.Time
}

func (c *Cache) init() {
	c.once.Do(func() {
		n := c.MaxInFlight
		if n <= 0 {
			n = DefaultCacheInFlight
		}
		c.sem = make(chan struct{}, n)
		c.ok = map[[sha256.Size]byte]cachedCaller{}
		c.refused = map[[sha256.Size]byte]cachedRefusal{}
	})
}

func (c *Cache) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// Lookup answers from memory only: known says whether the token is
// remembered (accepted: a caller; refused: an error wrapping
// ErrUnauthenticated).
func (c *Cache) Lookup(token string) (caller *Caller, err error, known bool) {
	c.init()
	h := sha256.Sum256([]byte(token))
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.ok[h]; ok {
		if now.Before(e.expires) {
			cc := *e.c
			return &cc, nil, true
		}
		delete(c.ok, h)
	}
	if e, ok := c.refused[h]; ok {
		if now.Before(e.expires) {
			return nil, e.err, true
		}
		delete(c.refused, h)
	}
	return nil, nil, false
}

// Authenticate implements Authenticator.
func (c *Cache) Authenticate(ctx context.Context, token string) (*Caller, error) {
	if caller, err, known := c.Lookup(token); known {
		return caller, err
	}
	if c.Precheck != nil {
		if err := c.Precheck(token); err != nil {
			return nil, err
		}
	}
	h := sha256.Sum256([]byte(token))
	src, counted := sourceOf(ctx)
	ch := c.flight.DoChan(string(h[:]), func() (any, error) {
		if counted {
			if !c.takeSource(src) {
				return nil, fmt.Errorf("%w: %s has its share of checks in flight", ErrBusy, src)
			}
			defer c.releaseSource(src)
		}
		select {
		case c.sem <- struct{}{}:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %w", ErrBusy, ctx.Err())
		}
		defer func() { <-c.sem }()
		caller, err := c.Authenticator.Authenticate(ctx, token)
		if err == nil && caller != nil {
			if exp, ok := jwtExpiry(token); ok && (caller.Expires.IsZero() || exp.Before(caller.Expires)) {
				cc := *caller
				cc.Expires = exp
				caller = &cc
			}
		}
		c.remember(h, token, caller, err)
		return caller, err
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		cc := *r.Val.(*Caller)
		return &cc, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %w", ErrBusy, ctx.Err())
	}
}

// sourceOf is the IP of the gRPC peer in ctx.
func sourceOf(ctx context.Context) (netip.Addr, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return netip.Addr{}, false
	}
	if ta, ok := p.Addr.(*net.TCPAddr); ok {
		ip, ok := netip.AddrFromSlice(ta.IP)
		return ip.Unmap(), ok
	}
	ap, err := netip.ParseAddrPort(p.Addr.String())
	if err != nil {
		return netip.Addr{}, false
	}
	return ap.Addr().Unmap(), true
}

// takeSource takes one of src's slots, if it has one left.
func (c *Cache) takeSource(src netip.Addr) bool {
	n := c.MaxInFlightPerSource
	if n <= 0 {
		n = DefaultCacheInFlightPerSource
	}
	c.srcMu.Lock()
	defer c.srcMu.Unlock()
	if c.bySource[src] >= min(n, cap(c.sem)) {
		return false
	}
	if c.bySource == nil {
		c.bySource = map[netip.Addr]int{}
	}
	c.bySource[src]++
	return true
}

func (c *Cache) releaseSource(src netip.Addr) {
	c.srcMu.Lock()
	defer c.srcMu.Unlock()
	if c.bySource[src]--; c.bySource[src] <= 0 {
		delete(c.bySource, src)
	}
}

func (c *Cache) remember(h [sha256.Size]byte, token string, caller *Caller, err error) {
	now := c.now()
	max := c.MaxEntries
	if max <= 0 {
		max = DefaultCacheEntries
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case err == nil && caller != nil:
		age := c.MaxAge
		if age <= 0 {
			age = DefaultCacheMaxAge
		}
		exp := now.Add(age)
		if t, ok := jwtExpiry(token); ok && t.Before(exp) {
			exp = t
		}
		if !now.Before(exp) {
			return
		}
		evict(c.ok, max, now, func(e cachedCaller) time.Time { return e.expires })
		cc := *caller
		c.ok[h] = cachedCaller{c: &cc, expires: exp}
	case errors.Is(err, ErrUnauthenticated):
		age := c.NegativeAge
		if age == 0 {
			age = DefaultCacheNegativeAge
		}
		if age < 0 {
			return
		}
		evict(c.refused, max, now, func(e cachedRefusal) time.Time { return e.expires })
		c.refused[h] = cachedRefusal{err: err, expires: now.Add(age)}
	}
}

// evict makes room for one entry in m (at most max): expired entries go
// first, then the one expiring soonest among a few.
func evict[V any](m map[[sha256.Size]byte]V, max int, now time.Time, expires func(V) time.Time) {
	if len(m) < max {
		return
	}
	for k, v := range m {
		if !now.Before(expires(v)) {
			delete(m, k)
		}
	}
	for len(m) >= max {
		var victim [sha256.Size]byte
		var first time.Time
		n := 0
		for k, v := range m { // map order is random: a sample of 8
			if n == 0 || expires(v).Before(first) {
				victim, first = k, expires(v)
			}
			if n++; n == 8 {
				break
			}
		}
		delete(m, victim)
	}
}

// jwtExpiry reads the exp claim of a JWT without verifying it: only for a
// token the Authenticator has accepted.
func jwtExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *json.Number `json:"exp"`
	}
	if json.Unmarshal(raw, &claims) != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	sec, err := claims.Exp.Int64()
	if err != nil {
		return time.Time{}, false
	}
	return time.Unix(sec, 0), true
}
