package ztunnel

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
	"github.com/ambit-mesh/ambit/model"
)

// TestWaypointQUIC: a service's waypoint whose pod advertises QUIC (on
// another node) is tunnelled to over HTTP/3, through the same dialer choice
// as any destination; once it no longer advertises it, over HTTP/2. The
// waypoint here serves both (h3.Server on UDP, hbone.Server on TCP, the
// same port) and forwards to the endpoint.
func TestWaypointQUIC(t *testing.T) {
	var wpAddr netip.AddrPort // the waypoint's listeners; set before any traffic
	m := newTestMesh(t, func(c *Config) {
		c.QUIC = true
		next := c.HBONEDialAddr
		c.HBONEDialAddr = func(a netip.AddrPort) netip.AddrPort {
			if a.Addr() == wpAddr.Addr() {
				return wpAddr
			}
			return next(a)
		}
	})
	ip := m.net.ip
	wpID := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/waypoint")

	var mu sync.Mutex // guards seen
	var seen []string // the transport of each tunnel the waypoint accepted
	handler := hbone.HandlerFunc(func(ctx context.Context, r *hbone.Request) {
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
		mu.Lock()
		seen = append(seen, st.Transport())
		mu.Unlock()
		hbone.Join(ctx, st, up)
	})
	localID := func(dst netip.Addr) (spiffeid.ID, bool) { return wpID, dst == ip(40) }
	waypointFor := func(local, target netip.Addr) bool { return local == ip(40) }
	srv2 := &hbone.Server{Certs: m.certs, LocalIdentity: localID, IsWaypointFor: waypointFor, Handler: handler}
	srv3 := &h3.Server{Certs: m.certs, LocalIdentity: localID, IsWaypointFor: waypointFor, Handler: handler}
	var ln net.Listener
	var pc net.PacketConn
	for try := 0; pc == nil && try < 16; try++ { // the TCP port free for UDP too
		var err error
		if ln, err = net.Listen("tcp", netip.AddrPortFrom(ip(40), 0).String()); err != nil {
			t.Fatal(err)
		}
		if pc, err = net.ListenPacket("udp", ln.Addr().String()); err != nil {
			ln.Close()
		}
	}
	if pc == nil {
		t.Fatal("no port free for both TCP and UDP")
	}
	wpAddr = addrPort(ln.Addr())
	go srv2.Serve(ln)
	go srv3.Serve(pc)
	t.Cleanup(func() { srv2.Close(); srv3.Close() })

	wp := &model.Workload{UID: "test/Pod/shop/waypoint-0", Name: "waypoint-0", Namespace: "shop", ServiceAccount: "waypoint",
		Node: "node2", Addresses: []netip.Addr{ip(40)}, Ready: true, QUIC: true}
	svc := *m.svc
	svc.Waypoint = &model.WaypointRef{Name: "waypoint", Namespace: "shop", Address: netip.AddrPortFrom(ip(40), model.PortHBONE)}
	m.store.Apply(&model.Delta{Workloads: []*model.Workload{wp}, Services: []*model.Service{&svc}})

	through := func(seed uint64) {
		t.Helper()
		c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), m.vip.String())
		if err != nil {
			t.Fatal(err)
		}
		sum, err := exchange(c, 1<<20, 1<<20, seed)
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "server result", func() bool { return len(m.srvA.all()) == int(seed) })
		if r := m.srvA.all()[seed-1]; r.sum != sum {
			t.Fatal("hash mismatch through the waypoint")
		}
	}
	through(1)
	qd := m.n1.p.dialer.(*h3.Fallback)
	if qd.H3.Conns() != 1 || qd.H2.Conns() != 0 {
		t.Errorf("to a waypoint advertising QUIC: h3 connections %d, h2 %d; want 1, 0", qd.H3.Conns(), qd.H2.Conns())
	}

	// The waypoint's pod no longer advertises QUIC: HTTP/2.
	wpOff := *wp
	wpOff.QUIC = false
	m.store.Apply(&model.Delta{Workloads: []*model.Workload{&wpOff}})
	through(2)
	if qd.H2.Conns() != 1 {
		t.Errorf("to a waypoint not advertising QUIC: h2 connections %d, want 1", qd.H2.Conns())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || seen[0] != hbone.TransportH3 || seen[1] != hbone.TransportH2 {
		t.Errorf("the waypoint saw tunnels over %v, want [h3 h2]", seen)
	}
	if n := metricSum(t, m.n2.p, "istio_tcp_connections_opened_total", nil); n != 0 {
		t.Errorf("node2 saw %v connections: the waypoint must take them", n)
	}
}
