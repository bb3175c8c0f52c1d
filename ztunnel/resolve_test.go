package ztunnel

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/model"
)

func TestResolve(t *testing.T) {
	ap := netip.MustParseAddrPort
	a := netip.MustParseAddr
	wp := &model.WaypointRef{Name: "waypoint", Namespace: "shop", Address: ap("10.0.9.9:15008")}
	wpPod := &model.Workload{UID: "c/Pod/shop/waypoint-1", Name: "waypoint-1", Namespace: "shop", ServiceAccount: "waypoint-sa",
		Addresses: []netip.Addr{a("10.0.9.9")}, Ready: true}
	client := &model.Workload{UID: "c/Pod/shop/client", Name: "client", Namespace: "shop", ServiceAccount: "client",
		Addresses: []netip.Addr{a("10.0.1.1")}, Enrolled: true, Ready: true}
	b1 := &model.Workload{UID: "c/Pod/shop/b1", Name: "b1", Namespace: "shop", ServiceAccount: "b",
		Addresses: []netip.Addr{a("10.0.2.1"), a("fd00::2:1")}, Enrolled: true, Ready: true}
	b2 := &model.Workload{UID: "c/Pod/shop/b2", Name: "b2", Namespace: "shop", ServiceAccount: "b",
		Addresses: []netip.Addr{a("10.0.2.2")}, Enrolled: true, Ready: true}
	bDown := &model.Workload{UID: "c/Pod/shop/b3", Name: "b3", Namespace: "shop", ServiceAccount: "b",
		Addresses: []netip.Addr{a("10.0.2.3")}, Enrolled: true, Ready: false}
	legacy := &model.Workload{UID: "c/Pod/old/legacy", Name: "legacy", Namespace: "old",
		Addresses: []netip.Addr{a("10.0.3.1")}, Enrolled: false, Ready: true}
	waypointed := &model.Workload{UID: "c/Pod/shop/w", Name: "w", Namespace: "shop", ServiceAccount: "w",
		Addresses: []netip.Addr{a("10.0.4.1")}, Enrolled: true, Ready: true, Waypoint: wp}
	lost := &model.Workload{UID: "c/Pod/shop/lost", Name: "lost", Namespace: "shop",
		Addresses: []netip.Addr{a("10.0.4.2")}, Enrolled: true, Ready: true, Waypoint: &model.WaypointRef{Name: "gone", Namespace: "shop"}}

	svcB := &model.Service{Name: "b", Namespace: "shop", Hostname: "b.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.10"), a("fd00:96::10")}, Ports: []model.ServicePort{{Port: 80, TargetPort: 8080}, {Port: 9090}},
		Endpoints: []model.Endpoint{{WorkloadUID: b1.UID, Ports: map[uint16]uint16{80: 8081}}, {WorkloadUID: b2.UID}, {WorkloadUID: bDown.UID}, {WorkloadUID: "c/Pod/shop/missing"}}}
	svcLegacy := &model.Service{Name: "legacy", Namespace: "old", Hostname: "legacy.old.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.20")}, Ports: []model.ServicePort{{Port: 80}}, Endpoints: []model.Endpoint{{WorkloadUID: legacy.UID}}}
	svcEmpty := &model.Service{Name: "empty", Namespace: "shop", Hostname: "empty.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.30")}, Ports: []model.ServicePort{{Port: 80}}, Endpoints: []model.Endpoint{{WorkloadUID: bDown.UID}}}
	svcWP := &model.Service{Name: "wp", Namespace: "shop", Hostname: "wp.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.40")}, Ports: []model.ServicePort{{Port: 80}}, Endpoints: []model.Endpoint{{WorkloadUID: b1.UID}}, Waypoint: wp}

	// A waypoint addressed by its Service's cluster IP (the deployer's
	// Gateway status address): dialled at one of its ready pods.
	gwDown := &model.Workload{UID: "c/Pod/shop/gw-0", Name: "gw-0", Namespace: "shop", ServiceAccount: "gw",
		Addresses: []netip.Addr{a("10.0.8.1")}, Ready: false}
	gw1 := &model.Workload{UID: "c/Pod/shop/gw-1", Name: "gw-1", Namespace: "shop", ServiceAccount: "gw",
		Addresses: []netip.Addr{a("10.0.8.2")}, Ready: true}
	gw2 := &model.Workload{UID: "c/Pod/shop/gw-2", Name: "gw-2", Namespace: "shop", ServiceAccount: "gw",
		Addresses: []netip.Addr{a("fd00::8:3"), a("10.0.8.3")}, Ready: true}
	// Pods of other service accounts carrying the Gateway's label join its
	// Service: they are not the waypoint.
	gwLabel := map[string]string{"gateway.networking.k8s.io/gateway-name": "gw"}
	rogue1 := &model.Workload{UID: "c/Pod/shop/rogue-1", Name: "rogue-1", Namespace: "shop", ServiceAccount: "rogue", Labels: gwLabel,
		Addresses: []netip.Addr{a("10.0.7.1")}, Enrolled: true, Ready: true}
	rogue2 := &model.Workload{UID: "c/Pod/shop/rogue-2", Name: "rogue-2", Namespace: "shop", Labels: gwLabel,
		Addresses: []netip.Addr{a("10.0.7.2")}, Enrolled: true, Ready: true}
	svcGW := &model.Service{Name: "gw", Namespace: "shop", Hostname: "gw.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.50")}, Ports: []model.ServicePort{{Name: "mesh", Port: 15008}},
		Endpoints: []model.Endpoint{{WorkloadUID: rogue1.UID}, {WorkloadUID: gwDown.UID}, {WorkloadUID: gw1.UID}, {WorkloadUID: gw2.UID}, {WorkloadUID: rogue2.UID}}}
	svcGWRogue := &model.Service{Name: "gw-rogue", Namespace: "shop", Hostname: "gw-rogue.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.90")}, Ports: []model.ServicePort{{Port: 15008}}, Endpoints: []model.Endpoint{{WorkloadUID: rogue1.UID}, {WorkloadUID: rogue2.UID}}}
	svcViaRogue := &model.Service{Name: "vr", Namespace: "shop", Hostname: "vr.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.100")}, Ports: []model.ServicePort{{Port: 80}}, Endpoints: []model.Endpoint{{WorkloadUID: b2.UID}},
		Waypoint: &model.WaypointRef{Name: "gw-rogue", Namespace: "shop", Address: ap("10.96.0.90:15008")}}
	otherTD := &model.Workload{UID: "c/Pod/shop/otd", Name: "otd", Namespace: "shop", ServiceAccount: "otd", TrustDomain: "other.example",
		Addresses: []netip.Addr{a("10.0.4.4")}, Enrolled: true, Ready: true, Waypoint: &model.WaypointRef{Name: "gw", Namespace: "shop", Address: ap("10.96.0.50:15008")}}
	wpVIP := &model.WaypointRef{Name: "gw", Namespace: "shop", Address: ap("10.96.0.50:15008")}
	svcViaVIP := &model.Service{Name: "v", Namespace: "shop", Hostname: "v.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.60")}, Ports: []model.ServicePort{{Port: 80, TargetPort: 8080}},
		Endpoints: []model.Endpoint{{WorkloadUID: b2.UID}}, Waypoint: wpVIP}
	viaVIP := &model.Workload{UID: "c/Pod/shop/v", Name: "v", Namespace: "shop", ServiceAccount: "v",
		Addresses: []netip.Addr{a("10.0.4.3")}, Enrolled: true, Ready: true, Waypoint: wpVIP}
	svcGWDown := &model.Service{Name: "gw-down", Namespace: "shop", Hostname: "gw-down.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.70")}, Ports: []model.ServicePort{{Port: 15008}}, Endpoints: []model.Endpoint{{WorkloadUID: gwDown.UID}}}
	svcViaDown := &model.Service{Name: "vd", Namespace: "shop", Hostname: "vd.shop.svc.cluster.local",
		VIPs: []netip.Addr{a("10.96.0.80")}, Ports: []model.ServicePort{{Port: 80}}, Endpoints: []model.Endpoint{{WorkloadUID: b2.UID}},
		Waypoint: &model.WaypointRef{Name: "gw-down", Namespace: "shop", Address: ap("10.96.0.70:15008")}}

	snap := model.NewSnapshot([]*model.Workload{wpPod, client, b1, b2, bDown, legacy, waypointed, lost, gwDown, gw1, gw2, viaVIP, rogue1, rogue2, otherTD},
		[]*model.Service{svcB, svcLegacy, svcEmpty, svcWP, svcGW, svcViaVIP, svcGWDown, svcViaDown, svcGWRogue, svcViaRogue}, nil, nil)

	first := func(int) int { return 0 }
	second := func(int) int { return 1 }
	last := func(n int) int { return n - 1 }
	tests := []struct {
		name     string
		src      *model.Workload
		dst      string
		pick     func(int) int
		err      error
		kind     RouteKind
		addr     string
		target   string
		peer     string
		workload *model.Workload
		service  *model.Service
	}{
		{name: "service to first endpoint, per-endpoint target port", src: client, dst: "10.96.0.10:80", pick: first,
			kind: RouteHBONE, addr: "10.0.2.1:15008", target: "10.0.2.1:8081", peer: "spiffe://cluster.local/ns/shop/sa/b", workload: b1, service: svcB},
		{name: "service to second endpoint, service target port", src: client, dst: "10.96.0.10:80", pick: second,
			kind: RouteHBONE, addr: "10.0.2.2:15008", target: "10.0.2.2:8080", workload: b2, service: svcB},
		{name: "service port without target port", src: client, dst: "10.96.0.10:9090", pick: second,
			kind: RouteHBONE, addr: "10.0.2.2:15008", target: "10.0.2.2:9090", workload: b2, service: svcB},
		{name: "v4-mapped VIP", src: client, dst: "[::ffff:10.96.0.10]:80", pick: second,
			kind: RouteHBONE, addr: "10.0.2.2:15008", target: "10.0.2.2:8080", workload: b2, service: svcB},
		{name: "IPv6 VIP picks the endpoint's IPv6 address", src: client, dst: "[fd00:96::10]:80", pick: first,
			kind: RouteHBONE, addr: "[fd00::2:1]:15008", target: "[fd00::2:1]:8081", workload: b1, service: svcB},
		{name: "unknown service port", src: client, dst: "10.96.0.10:81", err: ErrUnknownServicePort},
		{name: "no ready endpoint", src: client, dst: "10.96.0.30:80", err: ErrNoReadyEndpoint},
		{name: "service of non-enrolled workloads goes direct", src: client, dst: "10.96.0.20:80",
			kind: RouteDirect, addr: "10.0.3.1:80", target: "10.0.3.1:80", workload: legacy, service: svcLegacy},
		{name: "pod IP goes to that pod", src: client, dst: "10.0.2.3:8080",
			kind: RouteHBONE, addr: "10.0.2.3:15008", target: "10.0.2.3:8080", peer: "spiffe://cluster.local/ns/shop/sa/b", workload: bDown},
		{name: "non-enrolled pod IP goes direct", src: client, dst: "10.0.3.1:5432",
			kind: RouteDirect, addr: "10.0.3.1:5432", target: "10.0.3.1:5432", workload: legacy},
		{name: "outside the mesh passes through", src: client, dst: "192.0.2.7:443",
			kind: RoutePassthrough, addr: "192.0.2.7:443", target: "192.0.2.7:443"},
		{name: "unknown source still resolves", src: nil, dst: "10.0.3.1:5432",
			kind: RouteDirect, addr: "10.0.3.1:5432", target: "10.0.3.1:5432", workload: legacy},
		{name: "service with waypoint goes to the waypoint", src: client, dst: "10.96.0.40:80",
			kind: RouteHBONE, addr: "10.0.9.9:15008", target: "10.96.0.40:80", peer: "spiffe://cluster.local/ns/shop/sa/waypoint-sa", service: svcWP},
		{name: "the waypoint itself reaches the endpoints", src: wpPod, dst: "10.96.0.40:80",
			kind: RouteHBONE, addr: "10.0.2.1:15008", target: "10.0.2.1:80", workload: b1, service: svcWP},
		{name: "workload with waypoint goes to the waypoint", src: client, dst: "10.0.4.1:80",
			kind: RouteHBONE, addr: "10.0.9.9:15008", target: "10.0.4.1:80", peer: "spiffe://cluster.local/ns/shop/sa/waypoint-sa"},
		{name: "unresolved waypoint fails closed", src: client, dst: "10.0.4.2:80", err: ErrWaypointMissing},
		{name: "waypoint VIP goes to its first ready pod, authority the service VIP", src: client, dst: "10.96.0.60:80", pick: first,
			kind: RouteHBONE, addr: "10.0.8.2:15008", target: "10.96.0.60:80", peer: "spiffe://cluster.local/ns/shop/sa/gw", service: svcViaVIP},
		{name: "waypoint VIP balances over its ready pods (same family as the VIP)", src: client, dst: "10.96.0.60:80", pick: second,
			kind: RouteHBONE, addr: "10.0.8.3:15008", target: "10.96.0.60:80", peer: "spiffe://cluster.local/ns/shop/sa/gw", service: svcViaVIP},
		{name: "workload behind a waypoint VIP, authority the pod", src: client, dst: "10.0.4.3:8080", pick: first,
			kind: RouteHBONE, addr: "10.0.8.2:15008", target: "10.0.4.3:8080", peer: "spiffe://cluster.local/ns/shop/sa/gw"},
		{name: "a pod of the waypoint VIP reaches the endpoints", src: gw2, dst: "10.96.0.60:80",
			kind: RouteHBONE, addr: "10.0.2.2:15008", target: "10.0.2.2:8080", workload: b2, service: svcViaVIP},
		{name: "a pod of the waypoint VIP reaches a workload it serves", src: gw1, dst: "10.0.4.3:8080",
			kind: RouteHBONE, addr: "10.0.4.3:15008", target: "10.0.4.3:8080", workload: viaVIP},
		{name: "waypoint VIP without a ready pod fails closed", src: client, dst: "10.96.0.80:80", err: ErrNoReadyEndpoint},
		{name: "an endpoint of another service account behind the waypoint VIP is never picked (first)", src: client, dst: "10.96.0.60:80", pick: first,
			kind: RouteHBONE, addr: "10.0.8.2:15008", target: "10.96.0.60:80", peer: "spiffe://cluster.local/ns/shop/sa/gw", service: svcViaVIP},
		{name: "an endpoint of another service account behind the waypoint VIP is never picked (last)", src: client, dst: "10.0.4.3:8080", pick: last,
			kind: RouteHBONE, addr: "10.0.8.3:15008", target: "10.0.4.3:8080", peer: "spiffe://cluster.local/ns/shop/sa/gw"},
		{name: "waypoint VIP with only endpoints of other service accounts fails closed", src: client, dst: "10.96.0.100:80", err: ErrNoReadyEndpoint},
		{name: "a labelled pod of another service account is not the waypoint (service)", src: rogue1, dst: "10.96.0.60:80", pick: first,
			kind: RouteHBONE, addr: "10.0.8.2:15008", target: "10.96.0.60:80", peer: "spiffe://cluster.local/ns/shop/sa/gw", service: svcViaVIP},
		{name: "a labelled pod of the default service account is not the waypoint (workload)", src: rogue2, dst: "10.0.4.3:8080", pick: first,
			kind: RouteHBONE, addr: "10.0.8.2:15008", target: "10.0.4.3:8080", peer: "spiffe://cluster.local/ns/shop/sa/gw"},
		{name: "waypoint VIP identity is in the destination's trust domain: none there fails closed", src: client, dst: "10.0.4.4:80", err: ErrNoReadyEndpoint},
		{name: "a waypoint pod is not the waypoint of a destination in another trust domain", src: gw1, dst: "10.0.4.4:80", err: ErrNoReadyEndpoint},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := Resolve(snap, tt.src, ap(tt.dst), tt.pick)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("err %v, want %v", err, tt.err)
				}
				if r.Kind != RoutePassthrough || r.Addr.IsValid() || len(r.Peers) != 0 {
					t.Fatalf("failed resolution carries a route: %s %s %v", r.Kind, r.Addr, r.Peers)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.Kind != tt.kind || r.Addr != ap(tt.addr) || r.Target != ap(tt.target) {
				t.Fatalf("got %s %s target %s, want %s %s target %s", r.Kind, r.Addr, r.Target, tt.kind, tt.addr, tt.target)
			}
			if tt.peer != "" && (len(r.Peers) != 1 || r.Peers[0].String() != tt.peer) {
				t.Fatalf("peers %v, want %s", r.Peers, tt.peer)
			}
			if r.Kind != RouteHBONE && len(r.Peers) != 0 {
				t.Fatalf("plain route with peers %v", r.Peers)
			}
			if (r.Waypoint != nil) != (tt.workload == nil && tt.kind == RouteHBONE) {
				t.Fatalf("waypoint %v for workload %v", r.Waypoint, tt.workload)
			}
			if r.Workload != tt.workload || r.Service != tt.service {
				t.Fatalf("workload %v service %v", r.Workload, r.Service)
			}
		})
	}
}

func TestResolveBalancesOverReadyEndpoints(t *testing.T) {
	a := netip.MustParseAddr
	var ws []*model.Workload
	var eps []model.Endpoint
	for i, ip := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
		w := &model.Workload{UID: ip, Name: ip, Namespace: "ns", Addresses: []netip.Addr{a(ip)}, Enrolled: true, Ready: i != 2}
		ws = append(ws, w)
		eps = append(eps, model.Endpoint{WorkloadUID: w.UID})
	}
	svc := &model.Service{Name: "s", Namespace: "ns", Hostname: "s", VIPs: []netip.Addr{a("10.96.0.1")}, Ports: []model.ServicePort{{Port: 80}}, Endpoints: eps}
	snap := model.NewSnapshot(ws, []*model.Service{svc}, nil, nil)
	seen := map[netip.Addr]int{}
	for range 200 {
		r, err := Resolve(snap, nil, netip.MustParseAddrPort("10.96.0.1:80"), nil)
		if err != nil {
			t.Fatal(err)
		}
		seen[r.Target.Addr()]++
	}
	if len(seen) != 2 || seen[a("10.0.0.1")] == 0 || seen[a("10.0.0.2")] == 0 {
		t.Fatalf("distribution %v: want both ready endpoints and never the unready one", seen)
	}
}
