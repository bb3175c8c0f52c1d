package auth_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
)

// counting is an Authenticator that counts its checks: tokens starting with
// "good" are node proxies, "down" cannot be checked, anything else is
// refused. release, when set, holds every check until it is closed.
type counting struct {
	checks  atomic.Int64
	release chan struct{}
}

func (c *counting) Authenticate(ctx context.Context, token string) (*auth.Caller, error) {
	c.checks.Add(1)
	if c.release != nil {
		select {
		case <-c.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	switch {
	case strings.HasPrefix(token, "good"):
		return &auth.Caller{Kind: auth.NodeProxy, Name: "host " + token, Node: token}, nil
	case token == "down":
		return nil, errors.New("api server unreachable")
	}
	return nil, fmt.Errorf("%w: bad token", auth.ErrUnauthenticated)
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func jwtWithExp(exp time.Time) string {
	enc := base64.RawURLEncoding
	return "good." + enc.EncodeToString([]byte(fmt.Sprintf(`{"exp":%d,"sub":"x"}`, exp.Unix()))) + ".sig"
}

func TestCacheRemembersAnswers(t *testing.T) {
	ctx := t.Context()
	clk := &clock{now: time.Unix(1_800_000_000, 0)}
	inner := &counting{}
	c := &auth.Cache{Authenticator: inner, MaxAge: time.Minute, NegativeAge: 5 * time.Second, Now: clk.Now}

	// Accepted: one check until MaxAge.
	for range 100 {
		if got, err := c.Authenticate(ctx, "good-1"); err != nil || got.Node != "good-1" {
			t.Fatalf("good-1: %+v, %v", got, err)
		}
	}
	if n := inner.checks.Load(); n != 1 {
		t.Fatalf("100 calls with one token: %d checks, want 1", n)
	}
	clk.Add(time.Minute)
	_, _ = c.Authenticate(ctx, "good-1")
	if n := inner.checks.Load(); n != 2 {
		t.Fatalf("after MaxAge: %d checks, want 2", n)
	}

	// A JWT is not believed past its exp.
	tok := jwtWithExp(clk.Now().Add(10 * time.Second))
	_, _ = c.Authenticate(ctx, tok)
	clk.Add(9 * time.Second)
	_, _ = c.Authenticate(ctx, tok)
	if n := inner.checks.Load(); n != 3 {
		t.Fatalf("before exp: %d checks, want 3", n)
	}
	clk.Add(2 * time.Second)
	_, _ = c.Authenticate(ctx, tok)
	if n := inner.checks.Load(); n != 4 {
		t.Fatalf("after exp: %d checks, want 4", n)
	}

	// Refused: one check per NegativeAge, and still refused from memory.
	inner.checks.Store(0)
	for range 1000 {
		if _, err := c.Authenticate(ctx, "garbage"); !errors.Is(err, auth.ErrUnauthenticated) {
			t.Fatalf("garbage: %v", err)
		}
	}
	if n := inner.checks.Load(); n != 1 {
		t.Fatalf("1000 calls with one refused token: %d checks, want 1", n)
	}
	clk.Add(5 * time.Second)
	_, _ = c.Authenticate(ctx, "garbage")
	if n := inner.checks.Load(); n != 2 {
		t.Fatalf("after NegativeAge: %d checks, want 2", n)
	}

	// Failures to check are not remembered.
	inner.checks.Store(0)
	for range 3 {
		if _, err := c.Authenticate(ctx, "down"); err == nil || errors.Is(err, auth.ErrUnauthenticated) {
			t.Fatalf("down: %v", err)
		}
	}
	if n := inner.checks.Load(); n != 3 {
		t.Fatalf("3 calls that could not be checked: %d checks, want 3", n)
	}
}

// Concurrent calls with one token share one check; checks beyond
// MaxInFlight wait, and give up with ErrBusy when their context ends.
func TestCacheSharesAndBoundsChecks(t *testing.T) {
	ctx := t.Context()
	inner := &counting{release: make(chan struct{})}
	c := &auth.Cache{Authenticator: inner, MaxInFlight: 2}
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for range 50 {
		wg.Go(func() {
			_, err := c.Authenticate(ctx, "good-shared")
			errs <- err
		})
	}
	// Two other tokens take the two slots...
	for _, tok := range []string{"good-a", "good-b"} {
		wg.Go(func() { _, _ = c.Authenticate(ctx, tok) })
	}
	deadline := time.Now().Add(5 * time.Second)
	for inner.checks.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("checks did not start")
		}
		time.Sleep(time.Millisecond)
	}
	// ...so a fourth token waits for a slot until its context ends.
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := c.Authenticate(short, "good-late"); !errors.Is(err, auth.ErrBusy) {
		t.Fatalf("a check beyond MaxInFlight: %v, want ErrBusy", err)
	}
	close(inner.release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := inner.checks.Load(); n > 3 {
		t.Fatalf("%d checks for 3 tokens (50 calls sharing one)", n)
	}
}

// A flood of distinct refused tokens does not grow the cache past
// MaxEntries.
func TestCacheBounded(t *testing.T) {
	inner := &counting{}
	c := &auth.Cache{Authenticator: inner, MaxEntries: 100}
	for i := range 5000 {
		_, _ = c.Authenticate(t.Context(), fmt.Sprintf("garbage-%d", i))
	}
	known := 0
	for i := range 5000 {
		if _, _, ok := c.Lookup(fmt.Sprintf("garbage-%d", i)); ok {
			known++
		}
	}
	if known > 100 || known == 0 {
		t.Fatalf("%d refused tokens remembered, want 1..100", known)
	}
}

// Item 8: N refusals write at most Burst lines and one summary per
// interval, whatever N; the summary has the count and the top source.
func TestRefusalLogBounded(t *testing.T) {
	var buf bytes.Buffer
	clk := &clock{now: time.Unix(1_800_000_000, 0)}
	r := &auth.RefusalLog{Logger: slog.New(slog.NewTextHandler(&buf, nil)), Interval: 10 * time.Second, Burst: 3, Now: clk.Now}
	for i := range 10000 {
		src := "10.0.0.1"
		if i%10 == 0 {
			src = "10.0.0.2"
		}
		r.Refuse("call refused", src, "code", "Unauthenticated")
		if i%1000 == 999 {
			clk.Add(time.Second) // 10000 refusals over 10 s: one interval
		}
	}
	clk.Add(10 * time.Second)
	r.Refuse("call refused", "10.0.0.3") // opens the next interval: the summary is written
	r.Flush()
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	t.Logf("10001 refusals, %d lines:\n%s", len(lines), buf.String())
	if len(lines) != 3+1+1 {
		t.Fatalf("%d lines, want 3 in full, 1 summary, 1 in full in the next interval", len(lines))
	}
	if !strings.Contains(lines[3], "count=9997") || !strings.Contains(lines[3], "top.10.0.0.1=8998") {
		t.Fatalf("summary: %s", lines[3])
	}
	if r.Total() != 10001 {
		t.Fatalf("total %d", r.Total())
	}
}

// Item 11: HostFile reloads the file when it changes: the replaced secret
// is refused from then on, the new one accepted; a broken file is not
// taken.
func TestHostFileRotation(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "hosts")
	write := func(content string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("node-1 old-secret-0123456789abcdef\nnode-2 two-secret-0123456789abcdef\n")
	h := &auth.HostFile{Path: path, Interval: 10 * time.Millisecond}
	if err := h.Load(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = h.Start(ctx) }()
	old, err := h.Authenticate(ctx, "old-secret-0123456789abcdef")
	if err != nil || old.Node != "node-1" || old.Revoked == nil {
		t.Fatalf("old secret: %+v %v", old, err)
	}
	two, err := h.Authenticate(ctx, "two-secret-0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	write("node-1 new-secret-0123456789abcdef\nnode-2 two-secret-0123456789abcdef\n")
	waitLoads := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for h.Loads() < n {
			if time.Now().After(deadline) {
				t.Fatalf("%d loads, want %d", h.Loads(), n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitLoads(2)
	if c, err := h.Authenticate(ctx, "new-secret-0123456789abcdef"); err != nil || c.Node != "node-1" {
		t.Fatalf("new secret after reload: %+v %v", c, err)
	}
	if _, err := h.Authenticate(ctx, "old-secret-0123456789abcdef"); !errors.Is(err, auth.ErrUnauthenticated) {
		t.Fatalf("old secret after reload: %v", err)
	}
	// The old secret's callers are revoked (their streams end); node-2,
	// whose secret stayed, is not.
	select {
	case <-old.Revoked:
	default:
		t.Fatal("the replaced secret's caller is not revoked")
	}
	select {
	case <-two.Revoked:
		t.Fatal("an unchanged secret's caller was revoked")
	default:
	}
	// Broken, then fixed: the new secret stays in force meanwhile.
	write("node-1 short\n")
	if err := h.Load(); err == nil {
		t.Fatal("a secret shorter than MinHostSecretLen was loaded")
	}
	if _, err := h.Authenticate(ctx, "new-secret-0123456789abcdef"); err != nil {
		t.Fatalf("after a broken edit: %v", err)
	}
	if h.Loads() != 2 {
		t.Fatalf("a broken file was loaded")
	}
	write("node-1 newer-secret-0123456789abcdef\n")
	waitLoads(3)
	if _, err := h.Authenticate(ctx, "newer-secret-0123456789abcdef"); err != nil {
		t.Fatal(err)
	}
}
