// Package xds is istiod-lite's xDS server: one Delta ADS endpoint (on 15012,
// next to the certificate service) that serves two kinds of clients from two
// generators.
//
// The core (Server) owns the streams: go-control-plane's delta server, the
// authentication hook (RequireAuthentication: every stream carries an
// auth.Caller), per-kind authorization of each request's type URL, and the
// ACK/NACK status table behind proxy-status. It routes each watch to a
// generator by type URL through a mux cache; since a
// caller's kind fixes the type URLs it may subscribe to (authorize), the type
// URL also picks the generator the caller's kind is served by (mux: a
// go-control-plane cache.MuxCache):
//
//   - node proxies (ztunnels, local hosts) subscribe, wildcard, to the
//     ambit.workload.v1 types (api/workload): workloads, services,
//     authorization and peer authentication policies, as their own node. The
//     workload generator (workloads.go) streams the model's changes into
//     deltaCache, a cache built for many identical wildcard subscribers of a
//     large resource set (cache.go). Every node proxy gets the same resources.
//   - waypoints subscribe to the Envoy v3 types (Listener,
//     RouteConfiguration, Cluster, ClusterLoadAssignment) and get only their
//     own waypoint's resources, whatever they send as their xDS node. The
//     waypoint generator (waypoints.go) builds, for each connected waypoint,
//     a go-control-plane cache.Snapshot from envoy.ForWaypoint (a pure
//     function of the model), validates every resource (ValidateAll, nested
//     typed configs included) and the snapshot's consistency, and publishes
//     it in a go-control-plane SnapshotCache keyed by the authenticated
//     waypoint, never by the client's node. A snapshot that fails is not
//     published: the waypoint keeps the last good one and proxy-status shows
//     the error. Snapshots are rebuilt on every model change.
//
// Any other combination (a node proxy asking for Envoy types, a waypoint for
// workload types, a workload's or an operator's token) is PermissionDenied.
//
// Resource versions are hashes of their bytes in both generators, so a
// reconnecting client that presents the versions it holds receives only what
// changed while it was away, and a version a client NACKed is not sent to
// that stream again: it is sent something new only when the model changes
// what that client should have.
package xds

import (
	"context"
	"log/slog"
	"reflect"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/envoy"
	"github.com/ambit-mesh/ambit/istiod-lite/monitoring"
	"github.com/ambit-mesh/ambit/model"
)

// Server serves the model in a store over Delta ADS. Create it with New,
// Register it on a gRPC server, and run Start. Without RequireAuthentication
// it serves anyone who can reach it the workload types (tests), and the
// Envoy types to no one.
type Server struct {
	// BuildWaypoint builds a waypoint's Envoy resources from a snapshot of
	// the model (envoy.ForWaypoint if nil). Set it before Start.
	BuildWaypoint func(*model.Snapshot, envoy.Waypoint) (*envoy.Resources, error)
	// Refusals rate-limits the log lines of refused streams (nil: one line
	// each). Set it before serving.
	Refusals *auth.RefusalLog
	// Metrics counts connected clients, responses sent (and how long each
	// took to send) and NACKs, by type (nil: not counted). Set it before
	// Register.
	Metrics *monitoring.Metrics

	store     *model.Store
	log       *slog.Logger
	workloads *workloadGen
	waypoints *waypointGen
	status    *statusTable
	clock     *pushClock
	xds       delta.Server
	ctx       context.Context // ends the xDS streams when Start returns
	cancel    context.CancelFunc

	// authRequired is set by RequireAuthentication, before serving: streams
	// must then carry an authenticated caller.
	authRequired bool
}

// New returns a server for store. log may be nil.
func New(store *model.Store, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// The streams' context is the server's lifetime: Start cancels it when it
	// returns (its ctx is not known yet when Register is called).
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{store: store, log: log, status: &statusTable{streams: map[int64]*StreamStatus{}, now: time.Now}, ctx: ctx, cancel: cancel, clock: newPushClock()}
	s.workloads = &workloadGen{store: store, log: log, cache: newDeltaCache(ctx), clock: s.clock}
	s.waypoints = newWaypointGen(store, log, func(m *model.Snapshot, wp envoy.Waypoint) (*envoy.Resources, error) {
		if s.BuildWaypoint != nil {
			return s.BuildWaypoint(m, wp)
		}
		return envoy.ForWaypoint(m, wp)
	})
	s.waypoints.clock = s.clock
	s.waypoints.inputs = func(m *model.Snapshot, wp auth.WaypointRef) *deps {
		if s.BuildWaypoint != nil {
			return nil // unknown inputs: every change rebuilds
		}
		return depsOf(m, wp)
	}
	s.xds = delta.NewServer(ctx, &cache.MuxCache{
		// By type URL: authorize has checked that the stream's caller kind
		// is the one that generator serves.
		ClassifyDelta: func(r *cache.DeltaRequest) string {
			if isEnvoyType(r.GetTypeUrl()) {
				return genWaypoints
			}
			return genWorkloads
		},
		Classify: func(*cache.Request) string { return genWorkloads }, // SotW: refused there
		Caches:   map[string]cache.Cache{genWorkloads: s.workloads.cache, genWaypoints: s.waypoints},
	}, callbacks{s})
	return s
}

// The generators, as the mux cache names them.
const (
	genWorkloads = "workloads"
	genWaypoints = "waypoints"
)

// ServerOptions are the gRPC server options xDS wants: room for a
// reconnecting client's first request, which lists the version of every
// resource it holds (about 8 MB for 100k), and a small per-stream receive
// window. The window is what a client may send on a stream before the
// server reads it (gRPC opens it to a message's size once the handler
// reads, after authentication), so it bounds what an unauthenticated call
// can make the server buffer; a fixed window also keeps gRPC's BDP
// estimator from growing it to 16 MiB. How fast a push goes out depends on
// the client's windows (xdsclient's), not on these.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InitialWindowSize(StreamWindow), grpc.InitialConnWindowSize(16 << 20),
		grpc.MaxRecvMsgSize(MaxRequestSize),
	}
}

// StreamWindow is the server's per-stream HTTP/2 receive window (HTTP/2's
// default, gRPC's minimum).
const StreamWindow = 64 << 10

// MaxRequestSize bounds one request from a client.
const MaxRequestSize = 64 << 20

// Register registers the Aggregated Discovery Service (Delta only) on g.
func (s *Server) Register(g *grpc.Server) {
	s.clock.m = s.Metrics
	discovery.RegisterAggregatedDiscoveryServiceServer(g, ads{d: s.xds, m: s.Metrics, c: s.clock})
}

// ads serves Delta ADS with go-control-plane's delta server; the
// state-of-the-world method stays unimplemented.
type ads struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	d delta.Server
	m *monitoring.Metrics // may be nil
	c *pushClock
}

// DeltaAggregatedResources implements the ADS delta stream (every type on
// one stream).
func (a ads) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	if a.m != nil {
		st = timedStream{st, a.m, a.c}
	}
	return a.d.DeltaStreamHandler(st, "") // "": ADS, the type is in each request
}

// timedStream counts each response sent on a stream and how long its Send
// took (pilot_xds_pushes, pilot_xds_send_time), and tells the push clock
// (pilot_xds_push_time, pilot_proxy_convergence_time).
type timedStream struct {
	discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer
	m *monitoring.Metrics
	c *pushClock
}

func (t timedStream) Send(resp *discovery.DeltaDiscoveryResponse) error {
	start := time.Now()
	err := t.AggregatedDiscoveryService_DeltaAggregatedResourcesServer.Send(resp)
	t.m.XDSSent(resp.GetTypeUrl(), time.Since(start), err)
	t.c.sent(resp, err)
	return err
}

// Status returns the connected clients and their per-type versions and
// ACK/NACK state.
func (s *Server) Status() []StreamStatus { return s.status.snapshot() }

// Start runs the generators until ctx ends: every change of the store
// reaches the node proxies' cache and rebuilds the connected waypoints'
// snapshots. When it returns, the streams end.
func (s *Server) Start(ctx context.Context) error {
	defer s.cancel()
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.workloads.Start(ctx) })
	g.Go(func() error { return s.waypoints.Start(ctx) })
	g.Go(func() error { return s.clock.Start(ctx, s.store) })
	return g.Wait()
}

func sameMap[K comparable, V any](a, b map[K]V) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}
