package xds

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/model"
)

// adsStream opens a Delta ADS stream to addr over TLS, with the bearer token
// (none if empty).
func adsStream(t *testing.T, ctx context.Context, addr, token string) discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// subscribe sends a wildcard workload subscription as node and returns the
// first response, or the stream's error.
func subscribe(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient, node string) (*discovery.DeltaDiscoveryResponse, error) {
	// A refused stream may be closed before the request is out: Send then
	// fails with io.EOF and Recv returns the status.
	_ = st.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: node}, TypeUrl: workload.WorkloadType, ResourceNamesSubscribe: []string{"*"}})
	return st.Recv()
}

func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if status.Code(err) != want {
		t.Fatalf("%s: got %v, want %s", what, err, want)
	}
}

// logBuffer collects a logger's text output.
type logBuffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// hasLine reports whether one line contains all of parts.
func (l *logBuffer) hasLine(parts ...string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for line := range strings.Lines(l.b.String()) {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			return true
		}
	}
	return false
}

// Over real gRPC and TLS, with local mode's host credentials: a stream
// without a token, or with a wrong one, is refused before it sees anything;
// a host may not claim another node, in its first request or later; a
// host's own node syncs, and proxy-status shows the authenticated caller.
func TestAuthentication(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	var logs logBuffer
	s := New(store, slog.New(slog.NewTextHandler(&logs, nil)))
	addr, stop := serve(t, ctx, s, "")
	defer stop()

	t.Run("no token", func(t *testing.T) {
		_, err := subscribe(adsStream(t, ctx, addr, ""), "node-1")
		wantCode(t, "no token", err, codes.Unauthenticated)
		if !logs.hasLine("xds client refused", "code=Unauthenticated", "authorization") {
			t.Fatalf("refusal not logged:\n%s", &logs)
		}
	})
	t.Run("wrong token", func(t *testing.T) {
		_, err := subscribe(adsStream(t, ctx, addr, "not-a-host-secret-0123456789"), "node-1")
		wantCode(t, "wrong token", err, codes.Unauthenticated)
		if !logs.hasLine("xds client refused", "code=Unauthenticated", "unknown host credential") {
			t.Fatalf("refusal not logged:\n%s", &logs)
		}
	})
	t.Run("host claims another node", func(t *testing.T) {
		_, err := subscribe(adsStream(t, ctx, addr, secret("node-1")), "node-2")
		wantCode(t, "node-1 claims node-2", err, codes.PermissionDenied)
		if !logs.hasLine("xds client refused", `caller="host node-1"`, "node=node-1", "claimedNode=node-2", "code=PermissionDenied") {
			t.Fatalf("refusal not logged:\n%s", &logs)
		}
	})
	t.Run("host claims another node later", func(t *testing.T) {
		st := adsStream(t, ctx, addr, secret("node-1"))
		resp, err := subscribe(st, "node-1")
		if err != nil || len(resp.GetResources()) == 0 {
			t.Fatalf("node-1 as itself: %v", err)
		}
		_ = st.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: "node-2"}, TypeUrl: workload.WorkloadType, ResponseNonce: resp.GetNonce()})
		_, err = st.Recv()
		wantCode(t, "node-1 claims node-2 in an ACK", err, codes.PermissionDenied)
	})
	t.Run("valid token syncs", func(t *testing.T) {
		c := startClient(t, ctx, addr, "node-2")
		if !sameModel(c.Store.Load(), store.Load()) {
			t.Fatal("the client's model differs from the server's")
		}
		eventually(t, "status", func() bool {
			for _, st := range s.Status() {
				if st.Node == "node-2" && st.Caller == "host node-2" {
					return true
				}
			}
			return false
		})
	})
	t.Run("no node id: the caller's node", func(t *testing.T) {
		if _, err := subscribe(adsStream(t, ctx, addr, secret("node-3")), ""); err != nil {
			t.Fatal(err)
		}
		eventually(t, "status", func() bool { return workloadsSent(s, "node-3") > 0 })
	})
}

// A server that requires authentication refuses streams that did not come
// through its interceptor (it was left out of the gRPC server's options).
func TestRequireAuthenticationFailsClosed(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	s := New(store, nil)
	_ = s.RequireAuthentication(hosts)
	addr, stop := serveWith(t, ctx, s, "")
	defer stop()
	_, err := subscribe(adsStream(t, ctx, addr, secret("node-1")), "node-1")
	wantCode(t, "without the interceptor", err, codes.Unauthenticated)
}
