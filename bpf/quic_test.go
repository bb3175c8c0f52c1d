package bpf

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/ipv4"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// udpSocket opens a UDP socket in ns bound to addr (IP_TRANSPARENT when
// transparent), reporting each datagram's destination address.
func udpSocket(t *testing.T, ns *netns.NS, addr string, transparent bool) *ipv4.PacketConn {
	t.Helper()
	var pc net.PacketConn
	err := ns.Do(func() error {
		lc := net.ListenConfig{}
		if transparent {
			lc.Control = Transparent
		}
		var err error
		pc, err = lc.ListenPacket(t.Context(), "udp4", addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	p := ipv4.NewPacketConn(pc)
	if err := p.SetControlMessage(ipv4.FlagDst, true); err != nil {
		t.Fatal(err)
	}
	return p
}

// recv returns the next datagram's payload, source and destination, or
// ok false after timeout.
func recv(p *ipv4.PacketConn, timeout time.Duration) (msg string, src netip.AddrPort, dst netip.Addr, ok bool) {
	p.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 1500)
	n, cm, from, err := p.ReadFrom(buf)
	if err != nil {
		return "", netip.AddrPort{}, netip.Addr{}, false
	}
	if cm != nil {
		dst, _ = netip.AddrFromSlice(cm.Dst.To4())
	}
	return string(buf[:n]), from.(*net.UDPAddr).AddrPort(), dst, true
}

// TestUDPHBONEToZtunnel: UDP from another node to an enrolled pod's port
// 15008 (HBONE over QUIC) goes to the node's ztunnel UDP socket on 15008,
// which sees the pod's address as destination and answers from it; the pod's
// own socket on that port gets nothing. Other UDP to the pod, and UDP 15008
// to a pod that is not enrolled, are not captured.
func TestUDPHBONEToZtunnel(t *testing.T) {
	e := newEnv(t, "b1")
	n1, n2 := e.topo.Node("n1"), e.topo.Node("n2")
	b1, b2 := e.pod("b1"), e.pod("b2")

	zt := udpSocket(t, n2.NS, ":15008", true)
	b1Own := udpSocket(t, b1.NS, ":15008", false)
	b1Other := udpSocket(t, b1.NS, ":9999", false)
	b2Own := udpSocket(t, b2.NS, ":15008", false)
	client := udpSocket(t, n1.NS, ":0", false)

	send := func(to netip.Addr, port uint16, msg string) {
		t.Helper()
		if _, err := client.WriteTo([]byte(msg), nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(to, port))); err != nil {
			t.Fatal(err)
		}
	}
	// The first datagrams may find no neighbour entry yet: resend until one crosses.
	var msg string
	var src netip.AddrPort
	var dst netip.Addr
	var ok bool
	for i := 0; i < 20 && !ok; i++ {
		send(b1.IP, 15008, "hbone-quic")
		msg, src, dst, ok = recv(zt, 200*time.Millisecond)
	}
	if !ok || msg != "hbone-quic" {
		t.Fatalf("ztunnel's UDP socket got %q (ok %v), want the datagram to b1:15008", msg, ok)
	}
	if dst != b1.IP {
		t.Errorf("ztunnel saw destination %v, want b1's %v", dst, b1.IP)
	}
	if m, _, _, got := recv(b1Own, 300*time.Millisecond); got {
		t.Errorf("b1's own socket on 15008 got %q: not captured", m)
	}
	// The answer leaves from the pod's address (IP_TRANSPARENT, packet info).
	cm := &ipv4.ControlMessage{Src: b1.IP.AsSlice()}
	if _, err := zt.WriteTo([]byte("answer"), cm, net.UDPAddrFromAddrPort(src)); err != nil {
		t.Fatal(err)
	}
	if m, from, _, got := recv(client, 2*time.Second); !got || m != "answer" || from != netip.AddrPortFrom(b1.IP, 15008) {
		t.Errorf("client got %q from %v (ok %v), want \"answer\" from %v:15008", m, from, got, b1.IP)
	}

	// Not port 15008: the pod's own.
	send(b1.IP, 9999, "plain udp")
	if m, _, _, got := recv(b1Other, 2*time.Second); !got || m != "plain udp" {
		t.Errorf("b1:9999 got %q (ok %v), want the datagram", m, got)
	}
	// Not enrolled: the pod's own.
	ok = false
	for i := 0; i < 10 && !ok; i++ {
		send(b2.IP, 15008, "not enrolled")
		msg, _, _, ok = recv(b2Own, 200*time.Millisecond)
	}
	if !ok || msg != "not enrolled" {
		t.Errorf("b2:15008 got %q (ok %v), want the datagram", msg, ok)
	}
	if m, _, _, got := recv(zt, 100*time.Millisecond); got {
		t.Errorf("ztunnel got %q meant for a pod that is not enrolled", m)
	}
}

// TestUDPHBONEWithoutZtunnelSocket: without ztunnel's UDP socket, UDP to an
// enrolled pod's port 15008 is dropped (fail closed), not delivered to the
// pod.
func TestUDPHBONEWithoutZtunnelSocket(t *testing.T) {
	e := newEnv(t, "b1")
	n1, b1 := e.topo.Node("n1"), e.pod("b1")
	b1Own := udpSocket(t, b1.NS, ":15008", false)
	b1Other := udpSocket(t, b1.NS, ":9999", false)
	client := udpSocket(t, n1.NS, ":0", false)
	// Wait until the path works at all (UDP to another port of b1).
	ok := false
	for i := 0; i < 20 && !ok; i++ {
		client.WriteTo([]byte("x"), nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(b1.IP, 9999)))
		_, _, _, ok = recv(b1Other, 200*time.Millisecond)
	}
	if !ok {
		t.Fatal("no UDP reaches b1 at all")
	}
	for range 5 {
		client.WriteTo([]byte("hbone-quic"), nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(b1.IP, 15008)))
	}
	if m, _, _, got := recv(b1Own, 500*time.Millisecond); got {
		t.Errorf("b1's own socket on 15008 got %q without ztunnel", m)
	}
}

// TestUDPHBONENotFromUplinkIsDropped: UDP to an enrolled pod's port 15008
// reaches ztunnel only from another node's IPv4 uplink (udp_to_hbone). What
// comes another way reaches no enrolled pod: from a pod or a process of the
// same node, and over IPv6 from anywhere. Other UDP ports still pass (the
// controls, sent on the same paths).
func TestUDPHBONENotFromUplinkIsDropped(t *testing.T) {
	e := newEnv(t, "a1")
	n1, a1, a2, b2 := e.topo.Node("n1"), e.pod("a1"), e.pod("a2"), e.pod("b2")
	a1Own := udpSocket(t, a1.NS, ":15008", false)
	a1Other := udpSocket(t, a1.NS, ":9999", false)
	fromPod := udpSocket(t, a2.NS, ":0", false)
	fromHost := udpSocket(t, n1.NS, ":0", false)

	for _, c := range []struct {
		name string
		from *ipv4.PacketConn
	}{{"pod a2 of the same node", fromPod}, {"a process of the node", fromHost}} {
		// The control first: it proves the path works (and fills the
		// neighbour cache).
		ok := false
		for i := 0; i < 20 && !ok; i++ {
			c.from.WriteTo([]byte("control"), nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(a1.IP, 9999)))
			_, _, _, ok = recv(a1Other, 200*time.Millisecond)
		}
		if !ok {
			t.Fatalf("%s: no UDP reaches a1:9999; the test proves nothing", c.name)
		}
		for range 5 {
			c.from.WriteTo([]byte("hbone-quic"), nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(a1.IP, 15008)))
		}
		if m, _, _, got := recv(a1Own, 500*time.Millisecond); got {
			t.Errorf("%s: enrolled a1's own socket on 15008 got %q", c.name, m)
		}
	}

	// IPv6, from another node.
	addr6 := setupIPv6(t, e, a1, b2)
	listen6 := func(port int) net.PacketConn {
		var pc net.PacketConn
		if err := a1.NS.Do(func() (err error) {
			pc, err = net.ListenPacket("udp6", fmt.Sprintf("[%s]:%d", addr6[a1], port))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		return pc
	}
	own6, other6 := listen6(15008), listen6(9999)
	var from6 net.PacketConn
	if err := b2.NS.Do(func() (err error) {
		from6, err = net.ListenPacket("udp6", fmt.Sprintf("[%s]:0", addr6[b2]))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer from6.Close()
	got6 := func(pc net.PacketConn, wait time.Duration) bool {
		pc.SetReadDeadline(time.Now().Add(wait))
		_, _, err := pc.ReadFrom(make([]byte, 64))
		return err == nil
	}
	ok := false
	for i := 0; i < 20 && !ok; i++ {
		from6.WriteTo([]byte("control"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr6[a1], 9999)))
		ok = got6(other6, 200*time.Millisecond)
	}
	if !ok {
		t.Fatal("IPv6: no UDP reaches a1:9999; the test proves nothing")
	}
	for range 5 {
		from6.WriteTo([]byte("hbone-quic"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr6[a1], 15008)))
	}
	if got6(own6, 500*time.Millisecond) {
		t.Error("IPv6: enrolled a1's own socket on 15008 got a datagram")
	}
}
