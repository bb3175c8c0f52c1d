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

	// indexes, built by index()
	byIP  map[netip.Addr]*Workload
	byVIP map[netip.Addr]*Service
}

// Delta is an incremental update: upserts replace the resource with the same
// key; removals name keys.
type Delta struct {
	Workloads        []*Workload
	Services         []*Service
	Policies         []*Policy
	PeerAuthn        []*PeerAuthentication
	RemovedWorkloads []string
	RemovedServices  []string
	RemovedPolicies  []string
	RemovedPeerAuthn []string
}

// Empty reports whether d changes nothing.
func (d *Delta) Empty() bool {
	return len(d.Workloads)+len(d.Services)+len(d.Policies)+len(d.PeerAuthn)+
		len(d.RemovedWorkloads)+len(d.RemovedServices)+len(d.RemovedPolicies)+len(d.RemovedPeerAuthn) == 0
}

// NewSnapshot builds a snapshot (with its indexes) from resource lists.
func NewSnapshot(workloads []*Workload, services []*Service, policies []*Policy, peerAuthn []*PeerAuthentication) *Snapshot {
	s := &Snapshot{
		Workloads: make(map[string]*Workload, len(workloads)),
		Services:  make(map[string]*Service, len(services)),
		Policies:  make(map[string]*Policy, len(policies)),
		PeerAuthn: make(map[string]*PeerAuthentication, len(peerAuthn)),
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
			s.byIP[a] = w
		}
	}
	s.byVIP = make(map[netip.Addr]*Service, len(s.Services))
	for _, v := range s.Services {
		for _, a := range v.VIPs {
			s.byVIP[a] = v
		}
	}
}

// WorkloadByIP returns the workload that owns addr, if any.
func (s *Snapshot) WorkloadByIP(addr netip.Addr) *Workload { return s.byIP[addr.Unmap()] }

// ServiceByVIP returns the service with virtual IP addr, if any.
func (s *Snapshot) ServiceByVIP(addr netip.Addr) *Service { return s.byVIP[addr.Unmap()] }

// Apply returns a new snapshot with d applied; s is unchanged.
func (s *Snapshot) Apply(d *Delta) *Snapshot {
	n := &Snapshot{
		Workloads: applyDelta(s.Workloads, d.Workloads, d.RemovedWorkloads, func(w *Workload) string { return w.UID }),
		Services:  applyDelta(s.Services, d.Services, d.RemovedServices, (*Service).Key),
		Policies:  applyDelta(s.Policies, d.Policies, d.RemovedPolicies, (*Policy).Key),
		PeerAuthn: applyDelta(s.PeerAuthn, d.PeerAuthn, d.RemovedPeerAuthn, (*PeerAuthentication).Key),
	}
	n.index()
	return n
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
	mu      sync.Mutex // serializes writers and guards subs
	current atomic.Pointer[Snapshot]
	subs    []chan struct{}
}

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
	st.notifyLocked()
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
