package xds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/envoy"
	"github.com/ambit-mesh/ambit/model"
)

// EnvoyTypeURLs are the types a waypoint may subscribe to, in the order a
// snapshot's changes go out (clusters and their endpoints before the
// listeners and routes that use them).
var EnvoyTypeURLs = []string{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType}

func isEnvoyType(url string) bool { return slices.Contains(EnvoyTypeURLs, url) }

// waypointGen is the generator for waypoints: one snapshot per connected
// waypoint, in a go-control-plane SnapshotCache keyed by the waypoint's
// "<namespace>/<name>". It is the cache the mux hands the Envoy types' watches
// to; each watch is re-keyed by the stream's authenticated waypoint (learned
// from the callbacks, like deltaCache learns streams), so a client's xDS node
// never selects what it reads.
type waypointGen struct {
	store *model.Store
	log   *slog.Logger
	build func(*model.Snapshot, envoy.Waypoint) (*envoy.Resources, error)
	// inputs returns what build reads for a waypoint (nil: unknown, every
	// change rebuilds it). Set before Start.
	inputs func(*model.Snapshot, auth.WaypointRef) *deps
	cache  cache.SnapshotCache
	now    func() time.Time
	clock  *pushClock // times the pushes (pilot_xds_push_time, pilot_proxy_convergence_time)

	mu      sync.Mutex                                                // guards everything below
	wps     map[auth.WaypointRef]*waypointState                       // connected waypoints
	pending map[*discovery.DeltaDiscoveryRequest]pendingWaypointWatch // between the request callback and CreateDeltaWatch
	kick    chan struct{}                                             // (cap 1) a waypoint without a snapshot connected
	// skipped counts rebuilds skipped because a change left a waypoint's
	// inputs alone (tests, benchmarks).
	skipped int

	// checked is the model version every connected waypoint is up to date
	// with, or was found unaffected at (Start's goroutine only).
	checked uint64
}

type pendingWaypointWatch struct {
	stream int64
	wp     auth.WaypointRef
}

// waypointState is one connected waypoint's.
type waypointState struct {
	streams int  // open streams authenticated as this waypoint
	stale   bool // not built from the current model yet
	status  WaypointStatus
	// deps are the inputs of the published snapshot (nil when the last
	// build failed: then every change rebuilds).
	deps *deps
}

// WaypointStatus is the state of one connected waypoint's snapshot, for
// proxy-status.
type WaypointStatus struct {
	// Version is the model version the published snapshot was built from
	// (empty until one is published).
	Version     string         `json:"version,omitempty"`
	PublishedAt time.Time      `json:"publishedAt,omitzero"`
	Resources   map[string]int `json:"resources,omitempty"` // by type URL, in the published snapshot
	// Error is why the newest model did not give a publishable snapshot
	// (envoy.ForWaypoint failed, a resource is invalid, or the snapshot is
	// inconsistent); the waypoint keeps the last published one. Empty once a
	// newer snapshot is published.
	Error        string    `json:"error,omitempty"`
	ErrorVersion string    `json:"errorVersion,omitempty"` // the model version that failed
	ErrorAt      time.Time `json:"errorAt,omitzero"`
	Failures     int       `json:"failures"` // builds that failed since the waypoint connected
	Streams      int       `json:"streams"`
}

func newWaypointGen(store *model.Store, log *slog.Logger, build func(*model.Snapshot, envoy.Waypoint) (*envoy.Resources, error)) *waypointGen {
	return &waypointGen{
		store:   store,
		log:     log,
		build:   build,
		cache:   cache.NewSnapshotCache(true, cache.IDHash{}, cacheLogger{log}),
		now:     time.Now,
		wps:     map[auth.WaypointRef]*waypointState{},
		pending: map[*discovery.DeltaDiscoveryRequest]pendingWaypointWatch{},
		kick:    make(chan struct{}, 1),
	}
}

// Start rebuilds the snapshots of the connected waypoints that a change of
// the store may affect (deps), and builds a newly connected waypoint's
// first one, until ctx ends.
func (g *waypointGen) Start(ctx context.Context) error {
	changed := g.store.Changed()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-g.kick:
		}
		g.rebuild(ctx)
	}
}

// rebuild builds, from the current model, every waypoint that is stale or
// whose inputs the changes since the last rebuild touch.
func (g *waypointGen) rebuild(ctx context.Context) {
	from := g.checked
	ds, snap, version, logged := g.store.Since(from)
	g.checked = version
	changed := g.clock.changedAfter(from, version) // zero: no change (a new waypoint's first build)
	g.mu.Lock()
	var todo []auth.WaypointRef
	for wp, st := range g.wps {
		if !st.stale && (st.deps == nil || !logged || st.deps.affectedBy(ds)) {
			st.stale = true
		}
		if st.stale {
			st.stale = false
			todo = append(todo, wp)
		} else {
			g.skipped++
		}
	}
	g.mu.Unlock()
	for _, wp := range todo {
		g.publish(ctx, wp, snap, version, changed)
	}
}

// publish builds wp's snapshot from the model at version and publishes it
// if it is valid and consistent; otherwise the last good one stays. changed
// is when the oldest change it may carry was made (zero: none).
func (g *waypointGen) publish(ctx context.Context, wp auth.WaypointRef, m *model.Snapshot, version uint64, changed time.Time) {
	built := time.Now()
	v := strconv.FormatUint(version, 10)
	s, err := g.snapshot(m, wp, v)
	var d *deps
	if err == nil && g.inputs != nil {
		d = g.inputs(m, wp)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	st := g.wps[wp]
	if st == nil {
		return // disconnected meanwhile
	}
	if err != nil {
		st.status.Error, st.status.ErrorVersion, st.status.ErrorAt = err.Error(), v, g.now()
		st.status.Failures++
		st.deps = nil
		g.log.Error("waypoint snapshot not published; the waypoint keeps its last one", "waypoint", wp.String(), "modelVersion", v, "lastGood", st.status.Version, "error", err)
		return
	}
	if g.clock.on() {
		prev, _ := g.cache.GetSnapshot(wp.String())
		g.clock.waypointPush(wp, v, built, changed, changedTypes(prev, s))
	}
	// Under g.mu, so that a disconnect cannot clear the snapshot between the
	// check above and this call. SetSnapshot does not block: the server's
	// response channels have room for one response per type.
	if err := g.cache.SetSnapshot(ctx, wp.String(), s); err != nil {
		g.log.Error("waypoint snapshot not published", "waypoint", wp.String(), "error", err)
		st.deps = nil
		return
	}
	counts := map[string]int{}
	for _, t := range EnvoyTypeURLs {
		counts[t] = len(s.GetResources(t))
	}
	st.deps = d
	st.status = WaypointStatus{Version: v, PublishedAt: g.now(), Resources: counts, Failures: st.status.Failures, Streams: st.streams}
	g.log.Debug("waypoint snapshot published", "waypoint", wp.String(), "modelVersion", v, "resources", counts)
}

// snapshot is the pure part: the waypoint's resources from the model,
// validated, as a consistent snapshot.
func (g *waypointGen) snapshot(m *model.Snapshot, wp auth.WaypointRef, version string) (_ *cache.Snapshot, err error) {
	defer func() {
		// A translation bug for one waypoint must not take the control
		// plane (and every other client) down: it is that waypoint's error.
		if p := recover(); p != nil {
			err = fmt.Errorf("build: panic: %v", p)
		}
	}()
	r, err := g.build(m, envoy.Waypoint{Namespace: wp.Namespace, Name: wp.Name})
	if err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	if r == nil {
		return nil, errors.New("build: no resources")
	}
	return makeSnapshot(version, r)
}

// makeSnapshot wraps r in a snapshot after validating each resource
// (validateResource) and checks that it is consistent: every route a
// listener names and every EDS cluster's endpoints are in it, and nothing
// else of those types.
func makeSnapshot(version string, r *envoy.Resources) (*cache.Snapshot, error) {
	byType := map[string][]types.Resource{}
	add := func(typeURL string, name string, m types.Resource) error {
		if err := validateResource(m); err != nil {
			return fmt.Errorf("invalid %s %q: %w", shortType(typeURL), name, err)
		}
		byType[typeURL] = append(byType[typeURL], m)
		return nil
	}
	for _, l := range r.Listeners {
		if err := add(resource.ListenerType, l.GetName(), l); err != nil {
			return nil, err
		}
	}
	for _, rc := range r.Routes {
		if err := add(resource.RouteType, rc.GetName(), rc); err != nil {
			return nil, err
		}
	}
	for _, c := range r.Clusters {
		if err := add(resource.ClusterType, c.GetName(), c); err != nil {
			return nil, err
		}
	}
	for _, e := range r.Endpoints {
		if err := add(resource.EndpointType, e.GetClusterName(), e); err != nil {
			return nil, err
		}
	}
	for typeURL, rs := range byType {
		seen := map[string]bool{}
		for _, m := range rs {
			n := cache.GetResourceName(m)
			if seen[n] {
				return nil, fmt.Errorf("two %ss named %q", shortType(typeURL), n)
			}
			seen[n] = true
		}
	}
	s, err := cache.NewSnapshot(version, byType)
	if err != nil {
		return nil, err
	}
	if err := s.Consistent(); err != nil {
		return nil, fmt.Errorf("inconsistent snapshot: %w", err)
	}
	return s, nil
}

// shortType is a type URL's message name ("Cluster").
func shortType(typeURL string) string {
	for i := len(typeURL) - 1; i >= 0; i-- {
		if typeURL[i] == '.' {
			return typeURL[i+1:]
		}
	}
	return typeURL
}

// streamOpened records a stream of waypoint wp; its first one has the
// snapshot built.
func (g *waypointGen) streamOpened(wp auth.WaypointRef) {
	g.mu.Lock()
	defer g.mu.Unlock()
	st := g.wps[wp]
	if st == nil {
		st = &waypointState{stale: true}
		g.wps[wp] = st
		select {
		case g.kick <- struct{}{}:
		default:
		}
	}
	st.streams++
	st.status.Streams = st.streams
}

// streamClosed forgets a stream of waypoint wp; the last one's snapshot
// goes.
func (g *waypointGen) streamClosed(id int64, wp auth.WaypointRef) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for req, p := range g.pending { // a request the server refused before watching
		if p.stream == id {
			delete(g.pending, req)
		}
	}
	st := g.wps[wp]
	if st == nil {
		return
	}
	st.streams--
	st.status.Streams = st.streams
	if st.streams <= 0 {
		delete(g.wps, wp)
		g.cache.ClearSnapshot(wp.String())
	}
}

// requestOnStream records that req, on stream id, is waypoint wp's (from
// the callbacks, after authorization).
func (g *waypointGen) requestOnStream(id int64, wp auth.WaypointRef, req *discovery.DeltaDiscoveryRequest) {
	g.mu.Lock()
	g.pending[req] = pendingWaypointWatch{stream: id, wp: wp}
	g.mu.Unlock()
}

// CreateDeltaWatch implements cache.ConfigWatcher for the Envoy types: the
// watch goes to the snapshot cache under the stream's waypoint.
func (g *waypointGen) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) (func(), error) {
	g.mu.Lock()
	p, ok := g.pending[req]
	delete(g.pending, req)
	g.mu.Unlock()
	if !ok {
		// Not authorized as a waypoint's request: fail closed.
		return nil, errNotWaypoint
	}
	keyed := &discovery.DeltaDiscoveryRequest{
		Node:                     &core.Node{Id: p.wp.String()},
		TypeUrl:                  req.GetTypeUrl(),
		ResourceNamesSubscribe:   req.GetResourceNamesSubscribe(),
		ResourceNamesUnsubscribe: req.GetResourceNamesUnsubscribe(),
		InitialResourceVersions:  req.GetInitialResourceVersions(),
		ResponseNonce:            req.GetResponseNonce(),
		ErrorDetail:              req.GetErrorDetail(),
	}
	return g.cache.CreateDeltaWatch(keyed, sub, ch)
}

var errNotWaypoint = errors.New("envoy types are served to authenticated waypoints only")

// CreateWatch implements cache.ConfigWatcher; SotW is not served.
func (g *waypointGen) CreateWatch(*cache.Request, cache.Subscription, chan cache.Response) (func(), error) {
	return nil, errSotW
}

// Fetch implements cache.ConfigFetcher; REST is not served.
func (g *waypointGen) Fetch(context.Context, *cache.Request) (cache.Response, error) {
	return nil, errSotW
}

// Status returns the connected waypoints' snapshot states by
// "<namespace>/<name>".
func (g *waypointGen) Status() map[string]WaypointStatus {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[string]WaypointStatus, len(g.wps))
	for wp, st := range g.wps {
		s := st.status
		s.Resources = maps.Clone(s.Resources)
		out[wp.String()] = s
	}
	return out
}

// cacheLogger passes go-control-plane's log lines to slog: its debug and
// info lines (one per watch) at debug level.
type cacheLogger struct{ log *slog.Logger }

func (l cacheLogger) Debugf(format string, args ...any) { l.log.Debug(fmt.Sprintf(format, args...)) }
func (l cacheLogger) Infof(format string, args ...any)  { l.log.Debug(fmt.Sprintf(format, args...)) }
func (l cacheLogger) Warnf(format string, args ...any)  { l.log.Warn(fmt.Sprintf(format, args...)) }
func (l cacheLogger) Errorf(format string, args ...any) { l.log.Error(fmt.Sprintf(format, args...)) }
