package auth_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/peer"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
)

const testIssuer = "https://kubernetes.default.svc.cluster.local"

// jwt is an unsigned token with claims (header "good", so that counting
// accepts it once it gets through).
func jwt(claims map[string]any) string {
	b, err := json.Marshal(claims)
	if err != nil {
		panic(err)
	}
	return "good." + base64.RawURLEncoding.EncodeToString(b) + ".sig"
}

func TestJWTFilter(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	f := &auth.JWTFilter{Issuers: []string{testIssuer}, Now: func() time.Time { return now }}
	exp := now.Add(time.Hour).Unix()
	for _, tok := range []string{
		jwt(map[string]any{"iss": testIssuer, "aud": []string{"other", auth.DefaultAudience}, "exp": exp}),
		jwt(map[string]any{"iss": testIssuer, "aud": auth.DefaultAudience, "exp": exp}),
	} {
		if err := f.Check(tok); err != nil {
			t.Errorf("%s: %v", tok, err)
		}
	}
	for name, tok := range map[string]string{
		"garbage":        "garbage",
		"two parts":      "a.b",
		"not base64":     "a.!!!.c",
		"not json":       "a." + base64.RawURLEncoding.EncodeToString([]byte("nope")) + ".c",
		"other issuer":   jwt(map[string]any{"iss": "https://evil", "aud": auth.DefaultAudience, "exp": exp}),
		"no issuer":      jwt(map[string]any{"aud": auth.DefaultAudience, "exp": exp}),
		"other audience": jwt(map[string]any{"iss": testIssuer, "aud": []string{"kubernetes"}, "exp": exp}),
		"no audience":    jwt(map[string]any{"iss": testIssuer, "exp": exp}),
		"expired":        jwt(map[string]any{"iss": testIssuer, "aud": auth.DefaultAudience, "exp": now.Unix()}),
		"no expiry":      jwt(map[string]any{"iss": testIssuer, "aud": auth.DefaultAudience}),
		"odd expiry":     jwt(map[string]any{"iss": testIssuer, "aud": auth.DefaultAudience, "exp": "soon"}),
		"huge":           jwt(map[string]any{"iss": testIssuer, "aud": auth.DefaultAudience, "exp": exp, "x": make([]byte, 20000)}),
	} {
		if err := f.Check(tok); !errors.Is(err, auth.ErrUnauthenticated) {
			t.Errorf("%s: %v, want ErrUnauthenticated", name, err)
		}
	}
	// Without Issuers, any issuer.
	if err := (&auth.JWTFilter{Now: f.Now}).Check(jwt(map[string]any{"iss": "x", "aud": auth.DefaultAudience, "exp": exp})); err != nil {
		t.Error(err)
	}
}

// Token-review exhaustion: tokens that cannot be valid (garbage, another
// issuer's, another audience's, expired) never reach the Authenticator (the
// TokenReview), however many; a plausible one does, and its caller carries
// the token's expiry.
func TestCachePrecheckKeepsGarbageFromReviews(t *testing.T) {
	ctx := t.Context()
	now := time.Now()
	inner := &counting{}
	f := &auth.JWTFilter{Issuers: []string{testIssuer}}
	c := &auth.Cache{Authenticator: inner, Precheck: f.Check}
	exp := now.Add(time.Hour).Truncate(time.Second)
	for i := range 1000 {
		for _, tok := range []string{
			fmt.Sprintf("garbage-%d", i),
			jwt(map[string]any{"iss": "https://evil", "aud": auth.DefaultAudience, "exp": exp.Unix(), "n": i}),
			jwt(map[string]any{"iss": testIssuer, "aud": "kubernetes", "exp": exp.Unix(), "n": i}),
			jwt(map[string]any{"iss": testIssuer, "aud": auth.DefaultAudience, "exp": now.Add(-time.Second).Unix(), "n": i}),
		} {
			if _, err := c.Authenticate(ctx, tok); !errors.Is(err, auth.ErrUnauthenticated) {
				t.Fatalf("%s: %v", tok, err)
			}
		}
	}
	if n := inner.checks.Load(); n != 0 {
		t.Fatalf("4000 tokens that cannot be valid: %d reached the review, want 0", n)
	}
	good := jwt(map[string]any{"iss": testIssuer, "aud": auth.DefaultAudience, "exp": exp.Unix()})
	caller, err := c.Authenticate(ctx, good)
	if err != nil || inner.checks.Load() != 1 {
		t.Fatalf("a plausible token: %v, %d checks", err, inner.checks.Load())
	}
	if !caller.Expires.Equal(exp) {
		t.Fatalf("caller expires %v, want the token's exp %v", caller.Expires, exp)
	}
	if cached, _, _ := c.Lookup(good); cached == nil || !cached.Expires.Equal(exp) {
		t.Fatalf("cached caller: %+v", cached)
	}
}

func fromIP(ctx context.Context, ip string) context.Context {
	return peer.NewContext(ctx, &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000}})
}

// One source cannot take every check slot: its checks beyond its share
// fail at once with ErrBusy while another source's check still runs.
func TestCacheSharePerSource(t *testing.T) {
	ctx := t.Context()
	inner := &counting{release: make(chan struct{})}
	c := &auth.Cache{Authenticator: inner, MaxInFlight: 8, MaxInFlightPerSource: 2}
	attacker := fromIP(ctx, "10.0.0.66")
	var wg sync.WaitGroup
	var mu sync.Mutex
	busy := 0
	for i := range 8 {
		wg.Go(func() {
			_, err := c.Authenticate(attacker, fmt.Sprintf("good-attacker-%d", i))
			if errors.Is(err, auth.ErrBusy) {
				mu.Lock()
				busy++
				mu.Unlock()
			}
		})
	}
	deadline := time.Now().Add(5 * time.Second)
	for inner.checks.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("checks did not start")
		}
		time.Sleep(time.Millisecond)
	}
	// A legitimate source's check gets a slot while the attacker's are held.
	done := make(chan error, 1)
	go func() {
		short, cancel := context.WithTimeout(fromIP(ctx, "10.0.0.1"), 2*time.Second)
		defer cancel()
		_, err := c.Authenticate(short, "good-node-1")
		done <- err
	}()
	deadline = time.Now().Add(5 * time.Second)
	for inner.checks.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("the legitimate source's check did not start: %d checks in flight (the attacker took every slot)", inner.checks.Load())
		}
		time.Sleep(time.Millisecond)
	}
	close(inner.release)
	if err := <-done; err != nil {
		t.Fatalf("legitimate source: %v", err)
	}
	wg.Wait()
	if busy != 6 || inner.checks.Load() != 3 {
		t.Fatalf("attacker: %d of 8 refused busy, %d checks in all; want 6 refused, 3 checks", busy, inner.checks.Load())
	}
}
