package xds

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// expiringTokens stands in for cluster mode's auth.Cache over TokenReview:
// the tokens it minted are node-1's until their expiry, which the callers
// carry (Caller.Expires); expired and unknown tokens are refused.
type expiringTokens struct {
	// caller is who the tokens authenticate (node-1's ztunnel if nil).
	caller *auth.Caller

	mu     sync.Mutex // guards the fields below
	expiry map[string]time.Time
	used   map[string]int // authentications per token
	n      int
}

func (e *expiringTokens) mint(ttl time.Duration) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.expiry == nil {
		e.expiry, e.used = map[string]time.Time{}, map[string]int{}
	}
	e.n++
	tok := fmt.Sprintf("token-%d", e.n)
	e.expiry[tok] = time.Now().Add(ttl)
	return tok
}

func (e *expiringTokens) uses(tok string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.used[tok]
}

func (e *expiringTokens) Authenticate(_ context.Context, tok string) (*auth.Caller, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	exp, ok := e.expiry[tok]
	if !ok || !time.Now().Before(exp) {
		return nil, fmt.Errorf("%w: unknown or expired token", auth.ErrUnauthenticated)
	}
	e.used[tok]++
	c := auth.Caller{Kind: auth.NodeProxy, Name: "pod ambit-system/ztunnel-1", Node: "node-1"}
	if e.caller != nil {
		c = *e.caller
	}
	c.Expires = exp
	return &c, nil
}

// F4: a stream authenticated with a token ends when the token expires
// (Unauthenticated), not before, though the client keeps sending nothing;
// a ztunnel's xdsclient then reconnects with the fresh token from its token
// file, keeping its config meanwhile, and receives changes again.
func TestStreamEndsAtTokenExpiry(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	tokens := &expiringTokens{}
	s := New(store, nil)
	addr, stop := serveWith(t, ctx, s, "", grpc.ChainStreamInterceptor(s.RequireAuthentication(tokens)))
	defer stop()

	// A raw stream: ended at its token's expiry.
	const ttl = 700 * time.Millisecond
	short := tokens.mint(ttl)
	opened := time.Now()
	st := adsStream(t, ctx, addr, short)
	if _, err := subscribe(st, "node-1"); err != nil {
		t.Fatal(err)
	}
	ended := make(chan error, 1)
	go func() {
		for {
			if _, err := st.Recv(); err != nil {
				ended <- err
				return
			}
		}
	}()
	select {
	case err := <-ended:
		if status.Code(err) != codes.Unauthenticated {
			t.Fatalf("stream ended with %v, want Unauthenticated", err)
		}
		if lived := time.Since(opened); lived < ttl-50*time.Millisecond {
			t.Fatalf("stream ended after %v, before its token's expiry (%v)", lived, ttl)
		}
	case <-time.After(ttl + 5*time.Second):
		t.Fatal("the stream outlived its token")
	}

	// A ztunnel's client: its first token expires, kubelet has written a
	// fresh one meanwhile; it reconnects with that one.
	file := filepath.Join(t.TempDir(), "token")
	first := tokens.mint(ttl)
	if err := os.WriteFile(file, []byte(first), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &xdsclient.Client{Addr: addr, TLS: clientTLS(), TokenFile: file, Node: "node-1", Store: &model.Store{}, MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond}
	go func() { _ = c.Start(ctx) }()
	select {
	case <-c.SyncedCh():
	case <-time.After(10 * time.Second):
		t.Fatal("client did not sync")
	}
	fresh := tokens.mint(time.Hour)
	if err := os.WriteFile(file, []byte(fresh), 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a stream with the fresh token", func() bool { return tokens.uses(fresh) > 0 })
	if !sameModel(c.Store.Load(), store.Load()) {
		t.Fatal("the client's model differs from the server's after reconnecting")
	}
	w := *store.Load().Workloads["Kubernetes/Pod/demo/server-1"]
	w.Ready = !w.Ready
	store.Apply(&model.Delta{Workloads: []*model.Workload{&w}})
	eventually(t, "the change over the new stream", func() bool { return c.Store.Load().Workloads[w.UID].Ready == w.Ready })
}

// F4 for waypoints: a waypoint's xdsclient (the Envoy types) whose token
// expires reconnects with the fresh one, keeps its resources meanwhile and
// receives changes again.
func TestWaypointStreamEndsAtTokenExpiry(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", "a", "10.9.0.1")}})
	tokens := &expiringTokens{caller: &auth.Caller{Kind: auth.Waypoint, Name: "pod east/wp-0", Node: "node-1", Waypoint: eastWP}}
	s := New(store, nil)
	s.BuildWaypoint = testWaypointResources
	addr, stop := serveWith(t, ctx, s, "", grpc.ChainStreamInterceptor(s.RequireAuthentication(tokens)))
	defer stop()

	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte(tokens.mint(700*time.Millisecond)), 0o600); err != nil {
		t.Fatal(err)
	}
	var last atomic.Pointer[xdsclient.Snapshot]
	var types []xdsclient.Type
	for _, url := range EnvoyTypeURLs {
		types = append(types, xdsclient.Type{URL: url})
	}
	c := &xdsclient.Client{Addr: addr, TLS: clientTLS(), TokenFile: file, Node: "wp-0", Types: types,
		OnUpdate:   func(s *xdsclient.Snapshot) error { last.Store(s); return nil },
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond}
	go func() { _ = c.Start(ctx) }()
	select {
	case <-c.SyncedCh():
	case <-time.After(10 * time.Second):
		t.Fatal("waypoint client did not sync")
	}
	endpointsVersion := func() string {
		for _, r := range last.Load().Resources(resource.EndpointType) {
			return r.Version
		}
		return ""
	}
	v0 := endpointsVersion()
	fresh := tokens.mint(time.Hour)
	if err := os.WriteFile(file, []byte(fresh), 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a stream with the fresh token", func() bool { return tokens.uses(fresh) > 0 })
	if len(last.Load().Resources(resource.ListenerType)) == 0 || endpointsVersion() != v0 {
		t.Fatal("the waypoint's resources changed across the reconnection")
	}
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", "d", "10.9.0.2")}})
	eventually(t, "the change over the new stream", func() bool { return endpointsVersion() != v0 })
}
