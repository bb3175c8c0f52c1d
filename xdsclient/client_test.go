package xdsclient

import (
	"context"
	"crypto/tls"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	delta "github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/ambit-mesh/ambit/credential"
	"github.com/ambit-mesh/ambit/model"
)

// The client runs against go-control-plane's delta ADS server and snapshot
// cache, with Envoy's cluster and endpoint types (the waypoint's); the
// ambit.workload.v1 types are tested end to end against istiod-lite's own
// server in istiod-lite/xds and istiod-lite/server.

const node = "waypoint~demo~wp"

// xdsServer is a real delta ADS server; reqs receives every request.
type xdsServer struct {
	addr  string
	cache cache.SnapshotCache
	reqs  chan *discovery.DeltaDiscoveryRequest
	stop  func()
}

func startServer(t *testing.T, addr string, sc cache.SnapshotCache, reqs chan *discovery.DeltaDiscoveryRequest) *xdsServer {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	gs := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(gs, ads{d: delta.NewServer(ctx, sc, recorder{ctx, reqs})})
	done := make(chan struct{})
	go func() { defer close(done); _ = gs.Serve(ln) }()
	s := &xdsServer{addr: ln.Addr().String(), cache: sc, reqs: reqs}
	var once sync.Once
	s.stop = func() {
		once.Do(func() {
			cancel()
			gs.Stop()
			<-done
		})
	}
	t.Cleanup(s.stop)
	return s
}

// ads serves delta ADS with go-control-plane's delta server.
type ads struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	d delta.Server
}

func (a ads) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	return a.d.DeltaStreamHandler(st, "")
}

// recorder passes every request to reqs.
type recorder struct {
	ctx  context.Context
	reqs chan *discovery.DeltaDiscoveryRequest
}

func (recorder) OnDeltaStreamOpen(context.Context, int64, string) error { return nil }
func (recorder) OnDeltaStreamClosed(int64, *core.Node)                  {}
func (r recorder) OnStreamDeltaRequest(_ int64, req *discovery.DeltaDiscoveryRequest) error {
	select {
	case r.reqs <- req:
	case <-r.ctx.Done():
	}
	return nil
}
func (recorder) OnStreamDeltaResponse(int64, *discovery.DeltaDiscoveryRequest, *discovery.DeltaDiscoveryResponse) {
}

func newServer(t *testing.T) *xdsServer {
	return startServer(t, "127.0.0.1:0", cache.NewSnapshotCache(false, cache.IDHash{}, nil), make(chan *discovery.DeltaDiscoveryRequest, 100))
}

func (s *xdsServer) set(t *testing.T, version string, clusters []*clusterv3.Cluster, cla []*endpointv3.ClusterLoadAssignment) {
	t.Helper()
	rs := map[resource.Type][]types.Resource{resource.ClusterType: nil, resource.EndpointType: nil}
	for _, c := range clusters {
		rs[resource.ClusterType] = append(rs[resource.ClusterType], c)
	}
	for _, c := range cla {
		rs[resource.EndpointType] = append(rs[resource.EndpointType], c)
	}
	snap, err := cache.NewSnapshot(version, rs)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cache.SetSnapshot(t.Context(), node, snap); err != nil {
		t.Fatal(err)
	}
}

// next returns the next request of typ (others are skipped).
func (s *xdsServer) next(t *testing.T, typ string) *discovery.DeltaDiscoveryRequest {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case r := <-s.reqs:
			if r.GetTypeUrl() == typ {
				return r
			}
		case <-timeout:
			t.Fatalf("no %s request", typ)
		}
	}
}

func cluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{Name: name, ConnectTimeout: durationpb.New(time.Second),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}}
}

func endpoints(name string) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{ClusterName: name}
}

// snapshots collects what OnUpdate receives.
type snapshots struct {
	mu  sync.Mutex
	all []*Snapshot
	ch  chan struct{} // signalled on each
}

func (s *snapshots) onUpdate(snap *Snapshot) error {
	s.mu.Lock()
	s.all = append(s.all, snap)
	s.mu.Unlock()
	select {
	case s.ch <- struct{}{}:
	default:
	}
	return nil
}

// wait returns the first snapshot at or after the last seen for which ok holds.
func (s *snapshots) wait(t *testing.T, what string, ok func(*Snapshot) bool) *Snapshot {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		s.mu.Lock()
		var last *Snapshot
		if len(s.all) > 0 {
			last = s.all[len(s.all)-1]
		}
		s.mu.Unlock()
		if last != nil && ok(last) {
			return last
		}
		select {
		case <-s.ch:
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func envoyClient(addr string, snaps *snapshots) *Client {
	return &Client{
		Addr: addr, Node: node, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		Types: []Type{
			{URL: resource.ClusterType, Decode: Proto[clusterv3.Cluster]()},
			{URL: resource.EndpointType, Decode: Proto[endpointv3.ClusterLoadAssignment]()},
		},
		OnUpdate: snaps.onUpdate,
	}
}

func run(t *testing.T, c *Client) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Start: %v", err)
		}
	})
}

func names[T any](m map[string]T) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// The consumer sees every type's whole set, each response applied in turn;
// Synced fires once both types answered.
func TestSnapshotAcrossTypes(t *testing.T) {
	s := newServer(t)
	s.set(t, "1", []*clusterv3.Cluster{cluster("a")}, []*endpointv3.ClusterLoadAssignment{endpoints("a")})
	snaps := &snapshots{ch: make(chan struct{}, 1)}
	c := envoyClient(s.addr, snaps)
	run(t, c)
	select {
	case <-c.SyncedCh():
	case <-time.After(10 * time.Second):
		t.Fatal("not synced")
	}
	if !c.Synced() {
		t.Fatal("SyncedCh closed but not Synced")
	}
	snap := snaps.wait(t, "both types", func(s *Snapshot) bool { return s.Complete() })
	if got := names(Values[*clusterv3.Cluster](snap, resource.ClusterType)); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("clusters %v", got)
	}
	if got := names(Values[*endpointv3.ClusterLoadAssignment](snap, resource.EndpointType)); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("endpoints %v", got)
	}
	if r := snap.Resources(resource.ClusterType)["a"]; r.Version == "" || r.Value.(*clusterv3.Cluster).GetConnectTimeout().AsDuration() != time.Second {
		t.Fatalf("cluster a: %+v", r)
	}

	// b replaces a: the earlier snapshot is untouched (immutable), the new
	// one has b in both types and no a.
	s.set(t, "2", []*clusterv3.Cluster{cluster("b")}, []*endpointv3.ClusterLoadAssignment{endpoints("b")})
	next := snaps.wait(t, "b in both types", func(s *Snapshot) bool {
		return slices.Equal(names(s.Resources(resource.ClusterType)), []string{"b"}) &&
			slices.Equal(names(s.Resources(resource.EndpointType)), []string{"b"})
	})
	if next.Version <= snap.Version {
		t.Fatalf("versions %d then %d", snap.Version, next.Version)
	}
	if got := names(snap.Resources(resource.ClusterType)); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("an earlier snapshot changed: %v", got)
	}
}

// A resource that fails validation NACKs its response with the error and
// the response's nonce; the client keeps what it had, and accepts the next
// good version.
func TestNACKKeepsLastGood(t *testing.T) {
	s := newServer(t)
	s.set(t, "1", []*clusterv3.Cluster{cluster("a")}, nil)
	snaps := &snapshots{ch: make(chan struct{}, 1)}
	c := envoyClient(s.addr, snaps)
	var updates int
	c.OnUpdate = func(snap *Snapshot) error {
		updates++
		if _, ok := snap.Resources(resource.EndpointType)["refused"]; ok {
			return errTest // a consumer-level rejection
		}
		return snaps.onUpdate(snap)
	}
	run(t, c)
	<-c.SyncedCh()
	for s.next(t, resource.ClusterType).GetResponseNonce() == "" { // the subscription, then the ACK
	}

	bad := cluster("bad")
	bad.ConnectTimeout = durationpb.New(-time.Second)
	s.set(t, "2", []*clusterv3.Cluster{cluster("a"), bad}, nil)
	nack := s.next(t, resource.ClusterType)
	if nack.GetErrorDetail() == nil || !strings.Contains(nack.GetErrorDetail().GetMessage(), "resource bad: invalid") ||
		!strings.Contains(nack.GetErrorDetail().GetMessage(), "ConnectTimeout") || nack.GetResponseNonce() == "" {
		t.Fatalf("want a NACK naming the bad resource and field, got %v", nack)
	}
	last := snaps.wait(t, "a only", func(s *Snapshot) bool {
		return slices.Equal(names(s.Resources(resource.ClusterType)), []string{"a"})
	})

	// OnUpdate's error NACKs too, and the refused snapshot is not kept.
	s.set(t, "3", []*clusterv3.Cluster{cluster("a")}, []*endpointv3.ClusterLoadAssignment{endpoints("refused")})
	nack = s.next(t, resource.EndpointType)
	for nack.GetErrorDetail() == nil {
		nack = s.next(t, resource.EndpointType)
	}
	if !strings.Contains(nack.GetErrorDetail().GetMessage(), errTest.Error()) {
		t.Fatalf("NACK %v", nack.GetErrorDetail())
	}

	s.set(t, "4", []*clusterv3.Cluster{cluster("a"), cluster("c")}, []*endpointv3.ClusterLoadAssignment{endpoints("c")})
	good := snaps.wait(t, "a and c", func(s *Snapshot) bool {
		return slices.Equal(names(s.Resources(resource.ClusterType)), []string{"a", "c"}) &&
			slices.Equal(names(s.Resources(resource.EndpointType)), []string{"c"})
	})
	if good.Version <= last.Version {
		t.Fatal("version did not advance")
	}
}

type testError string

func (e testError) Error() string { return string(e) }

const errTest = testError("endpoints refused by the consumer")

// While the server is away the client keeps its state; when it returns
// the client resubscribes with the versions it holds.
func TestReconnectSendsVersionsAndKeepsState(t *testing.T) {
	sc := cache.NewSnapshotCache(false, cache.IDHash{}, nil)
	reqs := make(chan *discovery.DeltaDiscoveryRequest, 100)
	s := startServer(t, "127.0.0.1:0", sc, reqs)
	s.set(t, "1", []*clusterv3.Cluster{cluster("a")}, []*endpointv3.ClusterLoadAssignment{endpoints("a")})
	snaps := &snapshots{ch: make(chan struct{}, 1)}
	c := envoyClient(s.addr, snaps)
	run(t, c)
	<-c.SyncedCh()
	held := snaps.wait(t, "a", func(s *Snapshot) bool { return len(s.Resources(resource.EndpointType)) == 1 })
	first := s.next(t, resource.ClusterType)
	if first.GetNode().GetId() != node || !slices.Equal(first.GetResourceNamesSubscribe(), []string{"*"}) || len(first.GetInitialResourceVersions()) != 0 {
		t.Fatalf("first subscription %v", first)
	}

	s.stop()
	if !c.Synced() {
		t.Fatal("unsynced by a lost server")
	}
	s2 := startServer(t, s.addr, sc, reqs)
	var resub *discovery.DeltaDiscoveryRequest
	for resub == nil {
		r := s2.next(t, resource.ClusterType)
		if r.GetResponseNonce() == "" && len(r.GetResourceNamesSubscribe()) > 0 {
			resub = r
		}
	}
	want := held.Resources(resource.ClusterType)["a"].Version
	if got := resub.GetInitialResourceVersions(); len(got) != 1 || got["a"] != want || want == "" {
		t.Fatalf("initial_resource_versions %v, want a=%s", got, want)
	}
	s2.set(t, "2", []*clusterv3.Cluster{cluster("a"), cluster("b")}, []*endpointv3.ClusterLoadAssignment{endpoints("a")})
	snaps.wait(t, "b after the reconnection", func(s *Snapshot) bool {
		return slices.Equal(names(s.Resources(resource.ClusterType)), []string{"a", "b"}) && len(s.Resources(resource.EndpointType)) == 1
	})
}

// Named subscriptions ask for exactly those names; Apply sees deltas.
func TestNamedSubscriptionAndApply(t *testing.T) {
	s := newServer(t)
	s.set(t, "1", []*clusterv3.Cluster{cluster("a"), cluster("b")}, nil)
	applied := make(chan Delta, 10)
	c := &Client{Addr: s.addr, NodeInfo: &core.Node{Id: node, Cluster: "demo"}, Types: []Type{{
		URL: resource.ClusterType, Names: []string{"b"}, Decode: Proto[clusterv3.Cluster](),
		Apply: func(d Delta) error { applied <- d; return nil },
	}}}
	run(t, c)
	r := s.next(t, resource.ClusterType)
	if !slices.Equal(r.GetResourceNamesSubscribe(), []string{"b"}) || r.GetNode().GetCluster() != "demo" {
		t.Fatalf("subscription %v", r)
	}
	select {
	case d := <-applied:
		if d.TypeURL != resource.ClusterType || len(d.Updated) != 1 || d.Updated[0].Name != "b" {
			t.Fatalf("delta %+v", d)
		}
		if _, ok := d.Updated[0].Value.(*clusterv3.Cluster); !ok {
			t.Fatalf("value %T", d.Updated[0].Value)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing applied")
	}
	<-c.SyncedCh()
}

func TestStartNeedsAddrAndTypes(t *testing.T) {
	for _, c := range []*Client{
		{},
		{Addr: "127.0.0.1:1"},
		{Store: &model.Store{}},
		{Addr: "127.0.0.1:1", Types: []Type{{URL: "x"}, {URL: "x"}}},
		{Addr: "127.0.0.1:1", Types: []Type{{}}},
	} {
		if err := c.Start(t.Context()); err == nil {
			t.Fatalf("no error for %+v", c)
		}
	}
}

func TestRetriesUntilCanceledAndNeverSyncs(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close() // nothing listens: every attempt fails
	c := &Client{Addr: addr, Store: &model.Store{}, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond}
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	if err := c.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if c.Synced() {
		t.Fatal("synced without a server")
	}
	select {
	case <-c.SyncedCh():
		t.Fatal("SyncedCh closed")
	default:
	}
}

func TestTokenNeedsTLS(t *testing.T) {
	for _, c := range []*Client{
		{Addr: "127.0.0.1:1", Store: &model.Store{}, Token: "secret"},
		{Addr: "127.0.0.1:1", Store: &model.Store{}, TokenFile: "/nonexistent"},
		{Addr: "127.0.0.1:1", Store: &model.Store{}, Credential: &credential.Bearer{Token: "secret"}},
	} {
		if err := c.Start(t.Context()); err == nil || !strings.Contains(err.Error(), "TLS") {
			t.Fatalf("a token was accepted without TLS: %v", err)
		}
	}
}

// The Credential wins over TokenFile and Token; those two make one.
func TestCredential(t *testing.T) {
	shared := &credential.Bearer{Token: "shared"}
	if got := (&Client{Credential: shared, Token: "x"}).credential(); got != shared {
		t.Fatal("Credential not used")
	}
	if got := (&Client{TLS: &tls.Config{}, TokenFile: "f", Token: "t"}).credential(); got.File != "f" || got.Token != "t" {
		t.Fatalf("credential %+v", got)
	}
	if (&Client{}).credential() != nil {
		t.Fatal("a credential without a token")
	}
}
