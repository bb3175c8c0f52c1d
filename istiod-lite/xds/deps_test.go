package xds

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/envoy"
	"github.com/ambit-mesh/ambit/model"
)

// depsMesh is nw waypoints (ns-<i>/wp), each with services services of
// endpoints endpoints bound to it, routes from each service to its
// neighbour (the last to the first service of the next namespace, across
// waypoints), a DestinationRule per second service, and in each namespace
// one workload bound by itself (waypoint-for workload) that also backs the
// first service.
func depsMesh(nw, services, endpoints int) *model.Snapshot {
	var ws []*model.Workload
	var svcs []*model.Service
	for n := range nw {
		ns := fmt.Sprintf("ns-%d", n)
		wp := &model.WaypointRef{Name: "wp", Namespace: ns, Address: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, 200, byte(n + 1)}), model.PortHBONE)}
		for i := range services {
			svc := &model.Service{
				Name: fmt.Sprintf("svc-%d", i), Namespace: ns, Hostname: fmt.Sprintf("svc-%d.%s.svc.cluster.local", i, ns),
				VIPs:     []netip.Addr{netip.AddrFrom4([4]byte{10, 96, byte(n), byte(i + 1)})},
				Ports:    []model.ServicePort{{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP"}},
				Waypoint: wp,
			}
			for j := range endpoints {
				w := &model.Workload{UID: fmt.Sprintf("%s/%d-%d", ns, i, j), Name: fmt.Sprintf("p-%d-%d", i, j), Namespace: ns, ServiceAccount: "sa",
					Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(n + 1), byte(i), byte(j + 1)})}, Enrolled: true, Ready: true}
				ws = append(ws, w)
				svc.Endpoints = append(svc.Endpoints, model.Endpoint{WorkloadUID: w.UID})
			}
			svcs = append(svcs, svc)
		}
		own := &model.Workload{UID: ns + "/own", Name: "own", Namespace: ns, ServiceAccount: "sa", Enrolled: true, Ready: true,
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(n + 1), 250, 1})}, Waypoint: wp}
		ws = append(ws, own)
		svcs[n*services].Endpoints = append(svcs[n*services].Endpoints, model.Endpoint{WorkloadUID: own.UID})
	}
	s := model.NewSnapshot(ws, svcs, nil, nil)
	accepted := []model.Condition{{Type: model.ConditionAccepted, Status: true, Reason: model.ReasonAccepted}}
	for i, svc := range svcs {
		next := svcs[(i+1)%len(svcs)]
		r := &model.HTTPRoute{Name: "r-" + svc.Name, Namespace: svc.Namespace, Created: time.Unix(int64(i), 0),
			Parents: []model.RouteParent{{Kind: "Service", Namespace: svc.Namespace, Name: svc.Name, Conditions: accepted}},
			Rules: []model.HTTPRouteRule{{
				Matches:  []model.HTTPMatch{{PathType: model.PathPrefix, Path: "/"}},
				Backends: []model.WeightedBackend{{Service: svc.Key(), Port: 80, Weight: 90}, {Service: next.Key(), Port: 80, Weight: 10}},
			}}}
		s.HTTPRoutes[r.Key()] = r
		if i%2 == 0 {
			d := &model.DestinationRule{Name: "dr-" + svc.Name, Namespace: svc.Namespace, Service: svc.Key(),
				Policy: model.TrafficPolicy{ConnectionPool: &model.ConnectionPool{MaxConnections: 10}}}
			s.DestinationRules[d.Key()] = d
		}
	}
	return s
}

// randomDelta changes one random thing of s, as a registry would.
func randomDelta(r *rand.Rand, s *model.Snapshot, nw int) *model.Delta {
	pickSvc := func() *model.Service {
		for _, v := range s.Services {
			if r.IntN(4) == 0 {
				return v
			}
		}
		for _, v := range s.Services {
			return v
		}
		return nil
	}
	pickWl := func() *model.Workload {
		for _, w := range s.Workloads {
			if r.IntN(8) == 0 {
				return w
			}
		}
		for _, w := range s.Workloads {
			return w
		}
		return nil
	}
	wpIn := func() *model.WaypointRef {
		n := r.IntN(nw)
		return &model.WaypointRef{Name: "wp", Namespace: fmt.Sprintf("ns-%d", n), Address: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, 200, byte(n + 1)}), model.PortHBONE)}
	}
	d := &model.Delta{}
	switch r.IntN(12) {
	case 0: // a pod's readiness
		w := *pickWl()
		w.Ready = !w.Ready
		d.Workloads = append(d.Workloads, &w)
	case 1: // a pod's address
		w := *pickWl()
		w.Addresses = []netip.Addr{netip.AddrFrom4([4]byte{10, 200, byte(r.IntN(250)), byte(r.IntN(250) + 1)})}
		d.Workloads = append(d.Workloads, &w)
	case 2: // a pod goes, or comes (maybe as a known endpoint's)
		if len(s.Workloads) > 24 {
			d.RemovedWorkloads = append(d.RemovedWorkloads, pickWl().UID)
			break
		}
		uid := fmt.Sprintf("new/%d", r.IntN(1000))
		if v := pickSvc(); r.IntN(2) == 0 && len(v.Endpoints) > 0 {
			uid = v.Endpoints[0].WorkloadUID
		}
		d.Workloads = append(d.Workloads, &model.Workload{UID: uid, Name: "new", Namespace: "ns-0", ServiceAccount: "sa", Ready: true,
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, 201, byte(r.IntN(250)), byte(r.IntN(250) + 1)})}})
	case 3: // a pod (un)binds itself
		w := *pickWl()
		if w.Waypoint == nil {
			w.Waypoint = wpIn()
		} else {
			w.Waypoint = nil
		}
		d.Workloads = append(d.Workloads, &w)
	case 4: // a service (un)binds or moves
		v := *pickSvc()
		if r.IntN(3) == 0 {
			v.Waypoint = nil
		} else {
			v.Waypoint = wpIn()
		}
		d.Services = append(d.Services, &v)
	case 5: // a service's endpoints: one more (maybe a bound pod), one less
		v := *pickSvc()
		if r.IntN(2) == 0 && len(v.Endpoints) > 0 {
			v.Endpoints = v.Endpoints[1:]
		} else {
			v.Endpoints = append(append([]model.Endpoint(nil), v.Endpoints...), model.Endpoint{WorkloadUID: pickWl().UID})
		}
		d.Services = append(d.Services, &v)
	case 6: // a service goes, or comes (maybe as a known backend)
		if len(s.Services) > 10 {
			d.RemovedServices = append(d.RemovedServices, pickSvc().Key())
			break
		}
		n := r.IntN(20)
		d.Services = append(d.Services, &model.Service{Name: fmt.Sprintf("svc-%d", n%6), Namespace: fmt.Sprintf("ns-%d", n%nw),
			Hostname: fmt.Sprintf("svc-%d.ns-%d.svc.cluster.local", n%6, n%nw), VIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 97, byte(n), 1})},
			Ports: []model.ServicePort{{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP"}}, Endpoints: []model.Endpoint{{WorkloadUID: pickWl().UID}}})
	case 7: // a route's weights or backend
		for _, rt := range s.HTTPRoutes {
			c := *rt
			rule := c.Rules[0]
			rule.Backends = []model.WeightedBackend{{Service: pickSvc().Key(), Port: 80, Weight: int32(r.IntN(100) + 1)}}
			c.Rules = []model.HTTPRouteRule{rule}
			d.HTTPRoutes = append(d.HTTPRoutes, &c)
			break
		}
	case 8: // a new route on some service
		v := pickSvc()
		d.HTTPRoutes = append(d.HTTPRoutes, &model.HTTPRoute{Name: fmt.Sprintf("new-%d", r.IntN(1000)), Namespace: v.Namespace,
			Parents: []model.RouteParent{{Kind: "Service", Namespace: v.Namespace, Name: v.Name, Conditions: []model.Condition{{Type: model.ConditionAccepted, Status: true}}}},
			Rules:   []model.HTTPRouteRule{{Backends: []model.WeightedBackend{{Service: pickSvc().Key(), Port: 80, Weight: 1}}}}})
	case 9: // a route goes
		for k := range s.HTTPRoutes {
			d.RemovedHTTPRoutes = append(d.RemovedHTTPRoutes, k)
			break
		}
	case 10: // a DestinationRule for some service
		v := pickSvc()
		d.DestinationRules = append(d.DestinationRules, &model.DestinationRule{Name: fmt.Sprintf("dr-new-%d", r.IntN(1000)), Namespace: v.Namespace, Service: v.Key(),
			Policy: model.TrafficPolicy{ConnectionPool: &model.ConnectionPool{MaxConnections: int32(r.IntN(100) + 1)}}})
	case 11: // a DestinationRule goes
		for k := range s.DestinationRules {
			d.RemovedDestinationRules = append(d.RemovedDestinationRules, k)
			break
		}
	}
	return d
}

func sameResources(a, b *envoy.Resources) bool {
	if len(a.Listeners) != len(b.Listeners) || len(a.Routes) != len(b.Routes) || len(a.Clusters) != len(b.Clusters) || len(a.Endpoints) != len(b.Endpoints) {
		return false
	}
	for i := range a.Listeners {
		if !proto.Equal(a.Listeners[i], b.Listeners[i]) {
			return false
		}
	}
	for i := range a.Routes {
		if !proto.Equal(a.Routes[i], b.Routes[i]) {
			return false
		}
	}
	for i := range a.Clusters {
		if !proto.Equal(a.Clusters[i], b.Clusters[i]) {
			return false
		}
	}
	for i := range a.Endpoints {
		if !proto.Equal(a.Endpoints[i], b.Endpoints[i]) {
			return false
		}
	}
	return true
}

// A waypoint whose inputs a change does not touch gets the same resources
// from the changed model: over random changes (bindings, endpoints, pods,
// routes, DestinationRules), every skip is right, and some changes are
// skipped (and some not) for each waypoint.
func TestDepsSkipOnlyUnchanged(t *testing.T) {
	const nw = 4
	for seed := range uint64(8) {
		testDepsSkip(t, rand.New(rand.NewPCG(seed, 2)), nw)
	}
}

func testDepsSkip(t *testing.T, r *rand.Rand, nw int) {
	s := depsMesh(nw, 4, 2)
	wps := make([]auth.WaypointRef, nw)
	for i := range wps {
		wps[i] = auth.WaypointRef{Namespace: fmt.Sprintf("ns-%d", i), Name: "wp"}
	}
	build := func(s *model.Snapshot, wp auth.WaypointRef) *envoy.Resources {
		res, err := envoy.ForWaypoint(s, envoy.Waypoint{Namespace: wp.Namespace, Name: wp.Name})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	skipped, rebuilt := 0, 0
	for range 300 {
		d := randomDelta(r, s, nw)
		next := s.Apply(d)
		for _, wp := range wps {
			before, after := build(s, wp), build(next, wp)
			if depsOf(s, wp).affectedBy([]*model.Delta{d}) {
				rebuilt++
				continue
			}
			skipped++
			if !sameResources(before, after) {
				t.Errorf("%s skipped but its resources changed on %+v", wp, d)
			}
		}
		s = next
	}
	t.Logf("300 random changes x %d waypoints: %d rebuilds skipped, %d done", nw, skipped, rebuilt)
	if skipped == 0 || rebuilt == 0 {
		t.Errorf("skipped %d, rebuilt %d: the test does not exercise both", skipped, rebuilt)
	}
}

// BenchmarkWaypointRebuildOnePod: 50 connected waypoints of 20 services x 5
// endpoints each; one pod's readiness changes in one namespace. "all"
// rebuilds every waypoint (inputs unknown), "deps" only the one it touches.
func BenchmarkWaypointRebuildOnePod(b *testing.B) {
	const nw = 50
	for _, mode := range []string{"all", "deps"} {
		b.Run(mode, func(b *testing.B) {
			store := &model.Store{}
			store.Replace(depsMesh(nw, 20, 5))
			g := newWaypointGen(store, slog.New(slog.DiscardHandler), func(m *model.Snapshot, wp envoy.Waypoint) (*envoy.Resources, error) {
				return envoy.ForWaypoint(m, wp)
			})
			if mode == "deps" {
				g.inputs = depsOf
			}
			for i := range nw {
				g.streamOpened(auth.WaypointRef{Namespace: fmt.Sprintf("ns-%d", i), Name: "wp"})
			}
			g.rebuild(b.Context())
			uid := "ns-7/3-2"
			ready := true
			b.ReportAllocs()
			for b.Loop() {
				w := *store.Load().Workloads[uid]
				ready = !ready
				w.Ready = ready
				store.Apply(&model.Delta{Workloads: []*model.Workload{&w}})
				g.rebuild(b.Context())
			}
			if st := g.Status()["ns-7/wp"]; st.Error != "" || st.Version != storeVersion(store) {
				b.Fatalf("ns-7/wp: %+v", st)
			}
		})
	}
}
