package xds

import (
	"context"
	"crypto/tls"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
)

func meshSnapshot(t *testing.T) *model.Snapshot {
	t.Helper()
	f, err := os.Open("../translate/testdata/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	objs, _, err := translate.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	o := translate.NewObjects()
	for _, obj := range objs {
		o.Set(obj)
	}
	return translate.Build(o, translate.Options{}).Snapshot
}

// The callers the test servers authenticate (local mode's
// HostAuthenticator): node-<n> has the secret secret(node-<n>), the waypoints
// east/wp and west/wp secret("east/wp") and secret("west/wp").
var hosts = func() *auth.HostAuthenticator {
	a, err := auth.HostCredentials{
		Hosts:     map[string]string{"node-1": secret("node-1"), "node-2": secret("node-2"), "node-3": secret("node-3")},
		Waypoints: map[auth.WaypointRef]string{eastWP: secret(eastWP.String()), westWP: secret(westWP.String())},
	}.Authenticator()
	if err != nil {
		panic(err)
	}
	return a
}()

func secret(node string) string { return node + "-secret-0123456789" }

// testCA signs the test servers' certificates.
var testCA = func() *certs.CA {
	c, err := certs.NewSelfSignedCA(identity.DefaultTrustDomain, certs.Options{})
	if err != nil {
		panic(err)
	}
	return c
}()

// serverID is the test servers' SPIFFE ID.
var serverID = spiffeid.RequireFromString("spiffe://cluster.local/ns/ambit-system/sa/istiod-lite")

// clientTLS verifies the test servers as ztunnels verify istiod-lite: by
// SPIFFE ID, over TLS 1.3 with ALPN h2.
func clientTLS() *tls.Config {
	c := tlsconfig.TLSClientConfig(testCA.Bundle(), tlsconfig.AuthorizeID(serverID))
	c.MinVersion, c.NextProtos = tls.VersionTLS13, []string{"h2"}
	return c
}

// serve runs s on addr ("" picks a port) until the returned stop is called,
// over TLS and requiring hosts' credentials, as istiod-lite does.
func serve(t *testing.T, ctx context.Context, s *Server, addr string) (string, func()) {
	t.Helper()
	return serveWith(t, ctx, s, addr, grpc.ChainStreamInterceptor(s.RequireAuthentication(hosts)))
}

func serveWith(t *testing.T, ctx context.Context, s *Server, addr string, opts ...grpc.ServerOption) (string, func()) {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var lis net.Listener
	var err error
	for i := 0; i < 50; i++ { // the old listener's port may take a moment to free
		if lis, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	serving := &ca.ServingCert{CA: testCA, ID: serverID}
	g := grpc.NewServer(append(opts, grpc.Creds(credentials.NewTLS(serving.TLSConfig())))...)
	s.Register(g)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{}, 2)
	go func() { _ = g.Serve(lis); done <- struct{}{} }()
	go func() { _ = s.Start(ctx); done <- struct{}{} }()
	return lis.Addr().String(), func() {
		cancel()
		g.Stop()
		<-done
		<-done
	}
}

func startClient(t *testing.T, ctx context.Context, addr, node string) *xdsclient.Client {
	c := &xdsclient.Client{Addr: addr, TLS: clientTLS(), Token: secret(node), Node: node, Store: &model.Store{}, MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond}
	go func() { _ = c.Start(ctx) }()
	select {
	case <-c.SyncedCh():
	case <-time.After(10 * time.Second):
		t.Fatalf("client %s did not sync", node)
	}
	return c
}

// sameModel compares what ztunnels receive (HTTPRoutes are not streamed).
func sameModel(a, b *model.Snapshot) bool {
	return reflect.DeepEqual(a.Workloads, b.Workloads) && reflect.DeepEqual(a.Services, b.Services) &&
		reflect.DeepEqual(a.Policies, b.Policies) && reflect.DeepEqual(a.PeerAuthn, b.PeerAuthn)
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func workloadsSent(s *Server, node string) int {
	for _, st := range s.Status() {
		if st.Node == node {
			if ts := st.Types[workload.WorkloadType]; ts != nil {
				return ts.SentCount
			}
		}
	}
	return -1
}

func TestStreamsModelAndOnlyChanges(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	s := New(store, nil)
	addr, stop := serve(t, ctx, s, "")
	defer stop()

	var clients []*xdsclient.Client
	for _, n := range []string{"node-1", "node-2", "node-3"} {
		clients = append(clients, startClient(t, ctx, addr, n))
	}
	for _, c := range clients {
		if !sameModel(c.Store.Load(), store.Load()) {
			t.Fatal("a client's model differs from the server's")
		}
	}

	// One pod changes: every client gets exactly that workload.
	w := *store.Load().Workloads["Kubernetes/Pod/demo/server-1"]
	w.Ready = true
	store.Apply(&model.Delta{Workloads: []*model.Workload{&w}})
	for _, c := range clients {
		eventually(t, "the change", func() bool { return c.Store.Load().Workloads[w.UID].Ready })
	}
	eventually(t, "status", func() bool { return workloadsSent(s, "node-2") == 1 })

	// A removal.
	store.Apply(&model.Delta{RemovedWorkloads: []string{w.UID}})
	for _, c := range clients {
		eventually(t, "the removal", func() bool { return c.Store.Load().Workloads[w.UID] == nil })
	}

	// Status: every client is in sync on every type, and the debug endpoint says so.
	eventually(t, "all ACKed", func() bool {
		st := s.Status()
		if len(st) != 3 {
			return false
		}
		for _, c := range st {
			for _, typ := range workload.TypeURLs {
				if ts := c.Types[typ]; ts == nil || ts.Sync() != "SYNCED" {
					return false
				}
			}
		}
		return true
	})
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest("GET", "/debug/proxy-status", nil))
	if body := rec.Body.String(); !strings.Contains(body, `"node": "node-3"`) || !strings.Contains(body, `"caller": "host node-3"`) || !strings.Contains(body, "SYNCED") {
		t.Fatalf("proxy-status: %s", body)
	}
}

func TestReconnectKeepsLastStateThenResyncsIncrementally(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	addr, stop := serve(t, ctx, New(store, nil), "")
	c := startClient(t, ctx, addr, "node-1")
	held := c.Store.Load()

	stop() // the control plane goes away
	time.Sleep(100 * time.Millisecond)
	if c.Store.Load() != held {
		t.Fatal("the client dropped its state when the control plane went away")
	}

	// While it is away, one workload goes and one appears.
	gone := "Kubernetes/Pod/demo/optout"
	added := &model.Workload{UID: "Kubernetes/Pod/demo/new", Name: "new", Namespace: "demo", Addresses: []netip.Addr{netip.MustParseAddr("10.1.1.77")}}
	store.Apply(&model.Delta{RemovedWorkloads: []string{gone}, Workloads: []*model.Workload{added}})

	s2 := New(store, nil) // a restarted control plane: a fresh cache
	_, stop2 := serve(t, ctx, s2, addr)
	defer stop2()
	eventually(t, "resync", func() bool { return sameModel(c.Store.Load(), store.Load()) })
	// The reconnecting client presented its versions: it was sent only the
	// difference (one upsert, one removal), not the whole set.
	eventually(t, "status", func() bool { return workloadsSent(s2, "node-1") == 2 })
}

func TestNACKKeepsLastGoodState(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	s := New(store, nil)
	addr, stop := serve(t, ctx, s, "")
	defer stop()
	c := startClient(t, ctx, addr, "node-1")
	before := c.Store.Load()

	// A resource the client cannot decode (3-byte address).
	bad, _ := anypb.New(&workload.Workload{Uid: "bad", Addresses: [][]byte{{1, 2, 3}}})
	bad.TypeUrl = workload.WorkloadType
	s.workloads.cache.Update(workload.WorkloadType, map[string]*anypb.Any{"bad": bad}, nil)

	eventually(t, "NACK", func() bool {
		for _, st := range s.Status() {
			if ts := st.Types[workload.WorkloadType]; ts != nil && ts.Sync() == "NACKED" && strings.Contains(ts.NackError, "address") {
				return true
			}
		}
		return false
	})
	if c.Store.Load() != before {
		t.Fatal("a rejected update changed the client's state")
	}
	// The next good update is applied.
	w := *store.Load().Workloads["Kubernetes/Pod/demo/server-1"]
	w.Ready = true
	store.Apply(&model.Delta{Workloads: []*model.Workload{&w}})
	eventually(t, "the next update", func() bool { return c.Store.Load().Workloads[w.UID].Ready })
}
