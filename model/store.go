package model

import (
	"maps"
	"net/netip"
	"sync"
	"sync/atomic"
)

// Snapshot is one consistent, immutable view of the mesh. Readers must not
// modify it or anything it points to.
type Snapshot struct {
	Workloads map[string]*Workload           // by UID
	Services  map[string]*Service            // by Service.Key()
	Policies  map[string]*Policy             // by Policy.Key()
	PeerAuthn map[string]*PeerAuthentication // by PeerAuthentication.Key()
	// HTTPRoutes are for waypoints (ztunnels do not receive them). NewSnapshot
	// leaves it empty; a builder may fill it before publishing the snapshot.
	HTTPRoutes map[string]*HTTPRoute // by HTTPRoute.Key()
	// GRPCRoutes, DestinationRules, WaypointPolicies and Waypoints are the
	// rest of the L7 model (see l7.go), for waypoints only; NewSnapshot
	// leaves them empty likewise.
	GRPCRoutes       map[string]*HTTPRoute       // GRPCRoutes by HTTPRoute.Key()
	DestinationRules map[string]*DestinationRule // by DestinationRule.Key()
	WaypointPolicies map[string]*WaypointPolicy  // by WaypointPolicy.Key()
	Waypoints        map[string]*Waypoint        // by Waypoint.Key()

	// indexes, built by index()
	byIP  map[netip.Addr]*Workload
	byVIP map[netip.Addr]*Service
}

// Delta is an incremental update: upserts replace the resource with the same
// key; removals name keys.
type Delta struct {
	Workloads         []*Workload
	Services          []*Service
	Policies          []*Policy
	PeerAuthn         []*PeerAuthentication
	RemovedWorkloads  []string
	RemovedServices   []string
	RemovedPolicies   []string
	RemovedPeerAuthn  []string
	HTTPRoutes        []*HTTPRoute
	RemovedHTTPRoutes []string

	GRPCRoutes              []*HTTPRoute
	RemovedGRPCRoutes       []string
	DestinationRules        []*DestinationRule
	RemovedDestinationRules []string
	WaypointPolicies        []*WaypointPolicy
	RemovedWaypointPolicies []string
	Waypoints               []*Waypoint
	RemovedWaypoints        []string
}

// Empty reports whether d changes nothing.
func (d *Delta) Empty() bool {
	return len(d.Workloads)+len(d.Services)+len(d.Policies)+len(d.PeerAuthn)+
		len(d.RemovedWorkloads)+len(d.RemovedServices)+len(d.RemovedPolicies)+len(d.RemovedPeerAuthn)+
		len(d.HTTPRoutes)+len(d.RemovedHTTPRoutes)+d.l7Len() == 0
}

// l7Len returns the number of L7 (waypoint-only) changes in d.
func (d *Delta) l7Len() int {
	return len(d.GRPCRoutes) + len(d.RemovedGRPCRoutes) + len(d.DestinationRules) + len(d.RemovedDestinationRules) +
		len(d.WaypointPolicies) + len(d.RemovedWaypointPolicies) + len(d.Waypoints) + len(d.RemovedWaypoints)
}

// Len returns the number of upserts and removals in d.
func (d *Delta) Len() int {
	return len(d.Workloads) + len(d.Services) + len(d.Policies) + len(d.PeerAuthn) + len(d.HTTPRoutes) +
		len(d.RemovedWorkloads) + len(d.RemovedServices) + len(d.RemovedPolicies) + len(d.RemovedPeerAuthn) +
		len(d.RemovedHTTPRoutes) + d.l7Len()
}

// NewSnapshot builds a snapshot (with its indexes) from resource lists.
func NewSnapshot(workloads []*Workload, services []*Service, policies []*Policy, peerAuthn []*PeerAuthentication) *Snapshot {
	s := &Snapshot{
		Workloads:  make(map[string]*Workload, len(workloads)),
		Services:   make(map[string]*Service, len(services)),
		Policies:   make(map[string]*Policy, len(policies)),
		PeerAuthn:  make(map[string]*PeerAuthentication, len(peerAuthn)),
		HTTPRoutes: map[string]*HTTPRoute{},

		GRPCRoutes:       map[string]*HTTPRoute{},
		DestinationRules: map[string]*DestinationRule{},
		WaypointPolicies: map[string]*WaypointPolicy{},
		Waypoints:        map[string]*Waypoint{},
	}
	for _, w := range workloads {
		s.Workloads[w.UID] = w
	}
	for _, v := range services {
		s.Services[v.Key()] = v
	}
	for _, p := range policies {
		s.Policies[p.Key()] = p
	}
	for _, p := range peerAuthn {
		s.PeerAuthn[p.Key()] = p
	}
	s.index()
	return s
}

func (s *Snapshot) index() {
	s.byIP = make(map[netip.Addr]*Workload, len(s.Workloads))
	for _, w := range s.Workloads {
		for _, a := range w.Addresses {
			s.byIP[a.Unmap()] = w
		}
	}
	s.byVIP = make(map[netip.Addr]*Service, len(s.Services))
	for _, v := range s.Services {
		for _, a := range v.VIPs {
			s.byVIP[a.Unmap()] = v
		}
	}
}

// WorkloadByIP returns the workload that owns addr, if any.
func (s *Snapshot) WorkloadByIP(addr netip.Addr) *Workload { return s.byIP[addr.Unmap()] }

// ServiceByVIP returns the service with virtual IP addr, if any.
func (s *Snapshot) ServiceByVIP(addr netip.Addr) *Service { return s.byVIP[addr.Unmap()] }

// Apply returns a new snapshot with d applied; s is unchanged. Maps and
// indexes that d does not touch are shared with s; the ones it touches are
// cloned and patched, so the cost is that of a map copy, not of a re-index.
func (s *Snapshot) Apply(d *Delta) *Snapshot {
	n := &Snapshot{
		Workloads:  applyDelta(s.Workloads, d.Workloads, d.RemovedWorkloads, func(w *Workload) string { return w.UID }),
		Services:   applyDelta(s.Services, d.Services, d.RemovedServices, (*Service).Key),
		Policies:   applyDelta(s.Policies, d.Policies, d.RemovedPolicies, (*Policy).Key),
		PeerAuthn:  applyDelta(s.PeerAuthn, d.PeerAuthn, d.RemovedPeerAuthn, (*PeerAuthentication).Key),
		HTTPRoutes: applyDelta(s.HTTPRoutes, d.HTTPRoutes, d.RemovedHTTPRoutes, (*HTTPRoute).Key),

		GRPCRoutes:       applyDelta(s.GRPCRoutes, d.GRPCRoutes, d.RemovedGRPCRoutes, (*HTTPRoute).Key),
		DestinationRules: applyDelta(s.DestinationRules, d.DestinationRules, d.RemovedDestinationRules, (*DestinationRule).Key),
		WaypointPolicies: applyDelta(s.WaypointPolicies, d.WaypointPolicies, d.RemovedWaypointPolicies, (*WaypointPolicy).Key),
		Waypoints:        applyDelta(s.Waypoints, d.Waypoints, d.RemovedWaypoints, (*Waypoint).Key),
	}
	if s.byIP == nil {
		n.index()
		return n
	}
	n.byIP = patchIndex(s.byIP, s.Workloads, n.Workloads, d.Workloads, d.RemovedWorkloads,
		func(w *Workload) string { return w.UID }, func(w *Workload) []netip.Addr { return w.Addresses })
	n.byVIP = patchIndex(s.byVIP, s.Services, n.Services, d.Services, d.RemovedServices,
		(*Service).Key, func(v *Service) []netip.Addr { return v.VIPs })
	return n
}

// patchIndex returns idx updated for the upserts and removals that turned
// old into cur. Addresses of replaced or removed values are dropped when the
// index still points at that value; new values then claim their addresses.
// Two values with one address is a config error that translation rejects; if
// it happens anyway, the index keeps the latest value and may lose the
// address when that value goes.
func patchIndex[T any](idx map[netip.Addr]*T, old, cur map[string]*T, upserts []*T, removed []string, key func(*T) string, addrs func(*T) []netip.Addr) map[netip.Addr]*T {
	if len(upserts) == 0 && len(removed) == 0 {
		return idx
	}
	m := maps.Clone(idx)
	drop := func(v *T) {
		for _, a := range addrs(v) {
			a = a.Unmap()
			if m[a] == v {
				delete(m, a)
			}
		}
	}
	for _, k := range removed {
		if v := old[k]; v != nil {
			drop(v)
		}
	}
	for _, v := range upserts {
		if o := old[key(v)]; o != nil {
			drop(o)
		}
	}
	for _, v := range upserts {
		if cur[key(v)] != v {
			continue // a later upsert with the same key won
		}
		for _, a := range addrs(v) {
			m[a.Unmap()] = v
		}
	}
	return m
}

func applyDelta[T any](old map[string]*T, upserts []*T, removed []string, key func(*T) string) map[string]*T {
	if len(upserts) == 0 && len(removed) == 0 {
		return old // unchanged maps are shared between snapshots
	}
	m := maps.Clone(old)
	if m == nil {
		m = map[string]*T{}
	}
	for _, k := range removed {
		delete(m, k)
	}
	for _, v := range upserts {
		m[key(v)] = v
	}
	return m
}

// Store holds the current snapshot. The zero value holds an empty snapshot
// and is ready to use. Readers call Load (lock-free); writers are serialized.
type Store struct {
	mu      sync.Mutex // serializes writers and guards subs, version, log, logStart
	current atomic.Pointer[Snapshot]
	subs    []chan struct{}

	version  uint64   // bumped by every Replace and Apply
	log      []*Delta // the deltas that made versions logStart+1 .. version
	logStart uint64
}

// maxLoggedDeltas bounds the deltas a Store keeps for Since.
const maxLoggedDeltas = 4096

var emptySnapshot = NewSnapshot(nil, nil, nil, nil)

// Load returns the current snapshot (never nil).
func (st *Store) Load() *Snapshot {
	if s := st.current.Load(); s != nil {
		return s
	}
	return emptySnapshot
}

// Replace installs s as the current snapshot.
func (st *Store) Replace(s *Snapshot) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.current.Store(s)
	st.version++
	st.log, st.logStart = nil, st.version
	st.notifyLocked()
}

// Apply applies an incremental update.
func (st *Store) Apply(d *Delta) {
	if d.Empty() {
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	st.current.Store(st.Load().Apply(d))
	st.version++
	st.log = append(st.log, d)
	if len(st.log) > maxLoggedDeltas {
		drop := len(st.log) - maxLoggedDeltas/2
		st.log = append([]*Delta(nil), st.log[drop:]...)
		st.logStart += uint64(drop)
	}
	st.notifyLocked()
}

// LoadVersion returns the current snapshot and its version (the number of
// Replace and Apply calls so far).
func (st *Store) LoadVersion() (*Snapshot, uint64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.Load(), st.version
}

// Since returns the deltas applied after version v, oldest first, with the
// snapshot and version they lead to, so a consumer can process only what
// changed. ok is false when they are not all kept (a Replace since, or too
// many changes): the consumer then compares snapshots. The deltas must not
// be modified.
func (st *Store) Since(v uint64) (ds []*Delta, cur *Snapshot, version uint64, ok bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	cur, version = st.Load(), st.version
	if v < st.logStart || v > st.version {
		return nil, cur, version, false
	}
	return st.log[v-st.logStart:], cur, version, true
}

// Changed returns a channel that receives a value (coalesced) after every
// change to the store.
func (st *Store) Changed() <-chan struct{} {
	ch := make(chan struct{}, 1)
	st.mu.Lock()
	st.subs = append(st.subs, ch)
	st.mu.Unlock()
	return ch
}

func (st *Store) notifyLocked() {
	for _, ch := range st.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
