package hbone

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"
)

// idleConns opens n TCP connections to addr from source IP src (a
// loopback alias) that never send a byte, closed at the end of the test.
func idleConns(t *testing.T, addr, src string, n int) []net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for range n {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("idle connection %d from %s: %v", len(conns), src, err)
		}
		conns = append(conns, c)
	}
	return conns
}

// echoOnce dials through the server and checks one echo round trip.
func echoOnce(t *testing.T, e *env, d *Dialer, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	s, err := d.Dial(ctx, e.request())
	if err != nil {
		t.Fatalf("legitimate dial after the flood: %v", err)
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(timeout))
	if _, err := s.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "ping" {
		t.Fatalf("echo after the flood: %q, %v", got, err)
	}
	return time.Since(start)
}

// waitLong polls cond until it holds or d passes.
func waitLong(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func openFDs() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	return len(ents)
}

// TestPendingHandshakeFlood: idle connections that never start their TLS
// handshake, from several sources and from the legitimate client's own
// source, beyond the bounds, do not keep a legitimate mTLS client out, and
// the server's goroutines and descriptors for them stay bounded.
func TestPendingHandshakeFlood(t *testing.T) {
	checkGoroutines(t)
	const max, perSource = 64, 16
	e := newEnv(t, echo, func(s *Server) {
		s.MaxPendingHandshakes = max
		s.MaxPendingHandshakesPerSource = perSource
	})
	d := e.dialer()
	echoOnce(t, e, d, 5*time.Second) // warm the certificates
	d.Close()
	goroutines, fds := runtime.NumGoroutine(), openFDs()

	const perAttacker, attackers = 100, 8
	for i := range attackers {
		idleConns(t, e.addr.String(), "127.0.0."+string(rune('2'+i)), perAttacker)
	}
	// The legitimate client's own source floods too: its newest connection
	// must still get in.
	idleConns(t, e.addr.String(), "127.0.0.1", perAttacker)
	const total = (attackers + 1) * perAttacker
	waitLong(t, 10*time.Second, "the server to accept the flood", func() bool {
		p, shed := pendingOf(e.server).counts()
		return p+shed == total
	})
	p, shed := pendingOf(e.server).counts()
	if p > max {
		t.Errorf("%d pending handshakes, bound %d", p, max)
	}
	for src, n := range pendingOf(e.server).sourceCounts() {
		if n > perSource {
			t.Errorf("%d pending handshakes from %s, bound %d", n, src, perSource)
		}
	}
	// The shed ones' goroutines end: the server holds at most max.
	waitLong(t, 10*time.Second, "shed handshakes to end", func() bool {
		return runtime.NumGoroutine() <= goroutines+max+8
	})
	// The client's idle sockets are in this process too: total of them,
	// plus at most max server-side ones.
	if n := openFDs() - fds; n > total+max+8 {
		t.Errorf("%d more descriptors open, want at most %d (%d client sockets, %d pending)", n, total+max+8, total, max)
	}
	d = e.dialer()
	took := echoOnce(t, e, d, 5*time.Second)
	t.Logf("%d idle connections: %d pending, %d shed; legitimate CONNECT took %v", total, p, shed, took)
	if took > 2*time.Second {
		t.Errorf("legitimate CONNECT took %v", took)
	}
}

// TestHandshakeTimeoutUnderLoad: once more than half of the pending budget
// is in use, pending connections get the short deadline.
func TestHandshakeTimeoutUnderLoad(t *testing.T) {
	checkGoroutines(t)
	const short = 300 * time.Millisecond
	e := newEnv(t, echo, func(s *Server) {
		s.MaxPendingHandshakes = 8
		s.HandshakeTimeoutUnderLoad = short
	})
	// Four (half) keep the long deadline; the fifth puts all on the short one.
	start := time.Now()
	conns := idleConns(t, e.addr.String(), "127.0.0.2", 4)
	waitLong(t, 5*time.Second, "the server to accept", func() bool { p, _ := pendingOf(e.server).counts(); return p == 4 })
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(short))
		if _, err := c.Read(make([]byte, 1)); !isTimeout(err) {
			t.Fatalf("closed under half the budget (%v): want the long deadline", err)
		}
	}
	conns = append(conns, idleConns(t, e.addr.String(), "127.0.0.3", 1)...)
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Fatalf("connection %d not closed under load: %v", i, err)
		}
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("closed after %v, want about %v after the load began", el, short)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// pendingOf returns the server's pending set, once Serve made it (an
// empty one before).
func pendingOf(s *Server) *pendingSet {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending == nil {
		return &pendingSet{}
	}
	return s.pending
}

// TestPendingSetBounds: with a bound of one per source, each new
// connection sheds its source's previous one, and the counts stay exact.
func TestPendingSetBounds(t *testing.T) {
	p := &pendingSet{max: 3, perSource: 1, timeout: time.Minute, loaded: time.Minute}
	src := [2]netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")}
	var pcs []*pendingConn
	var closed []net.Conn
	for i := range 6 {
		a, b := net.Pipe()
		closed = append(closed, b)
		pcs = append(pcs, p.add(a, src[i%2]))
		if n, _ := p.counts(); n > 2 {
			t.Fatalf("%d pending from 2 sources with one each", n)
		}
		if n := p.sourceCounts()[src[i%2]]; n != 1 {
			t.Fatalf("source %s: its newest connection is not tracked", src[i%2])
		}
	}
	for _, pc := range pcs {
		p.remove(pc)
	}
	if n, shed := p.counts(); n != 0 || shed != 4 || len(p.bySource) != 0 || p.long != 0 {
		t.Fatalf("after removing all: %d pending, %d shed, %d sources, %d long", n, shed, len(p.bySource), p.long)
	}
	// The shed ones were closed: their peers read EOF.
	for i, c := range closed[:4] {
		c.SetReadDeadline(time.Now().Add(time.Second))
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("shed connection %d: %v, want closed", i, err)
		}
	}
	for _, c := range closed {
		c.Close()
	}
}
