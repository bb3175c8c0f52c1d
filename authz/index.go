package authz

import (
	"reflect"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/ambit-mesh/ambit/model"
)

// index is a snapshot's policies and PeerAuthentications sorted by key and
// grouped by namespace, with their decision reasons: built once per
// config snapshot (per Policies and PeerAuthn map) instead of sorting every
// key for every connection.
type index struct {
	policies  map[string]*model.Policy             // the map indexed (compared by identity)
	peerAuthn map[string]*model.PeerAuthentication // likewise
	pol       byNamespace[*indexedPolicy]
	pa        byNamespace[*model.PeerAuthentication]
}

// indexedPolicy is a policy with its key and the reasons it gives.
type indexedPolicy struct {
	*model.Policy
	key, allowReason, denyReason string
}

// byNamespace holds resources sorted by key: those flagged mesh-wide in
// mesh, the others under their namespace.
type byNamespace[T any] struct {
	ns   map[string][]keyed[T]
	mesh []keyed[T]
}

type keyed[T any] struct {
	key string
	v   T
}

func (b *byNamespace[T]) add(key, ns string, meshWide bool, v T) {
	if meshWide {
		b.mesh = append(b.mesh, keyed[T]{key, v})
		return
	}
	if b.ns == nil {
		b.ns = map[string][]keyed[T]{}
	}
	b.ns[ns] = append(b.ns[ns], keyed[T]{key, v})
}

func (b *byNamespace[T]) sort() {
	cmp := func(x, y keyed[T]) int { return strings.Compare(x.key, y.key) }
	slices.SortFunc(b.mesh, cmp)
	for _, l := range b.ns {
		slices.SortFunc(l, cmp)
	}
}

// scope is the resources that can apply in namespace ns with root
// namespace root: ns's, root's and the mesh-wide ones, three lists each
// sorted by key, walked in key order by next.
type scope[T any] struct {
	lists [3][]keyed[T]
}

func (b *byNamespace[T]) scope(ns, root string) scope[T] {
	s := scope[T]{lists: [3][]keyed[T]{b.ns[ns], nil, b.mesh}}
	if root != ns {
		s.lists[1] = b.ns[root]
	}
	return s
}

// next returns the resource with the smallest key left, false when none is.
func (s *scope[T]) next() (keyed[T], bool) {
	best := -1
	for i, l := range s.lists {
		if len(l) > 0 && (best < 0 || l[0].key < s.lists[best][0].key) {
			best = i
		}
	}
	if best < 0 {
		return keyed[T]{}, false
	}
	e := s.lists[best][0]
	s.lists[best] = s.lists[best][1:]
	return e, true
}

// last is the newest index built; most processes have one snapshot at a
// time, so one entry is the whole cache.
var last atomic.Pointer[index]

// indexOf returns snap's index, building it if the newest one is of other
// maps.
func indexOf(snap *model.Snapshot) *index {
	if x := last.Load(); x != nil && sameMap(x.policies, snap.Policies) && sameMap(x.peerAuthn, snap.PeerAuthn) {
		return x
	}
	x := &index{policies: snap.Policies, peerAuthn: snap.PeerAuthn}
	for k, p := range snap.Policies {
		x.pol.add(k, p.Namespace, p.MeshWide, &indexedPolicy{Policy: p, key: k,
			allowReason: "allowed by policy " + k, denyReason: "denied by policy " + k})
	}
	for k, pa := range snap.PeerAuthn {
		x.pa.add(k, pa.Namespace, pa.MeshWide, pa)
	}
	x.pol.sort()
	x.pa.sort()
	last.Store(x)
	return x
}

// sameMap reports whether a and b are the same map (not equal contents).
func sameMap[K comparable, V any](a, b map[K]V) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}
