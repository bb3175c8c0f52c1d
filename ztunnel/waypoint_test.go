package ztunnel

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/model"
)

// TestServiceWaypoint: a service with a waypoint is tunnelled to the
// waypoint (authority = the service VIP, the waypoint's identity verified,
// the client's address and the service hostname forwarded), not to its
// endpoints. The waypoint here is an hbone.Server that forwards to the
// endpoint. Then the waypoint is addressed by its Service's VIP (as the
// deployer publishes it in a cluster), which nothing routes: the ztunnel
// tunnels to the Service's ready pod instead, and fails closed without one.
func TestServiceWaypoint(t *testing.T) {
	var m *testMesh
	var wpAddr netip.AddrPort  // the waypoint's listener; set before any traffic
	var wpVIP netip.Addr       // the waypoint Service's VIP; set before any traffic
	var dialledVIP atomic.Bool // an HBONE dial went to wpVIP
	m = newTestMesh(t, func(c *Config) {
		next := c.HBONEDialAddr
		c.HBONEDialAddr = func(a netip.AddrPort) netip.AddrPort {
			if a.Addr() == wpVIP {
				dialledVIP.Store(true)
			}
			if a.Addr() == wpAddr.Addr() {
				return wpAddr
			}
			return next(a)
		}
	})
	ip := m.net.ip
	wpVIP = ip(41)
	wpID := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/waypoint")

	var mu sync.Mutex // guards seen
	var seen []*hbone.Request
	srv := &hbone.Server{
		Certs: m.certs,
		LocalIdentity: func(dst netip.Addr) (spiffeid.ID, bool) {
			return wpID, dst == ip(40)
		},
		IsWaypointFor: func(local, target netip.Addr) bool { return local == ip(40) },
		Handler: hbone.HandlerFunc(func(ctx context.Context, r *hbone.Request) {
			mu.Lock()
			seen = append(seen, r)
			mu.Unlock()
			up, err := net.Dial("tcp", netip.AddrPortFrom(ip(21), 8080).String()) // "route" to server-a
			if err != nil {
				r.Reject(503)
				return
			}
			st, err := r.Accept()
			if err != nil {
				up.Close()
				return
			}
			hbone.Join(ctx, st, up)
		}),
	}
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip(40), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	wpAddr = addrPort(ln.Addr())
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	svc := *m.svc
	svc.Waypoint = &model.WaypointRef{Name: "waypoint", Namespace: "shop", Address: netip.AddrPortFrom(ip(40), model.PortHBONE)}
	m.store.Apply(&model.Delta{Services: []*model.Service{&svc}})

	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), m.vip.String())
	if err != nil {
		t.Fatal(err)
	}
	sum, err := exchange(c, 1<<20, 1<<20, 77)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "server result", func() bool { return len(m.srvA.all()) == 1 })
	if r := m.srvA.all()[0]; r.sum != sum {
		t.Fatal("hash mismatch through the waypoint")
	}
	mu.Lock()
	if len(seen) != 1 {
		t.Fatalf("waypoint saw %d tunnels", len(seen))
	}
	r := seen[0]
	if r.Target != m.vip || r.Peer != m.client.Identity() || r.Forwarded.For.Addr() != ip(11) ||
		r.Forwarded.Host != "server.shop.svc.cluster.local" || r.Baggage.Namespace != "shop" {
		t.Fatalf("waypoint request: target %s peer %s forwarded %+v baggage %+v", r.Target, r.Peer, r.Forwarded, r.Baggage)
	}
	if got := metricSum(t, m.n2.p, "istio_tcp_connections_opened_total", nil); got != 0 {
		t.Errorf("node2 saw %v connections: the waypoint must take them", got)
	}

	// The waypoint addressed by its Service VIP: tunnelled to its ready pod
	// (.40, shop/waypoint), whose identity is required; the authority is
	// still the service VIP.
	wpPod := &model.Workload{UID: "test/Pod/shop/waypoint-1", Name: "waypoint-1", Namespace: "shop", ServiceAccount: "waypoint",
		Node: "node2", Addresses: []netip.Addr{ip(40)}, Ready: true}
	wpDown := &model.Workload{UID: "test/Pod/shop/waypoint-0", Name: "waypoint-0", Namespace: "shop", ServiceAccount: "waypoint",
		Node: "node2", Addresses: []netip.Addr{ip(42)}, Ready: false}
	wpSvc := &model.Service{Name: "waypoint", Namespace: "shop", Hostname: "waypoint.shop.svc.cluster.local",
		VIPs: []netip.Addr{wpVIP}, Ports: []model.ServicePort{{Name: "mesh", Port: model.PortHBONE}},
		Endpoints: []model.Endpoint{{WorkloadUID: wpDown.UID}, {WorkloadUID: wpPod.UID}}}
	svcV := svc
	svcV.Waypoint = &model.WaypointRef{Name: "waypoint", Namespace: "shop", Address: netip.AddrPortFrom(wpVIP, model.PortHBONE)}
	m.store.Apply(&model.Delta{Workloads: []*model.Workload{wpPod, wpDown}, Services: []*model.Service{&svcV, wpSvc}})
	mu.Unlock()
	for i := range 3 {
		c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), m.vip.String())
		if err != nil {
			t.Fatal(err)
		}
		sum, err := exchange(c, 64<<10, 64<<10, uint64(100+i))
		if err != nil {
			t.Fatalf("through the waypoint VIP: %v", err)
		}
		waitFor(t, "server result", func() bool { return len(m.srvA.all()) == 2+i })
		if r := m.srvA.all()[1+i]; r.sum != sum {
			t.Fatal("hash mismatch through the waypoint VIP")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 4 {
		t.Fatalf("waypoint saw %d tunnels, want 4", len(seen))
	}
	for _, r := range seen[1:] {
		if r.Target != m.vip || r.Peer != m.client.Identity() || r.Forwarded.Host != "server.shop.svc.cluster.local" {
			t.Fatalf("waypoint request via VIP: target %s peer %s forwarded %+v", r.Target, r.Peer, r.Forwarded)
		}
	}
	if dialledVIP.Load() {
		t.Fatal("the ztunnel dialled the waypoint Service VIP")
	}

	// No ready pod behind the waypoint VIP: fail closed, never around it.
	wpPod2 := *wpPod
	wpPod2.Ready = false
	m.store.Apply(&model.Delta{Workloads: []*model.Workload{&wpPod2}})
	if c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), m.vip.String()); err == nil {
		c.Close()
		t.Fatal("connected around a waypoint without a ready pod")
	}
	if n := len(m.srvA.all()) + len(m.srvB.all()); n != 4 {
		t.Fatalf("servers saw %d connections, want 4", n)
	}

	// A waypoint without an address fails closed.
	svc2 := svc
	svc2.Waypoint = &model.WaypointRef{Name: "gone", Namespace: "shop"}
	m.store.Apply(&model.Delta{Services: []*model.Service{&svc2}})
	if c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), m.vip.String()); err == nil {
		c.Close()
		t.Fatal("connected around a missing waypoint")
	}
}
