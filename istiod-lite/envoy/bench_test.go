package envoy

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/model"
)

// bigSnapshot is a waypoint with services services of endpoints endpoints
// each, routes HTTPRoutes (each a 90/10 split with two matches, a retry
// and a header modifier), a DestinationRule per tenth service and two L7
// policies.
func bigSnapshot(services, endpoints, routes int) *model.Snapshot {
	wp := &model.WaypointRef{Name: "waypoint", Namespace: "shop", Address: netip.MustParseAddrPort("10.96.255.1:15008")}
	var ws []*model.Workload
	var svcs []*model.Service
	for i := range services {
		svc := &model.Service{
			Name: fmt.Sprintf("svc-%d", i), Namespace: "shop",
			Hostname: fmt.Sprintf("svc-%d.shop.svc.cluster.local", i),
			VIPs:     []netip.Addr{netip.AddrFrom4([4]byte{10, 96, byte(i / 250), byte(i%250 + 1)})},
			Ports:    []model.ServicePort{{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP"}},
			Waypoint: wp,
		}
		for j := range endpoints {
			w := &model.Workload{
				UID: fmt.Sprintf("Kubernetes/Pod/shop/svc-%d-%d", i, j), Name: fmt.Sprintf("svc-%d-%d", i, j), Namespace: "shop",
				ServiceAccount: fmt.Sprintf("svc-%d", i), Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(i), byte(j + 1)})},
				Enrolled: true, Ready: true, CanonicalName: svc.Name, CanonicalRevision: "v1",
			}
			ws = append(ws, w)
			svc.Endpoints = append(svc.Endpoints, model.Endpoint{WorkloadUID: w.UID})
		}
		svcs = append(svcs, svc)
	}
	s := model.NewSnapshot(ws, svcs, nil, nil)
	accepted := []model.Condition{{Type: model.ConditionAccepted, Status: true, Reason: model.ReasonAccepted}}
	for i := range routes {
		parent, canary := svcs[i%services], svcs[(i+1)%services]
		r := &model.HTTPRoute{
			Name: fmt.Sprintf("route-%d", i), Namespace: "shop", Created: time.Unix(int64(i), 0),
			Parents: []model.RouteParent{{Kind: "Service", Namespace: "shop", Name: parent.Name, Conditions: accepted}},
			Rules: []model.HTTPRouteRule{{
				Matches: []model.HTTPMatch{
					{PathType: model.PathPrefix, Path: "/api", Headers: []model.StringMatch{{Name: "x-canary", Type: model.MatchExact, Value: "1"}}},
					{PathType: model.PathExact, Path: "/health", Method: "GET"},
				},
				Backends: []model.WeightedBackend{
					{Service: parent.Key(), Port: 80, Weight: 90},
					{Service: canary.Key(), Port: 80, Weight: 10},
				},
				RequestHeaders: &model.HeaderModifier{Set: []model.Header{{Name: "x-route", Value: "r"}}},
				Retry:          &model.Retry{Attempts: 3, Codes: []int{503}},
				Timeout:        5 * time.Second,
			}},
		}
		s.HTTPRoutes[r.Key()] = r
	}
	n5 := uint32(3)
	for i := 0; i < services; i += 10 {
		d := &model.DestinationRule{Name: fmt.Sprintf("dr-%d", i), Namespace: "shop", Service: svcs[i].Key(), Policy: model.TrafficPolicy{
			ConnectionPool:   &model.ConnectionPool{MaxConnections: 100, MaxPendingRequests: 10},
			OutlierDetection: &model.OutlierDetection{Consecutive5xx: &n5},
		}}
		s.DestinationRules[d.Key()] = d
	}
	s.WaypointPolicies["shop/deny"] = &model.WaypointPolicy{Name: "deny", Namespace: "shop", Action: model.ActionDeny,
		Targets: []model.PolicyTarget{{Kind: "Gateway", Name: "waypoint"}},
		Rules:   []model.L7Rule{{To: []model.L7Operation{{Paths: []string{"/admin/*"}}}}}}
	s.WaypointPolicies["shop/allow"] = &model.WaypointPolicy{Name: "allow", Namespace: "shop", Action: model.ActionAllow,
		Targets: []model.PolicyTarget{{Kind: "Gateway", Name: "waypoint"}},
		Rules:   []model.L7Rule{{From: []model.L7Source{{Namespaces: []string{"shop"}}}, To: []model.L7Operation{{Methods: []string{"GET", "POST"}}}}}}
	return s
}

// TestBigSnapshot checks the benchmark's input builds a valid, consistent
// snapshot with what it should contain.
func TestBigSnapshot(t *testing.T) {
	r, err := ForWaypoint(bigSnapshot(100, 10, 50), shop)
	if err != nil {
		t.Fatal(err)
	}
	check(t, r)
	if n := len(r.Listeners[0].GetFilterChains()); n != 100 {
		t.Errorf("%d chains, want 100", n)
	}
	if len(r.Clusters) != 100 || len(r.Endpoints) != 100 || len(r.Routes) != 100 {
		t.Errorf("%d clusters, %d endpoints, %d route configs; want 100 each", len(r.Clusters), len(r.Endpoints), len(r.Routes))
	}
	if n := len(r.Endpoints[0].GetEndpoints()[0].GetLbEndpoints()); n != 10 {
		t.Errorf("%d endpoints in a cluster, want 10", n)
	}
}

// BenchmarkForWaypoint: 100 services x 10 endpoints, 50 routes.
func BenchmarkForWaypoint(b *testing.B) {
	s := bigSnapshot(100, 10, 50)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ForWaypoint(s, shop); err != nil {
			b.Fatal(err)
		}
	}
}
