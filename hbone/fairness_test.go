package hbone

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestPendingShedsHeaviestSource: a few slow handshakes from one source
// survive a flood from another source past the total bound (only the total
// bound is in play here): the flood sheds its own oldest, not the light
// source's, which are older. Before the fix the oldest of all went first.
func TestPendingShedsHeaviestSource(t *testing.T) {
	checkGoroutines(t)
	const max = 32
	e := newEnv(t, echo, func(s *Server) {
		s.MaxPendingHandshakes = max
		s.MaxPendingHandshakesPerSource = 10 * max
		s.HandshakeTimeout = time.Minute
		s.HandshakeTimeoutUnderLoad = time.Minute
	})
	victims := idleConns(t, e.addr.String(), "127.0.0.1", 4)
	waitLong(t, 5*time.Second, "the victim's connections to be pending", func() bool {
		p, _ := pendingOf(e.server).counts()
		return p == len(victims)
	})
	const flood = 300
	idleConns(t, e.addr.String(), "127.0.0.2", flood)
	waitLong(t, 10*time.Second, "the server to accept the flood", func() bool {
		p, shed := pendingOf(e.server).counts()
		return p+shed == flood+len(victims)
	})
	counts := pendingOf(e.server).sourceCounts()
	t.Logf("after %d idle connections from 127.0.0.2: pending by source %v", flood, counts)
	if got := counts[netip.MustParseAddr("127.0.0.1")]; got != len(victims) {
		t.Errorf("the light source has %d pending handshakes, want all its %d", got, len(victims))
	}
	for i, c := range victims {
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); !isTimeout(err) {
			t.Errorf("victim connection %d was closed (%v): the flood shed another source's handshake", i, err)
		}
	}
	d := e.dialer()
	echoOnce(t, e, d, 5*time.Second) // a legitimate client still gets in
}

// TestPendingSetFairness: past the total bound the heaviest source loses
// its oldest; of equally heavy sources the one with the oldest connection;
// IPv6 sources count by /64.
func TestPendingSetFairness(t *testing.T) {
	p := &pendingSet{max: 6, perSource: 100, timeout: time.Minute, loaded: time.Minute}
	a, b := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	v6a, v6b := netip.MustParseAddr("2001:db8:1:2::1"), netip.MustParseAddr("2001:db8:1:2:ffff::9")
	other64 := netip.MustParseAddr("2001:db8:1:3::1")
	type entry struct {
		pc   *pendingConn
		peer net.Conn
	}
	var all []entry
	add := func(src netip.Addr) entry {
		x, y := net.Pipe()
		t.Cleanup(func() { x.Close(); y.Close() })
		e := entry{p.add(x, src), y}
		all = append(all, e)
		return e
	}
	closed := func(e entry) bool {
		e.peer.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		_, err := e.peer.Read(make([]byte, 1))
		return err == io.EOF
	}

	first := add(a) // the oldest of all
	add(b)
	add(other64)
	for range 3 {
		add(v6a) // one /64: 3 from it
	}
	if n, _ := p.counts(); n != 6 {
		t.Fatalf("%d pending, want 6", n)
	}
	if got := p.sourceCounts()[sourceKey(v6b)]; got != 3 {
		t.Fatalf("2001:db8:1:2::/64 has %d pending, want 3 (addresses of one /64 are one source)", got)
	}
	// Over the bound: the /64 is the heaviest, and sheds its oldest, not
	// the oldest of all.
	add(v6b)
	if closed(first) {
		t.Fatal("the oldest connection of a light source was shed")
	}
	if !closed(all[3]) {
		t.Fatal("the heaviest source's oldest connection is still open")
	}
	if got := p.sourceCounts(); got[sourceKey(v6a)] != 3 || got[a] != 1 || got[b] != 1 || got[sourceKey(other64)] != 1 {
		t.Fatalf("pending by source: %v", got)
	}
	add(b) // b: 2, the /64: 3 -> the /64 sheds
	add(b) // b: 3, the /64: 2 -> b sheds
	if got := p.sourceCounts(); got[sourceKey(v6a)] != 2 || got[b] != 2 {
		t.Fatalf("pending by source after b grew: %v", got)
	}
	for _, e := range all {
		p.remove(e.pc)
	}
	if n, shed := p.counts(); n != 0 || shed != 3 || len(p.bySource) != 0 || p.heaviest.Len() != 0 || p.long != 0 {
		t.Fatalf("after removing all: %d pending, %d shed, %d sources, heap %d, %d long", n, shed, len(p.bySource), p.heaviest.Len(), p.long)
	}
}

func TestSourceKey(t *testing.T) {
	for in, want := range map[string]string{
		"10.1.2.3":             "10.1.2.3",
		"::ffff:10.1.2.3":      "10.1.2.3",
		"2001:db8:a:b:c:d:e:f": "2001:db8:a:b::",
		"fe80::1%eth0":         "fe80::",
		"2001:db8:a:b:0:2:3:4": "2001:db8:a:b::",
	} {
		if got := sourceKey(netip.MustParseAddr(in)); got != netip.MustParseAddr(want) {
			t.Errorf("sourceKey(%s) = %s, want %s", in, got, want)
		}
	}
}
