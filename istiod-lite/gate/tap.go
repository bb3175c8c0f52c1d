package gate

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/monitoring"
)

// Defaults of Tap.
const (
	DefaultCallsPerSecond = 50
	DefaultCallBurst      = 200
	DefaultCheckTimeout   = 5 * time.Second
	maxBuckets            = 100000 // sources with a rate bucket; beyond, idle ones are dropped
)

// Tap admits calls before gRPC creates their stream (install Tap.Handle
// with grpc.InTapHandle). See the package doc.
type Tap struct {
	// Authenticator checks bearer tokens (required). It runs on the
	// connection's reader goroutine: it should answer from memory for known
	// tokens (auth.Cache, auth.HostFile).
	Authenticator auth.Authenticator
	// CallsPerSecond and Burst rate each source IP's calls
	// (DefaultCallsPerSecond, DefaultCallBurst if zero).
	CallsPerSecond float64
	Burst          int
	// CheckTimeout bounds one token check (DefaultCheckTimeout if zero).
	CheckTimeout time.Duration
	// Refusals records refused calls (nil: not recorded).
	Refusals *auth.RefusalLog
	// Metrics counts refused calls by reason (nil: not counted).
	Metrics *monitoring.Metrics
	// Now is the clock (time.Now if nil).
	Now func() time.Time

	mu      sync.Mutex // guards buckets
	buckets map[netip.Addr]*bucket
}

// bucket is a token bucket: tokens at time at.
type bucket struct {
	tokens float64
	at     time.Time
}

func (t *Tap) now() time.Time {
	if t.Now != nil {
		return t.Now()
	}
	return time.Now()
}

// allow takes one call from src's bucket.
func (t *Tap) allow(src netip.Addr) bool {
	rate, burst := t.CallsPerSecond, float64(t.Burst)
	if rate <= 0 {
		rate = DefaultCallsPerSecond
	}
	if burst <= 0 {
		burst = DefaultCallBurst
	}
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.buckets == nil {
		t.buckets = map[netip.Addr]*bucket{}
	}
	b, ok := t.buckets[src]
	if !ok {
		if len(t.buckets) >= maxBuckets {
			for k, v := range t.buckets { // full buckets are no one's memory
				if v.tokens+now.Sub(v.at).Seconds()*rate >= burst {
					delete(t.buckets, k)
				}
			}
		}
		b = &bucket{tokens: burst, at: now}
		t.buckets[src] = b
	}
	b.tokens = min(burst, b.tokens+now.Sub(b.at).Seconds()*rate)
	b.at = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// Handle is the grpc.InTapHandle: it returns the call's context with its
// authenticated caller (auth.NewContext), or a status error that refuses
// the call before its stream exists.
func (t *Tap) Handle(ctx context.Context, info *tap.Info) (context.Context, error) {
	var src netip.Addr
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		src = sourceOf(p.Addr)
	}
	refuse := func(code codes.Code, reason string, attrs ...any) error {
		switch code {
		case codes.ResourceExhausted:
			t.Metrics.Refused(monitoring.RefusedCallRate)
		case codes.Unauthenticated:
			t.Metrics.Refused(monitoring.RefusedUnauthenticated)
		default:
			t.Metrics.Refused(monitoring.RefusedTokenCheck)
		}
		t.Refusals.Refuse("call refused", src.String(), append([]any{"method", info.FullMethodName, "code", code.String(), "reason", reason}, attrs...)...)
		return status.Error(code, reason)
	}
	if !t.allow(src) {
		return nil, refuse(codes.ResourceExhausted, "too many calls from "+src.String())
	}
	token, err := bearer(info.Header.Get("authorization"))
	if err != nil {
		return nil, refuse(codes.Unauthenticated, err.Error())
	}
	to := t.CheckTimeout
	if to <= 0 {
		to = DefaultCheckTimeout
	}
	cctx, cancel := context.WithTimeout(ctx, to)
	defer cancel()
	caller, err := t.Authenticator.Authenticate(cctx, token)
	switch {
	case errors.Is(err, auth.ErrUnauthenticated):
		return nil, refuse(codes.Unauthenticated, err.Error())
	case err != nil:
		return nil, refuse(codes.Unavailable, "cannot verify the token now", "err", err)
	}
	return auth.NewContext(ctx, caller), nil
}

// bearer is auth.BearerToken's rule on raw header values.
func bearer(vals []string) (string, error) {
	if len(vals) != 1 {
		return "", errors.New("want one authorization header with a bearer token")
	}
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "bearer") || strings.TrimSpace(tok) == "" {
		return "", errors.New("authorization is not a bearer token")
	}
	return strings.TrimSpace(tok), nil
}
