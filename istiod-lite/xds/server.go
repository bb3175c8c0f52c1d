// Package xds is istiod-lite's xDS server: it streams the model (workloads,
// services, authorization policies, peer authentications) to ztunnels over
// incremental (Delta) xDS, on go-control-plane's server with a cache built for
// many wildcard subscribers of a large resource set (see deltaCache). Resources
// are ambit.workload.v1 messages (api/workload). It tracks per-client versions
// and ACK/NACK for proxy-status. With RequireAuthentication it serves only node
// proxies, authenticated by their bearer token, each as its own node.
package xds

import (
	"context"
	"log/slog"
	"reflect"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	"google.golang.org/grpc"

	"github.com/ambit-mesh/ambit/model"
)

// Server serves the model in Store over Delta xDS. Create it with New,
// Register it on a gRPC server, and run Start. Without RequireAuthentication
// it serves anyone who can reach it (tests).
type Server struct {
	store  *model.Store
	log    *slog.Logger
	cache  *deltaCache
	status *statusTable
	xds    delta.Server
	ctx    context.Context // ends the xDS streams when Start returns
	cancel context.CancelFunc

	// authRequired is set by RequireAuthentication, before serving: streams
	// must then carry an authenticated caller.
	authRequired bool

	// pushed, when set, is called after each push with its duration and size
	// (for benchmarks and metrics).
	pushed func(d time.Duration, resources int)
}

// New returns a server for store. log may be nil.
func New(store *model.Store, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// The streams' context is the server's lifetime: Start cancels it when it
	// returns (its ctx is not known yet when Register is called).
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{store: store, log: log, status: &statusTable{streams: map[int64]*StreamStatus{}, now: time.Now}, ctx: ctx, cancel: cancel}
	s.cache = newDeltaCache(ctx)
	s.xds = delta.NewServer(ctx, s.cache, callbacks{s})
	return s
}

// ServerOptions are the gRPC server options xDS wants: HTTP/2 windows
// large enough for a full push of a large mesh (tens of MB) to go out in few
// round trips, and room for a reconnecting client's first request, which
// lists the version of every resource it holds (about 8 MB for 100k).
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InitialWindowSize(4 << 20), grpc.InitialConnWindowSize(16 << 20),
		grpc.MaxRecvMsgSize(MaxRequestSize),
	}
}

// MaxRequestSize bounds one request from a client.
const MaxRequestSize = 64 << 20

// Register registers the Aggregated Discovery Service (Delta only) on g.
func (s *Server) Register(g *grpc.Server) {
	discovery.RegisterAggregatedDiscoveryServiceServer(g, ads{d: s.xds})
}

// ads serves Delta ADS with go-control-plane's delta server; the
// state-of-the-world method stays unimplemented.
type ads struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	d delta.Server
}

// DeltaAggregatedResources implements the ADS delta stream (every type on
// one stream).
func (a ads) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	return a.d.DeltaStreamHandler(st, "") // "": ADS, the type is in each request
}

// Status returns the connected clients and their per-type versions and
// ACK/NACK state.
func (s *Server) Status() []StreamStatus { return s.status.snapshot() }

// Start pushes every change of the store to the cache (and so to the
// clients) until ctx ends. A snapshot that fails its consistency check is not
// pushed; the clients keep the last pushed state until a good one arrives.
func (s *Server) Start(ctx context.Context) error {
	defer s.cancel()
	changed := s.store.Changed()
	pushed := model.NewSnapshot(nil, nil, nil, nil) // version 0 of a store is empty
	var pushedVersion uint64
	push := func() {
		start := time.Now()
		ds, cur, version, ok := s.store.Since(pushedVersion)
		var r *Resources
		var err error
		if ok {
			r, err = MakeDeltaResources(ds, cur)
		} else {
			r, err = MakeResources(pushed, cur)
		}
		if err == nil {
			err = Consistent(r, cur)
		}
		if err != nil {
			s.log.Error("not pushing an inconsistent model; clients keep the last one", "error", err)
			return
		}
		for _, t := range typeOrder {
			if len(r.Set[t])+len(r.Remove[t]) > 0 {
				s.cache.Update(t, r.Set[t], r.Remove[t])
			}
		}
		pushed, pushedVersion = cur, version
		s.cache.SetReady()
		if n := r.Count(); n > 0 {
			logResources(s.log, r, "pushed")
			if s.pushed != nil {
				s.pushed(time.Since(start), n)
			}
		}
	}
	push()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			push()
		}
	}
}

func sameMap[K comparable, V any](a, b map[K]V) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}
