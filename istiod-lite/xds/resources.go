package xds

import (
	"fmt"
	"log/slog"
	"runtime"

	"golang.org/x/sync/errgroup"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/model"
)

// Resources is what one snapshot of the model (or one change of it) turns
// into: per type URL, the resources to set by name and the names to remove.
type Resources struct {
	Set    map[string]map[string]*anypb.Any
	Remove map[string][]string
}

func newResources() *Resources {
	r := &Resources{Set: map[string]map[string]*anypb.Any{}, Remove: map[string][]string{}}
	for _, t := range workload.TypeURLs {
		r.Set[t] = map[string]*anypb.Any{}
	}
	return r
}

// Count returns the number of set and removed resources.
func (r *Resources) Count() int {
	n := 0
	for _, m := range r.Set {
		n += len(m)
	}
	for _, l := range r.Remove {
		n += len(l)
	}
	return n
}

var marshal = proto.MarshalOptions{Deterministic: true}

func makeAny(typeURL string, m proto.Message) (*anypb.Any, error) {
	b, err := marshal.Marshal(m)
	if err != nil {
		return nil, err
	}
	return &anypb.Any{TypeUrl: typeURL, Value: b}, nil
}

func makeWorkload(w *model.Workload) (*anypb.Any, error) {
	return makeAny(workload.WorkloadType, workload.FromWorkload(w))
}

func makeService(s *model.Service) (*anypb.Any, error) {
	return makeAny(workload.ServiceType, workload.FromService(s))
}

func makeAuthorization(p *model.Policy) (*anypb.Any, error) {
	return makeAny(workload.AuthorizationType, workload.FromPolicy(p))
}

func makePeerAuthentication(p *model.PeerAuthentication) (*anypb.Any, error) {
	return makeAny(workload.PeerAuthenticationType, workload.FromPeerAuthn(p))
}

// MakeResources is the pure translation of the change from prev to cur into
// xDS resources. Values are compared by pointer: the model store shares
// unchanged values (and whole unchanged maps) between snapshots. With an
// empty prev it is the full snapshot.
func MakeResources(prev, cur *model.Snapshot) (*Resources, error) {
	r := newResources()
	if err := diffInto(r, workload.WorkloadType, prev.Workloads, cur.Workloads, makeWorkload); err != nil {
		return nil, err
	}
	if err := diffInto(r, workload.ServiceType, prev.Services, cur.Services, makeService); err != nil {
		return nil, err
	}
	if err := diffInto(r, workload.AuthorizationType, prev.Policies, cur.Policies, makeAuthorization); err != nil {
		return nil, err
	}
	if err := diffInto(r, workload.PeerAuthenticationType, prev.PeerAuthn, cur.PeerAuthn, makePeerAuthentication); err != nil {
		return nil, err
	}
	return r, nil
}

// MakeDeltaResources is MakeResources for the store's deltas ds that led to
// cur: only the resources the deltas name are looked at (in cur, so several
// deltas touching one resource give its final state), which keeps a one-pod
// change O(1) instead of a comparison of the whole model.
func MakeDeltaResources(ds []*model.Delta, cur *model.Snapshot) (*Resources, error) {
	r := newResources()
	var wl, svc, pol, pa []string
	for _, d := range ds {
		for _, w := range d.Workloads {
			wl = append(wl, w.UID)
		}
		wl = append(wl, d.RemovedWorkloads...)
		for _, v := range d.Services {
			svc = append(svc, v.Key())
		}
		svc = append(svc, d.RemovedServices...)
		for _, p := range d.Policies {
			pol = append(pol, p.Key())
		}
		pol = append(pol, d.RemovedPolicies...)
		for _, p := range d.PeerAuthn {
			pa = append(pa, p.Key())
		}
		pa = append(pa, d.RemovedPeerAuthn...)
	}
	if err := keysInto(r, workload.WorkloadType, wl, cur.Workloads, makeWorkload); err != nil {
		return nil, err
	}
	if err := keysInto(r, workload.ServiceType, svc, cur.Services, makeService); err != nil {
		return nil, err
	}
	if err := keysInto(r, workload.AuthorizationType, pol, cur.Policies, makeAuthorization); err != nil {
		return nil, err
	}
	if err := keysInto(r, workload.PeerAuthenticationType, pa, cur.PeerAuthn, makePeerAuthentication); err != nil {
		return nil, err
	}
	return r, nil
}

func keysInto[T any](r *Resources, typeURL string, keys []string, cur map[string]*T, mk func(*T) (*anypb.Any, error)) error {
	seen := make(map[string]bool, len(keys))
	var set []string
	for _, k := range keys {
		if seen[k] {
			continue
		}
		seen[k] = true
		if cur[k] == nil {
			r.Remove[typeURL] = append(r.Remove[typeURL], k)
		} else {
			set = append(set, k)
		}
	}
	out, err := marshalAll(set, cur, mk)
	if err != nil {
		return fmt.Errorf("%s: %w", typeURL, err)
	}
	for i, k := range set {
		r.Set[typeURL][k] = out[i]
	}
	return nil
}

func diffInto[T any](r *Resources, typeURL string, prev, cur map[string]*T, mk func(*T) (*anypb.Any, error)) error {
	if sameMap(prev, cur) {
		return nil
	}
	var keys []string
	for k, v := range cur {
		if prev[k] != v {
			keys = append(keys, k)
		}
	}
	out, err := marshalAll(keys, cur, mk)
	if err != nil {
		return fmt.Errorf("%s: %w", typeURL, err)
	}
	for i, k := range keys {
		r.Set[typeURL][k] = out[i]
	}
	for k := range prev {
		if _, ok := cur[k]; !ok {
			r.Remove[typeURL] = append(r.Remove[typeURL], k)
		}
	}
	return nil
}

// marshalAll marshals cur[keys[i]] into out[i], on every CPU when there are
// many (a full push).
func marshalAll[T any](keys []string, cur map[string]*T, mk func(*T) (*anypb.Any, error)) ([]*anypb.Any, error) {
	out := make([]*anypb.Any, len(keys))
	workers := runtime.GOMAXPROCS(0)
	if len(keys) < 4096 || workers == 1 {
		workers = 1
	}
	var g errgroup.Group
	chunk := (len(keys) + workers - 1) / workers
	for lo := 0; lo < len(keys); lo += chunk {
		hi := min(lo+chunk, len(keys))
		g.Go(func() error {
			for i := lo; i < hi; i++ {
				a, err := mk(cur[keys[i]])
				if err != nil {
					return fmt.Errorf("%s: %w", keys[i], err)
				}
				out[i] = a
			}
			return nil
		})
	}
	return out, g.Wait()
}

// Consistent checks what a push would make the clients hold: every endpoint
// of a changed service is a workload of cur, and no resource name is empty.
func Consistent(r *Resources, cur *model.Snapshot) error {
	for typ, m := range r.Set {
		if _, ok := m[""]; ok {
			return fmt.Errorf("%s resource without a name", typ)
		}
	}
	for name := range r.Set[workload.ServiceType] {
		s := cur.Services[name]
		if s == nil {
			return fmt.Errorf("service %s is not in the model", name)
		}
		for _, e := range s.Endpoints {
			if cur.Workloads[e.WorkloadUID] == nil {
				return fmt.Errorf("service %s: endpoint %s is not a workload", name, e.WorkloadUID)
			}
		}
	}
	return nil
}

func logResources(log *slog.Logger, r *Resources, msg string) {
	args := []any{}
	for _, t := range workload.TypeURLs {
		if n, d := len(r.Set[t]), len(r.Remove[t]); n+d > 0 {
			args = append(args, t[len(workload.TypeURLPrefix):], fmt.Sprintf("+%d -%d", n, d))
		}
	}
	log.Info(msg, args...)
}

// typeOrder is the order types are pushed in: workloads before the services
// that reference them, as Istio's ztunnel expects.
var typeOrder = workload.TypeURLs
