package delayline

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/integration/netns"
)

func topology(t *testing.T) *netns.Topology {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces")
	}
	topo, err := netns.Build(netns.Config{
		Prefix: fmt.Sprintf("dlt%d", os.Getpid()),
		Nodes:  []netns.NodeConfig{{Name: "n1"}, {Name: "n2"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	return topo
}

// udpPair opens a UDP socket in n2 on port and one in n1 to it.
func udpPair(t *testing.T, topo *netns.Topology, port int) (n1, n2 net.PacketConn, to net.Addr) {
	t.Helper()
	open := func(ns *netns.NS, addr string) net.PacketConn {
		var pc net.PacketConn
		if err := ns.Do(func() error {
			var err error
			pc, err = net.ListenPacket("udp4", addr)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		return pc
	}
	n2 = open(topo.Node("n2").NS, fmt.Sprintf(":%d", port))
	n1 = open(topo.Node("n1").NS, ":0")
	return n1, n2, net.UDPAddrFromAddrPort(netip.AddrPortFrom(topo.Node("n2").IP, uint16(port)))
}

// rtt sends a datagram n1 -> n2, echoes it back, and returns the round trip.
func rtt(t *testing.T, n1, n2 net.PacketConn, to net.Addr) time.Duration {
	t.Helper()
	buf := make([]byte, 64)
	for range 20 { // the first may wait for ARP
		start := time.Now()
		n1.WriteTo([]byte("ping"), to)
		n2.SetReadDeadline(time.Now().Add(time.Second))
		_, from, err := n2.ReadFrom(buf)
		if err != nil {
			continue
		}
		n2.WriteTo([]byte("pong"), from)
		n1.SetReadDeadline(time.Now().Add(time.Second))
		if _, _, err := n1.ReadFrom(buf); err != nil {
			continue
		}
		if d := time.Since(start); d < 500*time.Millisecond {
			return d
		}
	}
	t.Fatal("no round trip")
	return 0
}

// TestDelayLossDrop: the line adds its delay each way, loses about Loss of
// the frames, drops what Drop matches, and Close restores the direct path.
func TestDelayLossDrop(t *testing.T) {
	topo := topology(t)
	n1, n2, to := udpPair(t, topo, 9000)
	direct := rtt(t, n1, n2, to)

	l, err := Insert(topo, topo.Node("n2"), Config{Delay: 10 * time.Millisecond}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if d := rtt(t, n1, n2, to); d < 20*time.Millisecond || d > 200*time.Millisecond {
		t.Errorf("round trip through a 10ms line: %v (direct %v), want 20ms and a bit", d, direct)
	}
	// TCP crosses too (segments, not super-frames: offloads are off).
	ln, err := topo.Node("n2").NS.Listen(t.Context(), nil, "tcp4", ":9001")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			buf := make([]byte, 1<<20)
			for {
				if _, err := c.Read(buf); err != nil {
					break
				}
			}
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := topo.Node("n1").NS.Dial(ctx, nil, "tcp4", netip.AddrPortFrom(topo.Node("n2").IP, 9001).String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(make([]byte, 4<<20)); err != nil {
		t.Errorf("4 MiB over TCP through the line: %v", err)
	}
	c.Close()

	// Loss: 20% of 2000 datagrams, one way (no delay, to be quick).
	l.Set(Config{Loss: 0.2})
	before := l.Stats()
	got := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64)
		for {
			n2.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			if _, _, err := n2.ReadFrom(buf); err != nil {
				return
			}
			got++
		}
	}()
	for i := range 2000 {
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(i))
		n1.WriteTo(b[:], to)
		if i%50 == 0 {
			time.Sleep(time.Millisecond) // stay under the socket buffers
		}
	}
	<-done
	// The line's own decisions: on a loaded machine datagrams are also lost
	// before it (socket buffers, the packet ring), which says nothing about
	// Loss. Of the frames it saw, about 20% are lost (±5 sigma), and no
	// more crossed than it let through.
	after := l.Stats()
	fwd, lost := after.Forwarded-before.Forwarded, after.Lost-before.Lost
	if seen := fwd + lost; seen < 1000 || float64(lost)/float64(seen) < 0.15 || float64(lost)/float64(seen) > 0.25 {
		t.Errorf("the line lost %d of the %d frames it saw, want about 20%% (stats %+v)", lost, seen, after)
	}
	if got == 0 || uint64(got) > fwd {
		t.Errorf("%d datagrams crossed, the line forwarded %d", got, fwd)
	}

	// Drop: UDP to port 9000 (IPv4 without options: the port at byte 36).
	l.Set(Config{Drop: func(f []byte) bool {
		return len(f) > 37 && f[23] == 17 && binary.BigEndian.Uint16(f[36:]) == 9000
	}})
	n1.WriteTo([]byte("dropped"), to)
	n2.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, _, err := n2.ReadFrom(make([]byte, 64)); err == nil {
		t.Error("a datagram that Drop matches crossed")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if d := rtt(t, n1, n2, to); d > 10*time.Millisecond {
		t.Errorf("round trip after Close: %v, want the direct path's (%v)", d, direct)
	}
}
