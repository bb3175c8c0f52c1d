package xds

import (
	"context"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/monitoring"
	"github.com/ambit-mesh/ambit/model"
)

// pushClock times pushes for Istio's pilot_xds_push_time (from the start of
// building a push to each of its responses sent) and
// pilot_proxy_convergence_time (from the config change a push carries to
// the proxy having been sent every type the push changed).
//
// The generators register each push before publishing it: the node
// proxies' pushes by the deltaCache revision they start after (a response's
// SystemVersionInfo is the cache revision it was made at), a waypoint's by
// "<waypoint>@<model version>" (its snapshot's version). The callbacks look
// a response's push up just before the server sends it (responding), and
// the stream's Send reports when it is out (sent): both run on the
// stream's one sending goroutine, in that order.
//
// The time of a config change is when the store's version was first seen
// to move past it: Start's goroutine watches the store, and the generators
// stamp the versions they read (so a change is never timed later than the
// push that carries it began).
//
// A response to a client's first request of a type (no nonce: a connect,
// not a change) counts in push time, from the request's arrival, but not in
// convergence, as in Istio. A push that waited for the client's ACK of the
// previous response counts that wait in its push time.
type pushClock struct {
	// m receives the measurements; nil records nothing. Set before Start
	// and serving (Server.Register). A nil *pushClock records nothing
	// either (generators made without a Server).
	m   *monitoring.Metrics
	now func() time.Time

	mu        sync.Mutex                                 // guards everything below
	changes   []stamp                                    // ascending versions, bounded by maxStamps
	workloads []*push                                    // node proxies' pushes, ascending rev, bounded by maxPushes
	waypoints map[string]*push                           // by "<waypoint>@<version>"
	wpOrder   []string                                   // waypoints' keys, oldest first, bounded by maxPushes
	inflight  map[*discovery.DeltaDiscoveryResponse]send // between responding and sent
	requests  map[streamType]time.Time                   // first requests not answered yet, by arrival
	streams   map[int64]*streamPush                      // per stream: its newest push's progress
}

// Bounds of what the clock remembers: a push older than maxPushes pushes
// is no longer timed (its responses still go out).
const (
	maxStamps = 4096
	maxPushes = 256
)

type stamp struct {
	version uint64
	at      time.Time
}

// push is one push of the model to node proxies, or of one waypoint's
// snapshot.
type push struct {
	rev     uint64    // node proxies: the cache revision the push's updates come after
	built   time.Time // when it began to be built
	changed time.Time // the oldest config change it carries; zero: none (a first build)
	types   []string  // the type URLs it changed
}

type streamType struct {
	stream  int64
	typeURL string
}

type send struct {
	stream  int64
	push    *push
	initial bool // answers the client's first request of its type
}

type streamPush struct {
	push *push
	left []string // types of push not sent to the stream yet
	done bool     // convergence recorded
}

// on reports whether the clock records.
func (c *pushClock) on() bool { return c != nil && c.m != nil }

func newPushClock() *pushClock {
	return &pushClock{now: time.Now, waypoints: map[string]*push{},
		inflight: map[*discovery.DeltaDiscoveryResponse]send{}, streams: map[int64]*streamPush{}, requests: map[streamType]time.Time{}}
}

// Start stamps the store's versions as they change, until ctx ends.
func (c *pushClock) Start(ctx context.Context, store *model.Store) error {
	if !c.on() {
		return nil
	}
	changed := store.Changed()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			_, v := store.LoadVersion()
			c.observe(v)
		}
	}
}

// observe stamps version v now unless it was seen already.
func (c *pushClock) observe(v uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.changes); n > 0 && c.changes[n-1].version >= v {
		return
	}
	if len(c.changes) >= maxStamps {
		c.changes = slices.Delete(c.changes, 0, maxStamps/2)
	}
	c.changes = append(c.changes, stamp{v, c.now()})
}

// changedAfter is when the first change after version from was seen (zero
// if to is not after from: nothing changed). It stamps to first.
func (c *pushClock) changedAfter(from, to uint64) time.Time {
	if !c.on() || to <= from {
		return time.Time{}
	}
	c.observe(to)
	c.mu.Lock()
	defer c.mu.Unlock()
	i, _ := slices.BinarySearchFunc(c.changes, from+1, func(s stamp, v uint64) int {
		switch {
		case s.version < v:
			return -1
		case s.version > v:
			return 1
		}
		return 0
	})
	return c.changes[i].at // observe(to) made one with version >= to > from
}

// workloadPush registers a push to node proxies whose cache updates come
// after revision rev; triggers names what changed (model deltas; nil
// deltas: unknown, the whole model was compared).
func (c *pushClock) workloadPush(rev uint64, built, changed time.Time, types []string, ds []*model.Delta) {
	if !c.on() {
		return
	}
	countTriggers(c.m, ds)
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.workloads) >= maxPushes {
		c.workloads = slices.Delete(c.workloads, 0, maxPushes/2)
	}
	c.workloads = append(c.workloads, &push{rev: rev, built: built, changed: changed, types: types})
}

// waypointPush registers waypoint wp's snapshot of model version v.
func (c *pushClock) waypointPush(wp auth.WaypointRef, v string, built, changed time.Time, types []string) {
	if !c.on() {
		return
	}
	key := wp.String() + "@" + v
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.waypoints[key]; !ok {
		c.wpOrder = append(c.wpOrder, key)
	}
	c.waypoints[key] = &push{built: built, changed: changed, types: types}
	if len(c.wpOrder) > maxPushes {
		for _, k := range c.wpOrder[:maxPushes/2] {
			delete(c.waypoints, k)
		}
		c.wpOrder = slices.Delete(c.wpOrder, 0, maxPushes/2)
	}
}

// requested notes when a client's first request of a type (no nonce)
// arrived on stream id.
func (c *pushClock) requested(id int64, req *discovery.DeltaDiscoveryRequest) {
	if !c.on() || req.GetResponseNonce() != "" {
		return
	}
	c.mu.Lock()
	c.requests[streamType{id, req.GetTypeUrl()}] = c.now()
	c.mu.Unlock()
}

// responding looks up the push resp belongs to, just before it is sent on
// stream id (of caller, nil when unauthenticated) in answer to req.
func (c *pushClock) responding(id int64, caller *auth.Caller, req *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
	if !c.on() {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if req.GetResponseNonce() == "" {
		k := streamType{id, resp.GetTypeUrl()}
		if at, ok := c.requests[k]; ok {
			delete(c.requests, k)
			c.inflight[resp] = send{stream: id, push: &push{built: at}, initial: true}
		}
		return
	}
	var p *push
	if isEnvoyType(resp.GetTypeUrl()) {
		if caller != nil {
			p = c.waypoints[caller.Waypoint.String()+"@"+resp.GetSystemVersionInfo()]
		}
	} else if rev, err := strconv.ParseUint(resp.GetSystemVersionInfo(), 10, 64); err == nil {
		// The newest push whose updates came before rev.
		i, _ := slices.BinarySearchFunc(c.workloads, rev, func(p *push, rev uint64) int {
			if p.rev < rev {
				return -1
			}
			return 1
		})
		if i > 0 {
			p = c.workloads[i-1]
		}
	}
	if p != nil {
		c.inflight[resp] = send{stream: id, push: p}
	}
}

// sent records resp's push time and, once the stream has been sent every
// type the push changed, its convergence time; err is the Send's.
func (c *pushClock) sent(resp *discovery.DeltaDiscoveryResponse, err error) {
	if !c.on() {
		return
	}
	now := c.now()
	c.mu.Lock()
	s, ok := c.inflight[resp]
	delete(c.inflight, resp)
	if !ok || err != nil {
		c.mu.Unlock()
		return
	}
	var converged time.Duration
	if !s.initial && !s.push.changed.IsZero() {
		st := c.streams[s.stream]
		if st == nil {
			st = &streamPush{}
			c.streams[s.stream] = st
		}
		if st.push != s.push {
			*st = streamPush{push: s.push, left: slices.Clone(s.push.types)}
		}
		if i := slices.Index(st.left, resp.GetTypeUrl()); i >= 0 {
			st.left = slices.Delete(st.left, i, i+1)
		}
		if len(st.left) == 0 && !st.done {
			st.done = true
			converged = now.Sub(s.push.changed)
		}
	}
	c.mu.Unlock()
	c.m.XDSPushed(resp.GetTypeUrl(), now.Sub(s.push.built), proto.Size(resp))
	if converged > 0 {
		c.m.ProxyConverged(converged)
	}
}

// streamClosed forgets stream id.
func (c *pushClock) streamClosed(id int64) {
	if !c.on() {
		return
	}
	c.mu.Lock()
	delete(c.streams, id)
	for resp, s := range c.inflight { // a response whose Send never came (the stream broke)
		if s.stream == id {
			delete(c.inflight, resp)
		}
	}
	for k := range c.requests {
		if k.stream == id {
			delete(c.requests, k)
		}
	}
	c.mu.Unlock()
}

// countTriggers counts a push's reasons (pilot_push_triggers): endpoint
// for workloads, service for services, config for everything else.
func countTriggers(m *monitoring.Metrics, ds []*model.Delta) {
	var endpoint, service, config bool
	for _, d := range ds {
		endpoint = endpoint || len(d.Workloads)+len(d.RemovedWorkloads) > 0
		service = service || len(d.Services)+len(d.RemovedServices) > 0
		config = config || len(d.Policies)+len(d.RemovedPolicies)+len(d.PeerAuthn)+len(d.RemovedPeerAuthn)+
			len(d.HTTPRoutes)+len(d.RemovedHTTPRoutes)+len(d.GRPCRoutes)+len(d.RemovedGRPCRoutes)+
			len(d.DestinationRules)+len(d.RemovedDestinationRules)+len(d.WaypointPolicies)+len(d.RemovedWaypointPolicies)+
			len(d.Waypoints)+len(d.RemovedWaypoints) > 0
	}
	if ds == nil {
		config = true // a replaced model: unknown what, counted as config
	}
	for reason, ok := range map[string]bool{monitoring.TriggerEndpoint: endpoint, monitoring.TriggerService: service, monitoring.TriggerConfig: config} {
		if ok {
			m.PushTriggered(reason)
		}
	}
}

// revision is the cache's current revision.
func (c *deltaCache) revision() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rev
}

// changedTypes are the Envoy types whose resources differ between a
// waypoint's previous snapshot (nil: none) and next, by go-control-plane's
// resource versions (which it computes for Delta xDS anyway).
func changedTypes(prev cache.ResourceSnapshot, next *cache.Snapshot) []string {
	if next.ConstructVersionMap() != nil {
		return slices.Clone(EnvoyTypeURLs)
	}
	if prev == nil || prev.ConstructVersionMap() != nil {
		return slices.Clone(EnvoyTypeURLs)
	}
	var out []string
	for _, t := range EnvoyTypeURLs {
		if !maps.Equal(prev.GetVersionMap(t), next.GetVersionMap(t)) {
			out = append(out, t)
		}
	}
	return out
}
