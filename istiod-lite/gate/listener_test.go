package gate_test

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/istiod-lite/gate"
)

// The total cap holds across sources; a refused connection is closed at
// once and reported; closing an accepted one frees its place.
func TestListenerTotalCap(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var refused []string
	l := &gate.Listener{Listener: raw, PerSource: 10, Total: 2, Refused: func(src, reason string) {
		mu.Lock()
		defer mu.Unlock()
		refused = append(refused, src+": "+reason)
	}}
	defer l.Close()
	accepted := make(chan net.Conn, 10)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	dial := func(src string) net.Conn {
		t.Helper()
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		c, err := d.Dial("tcp", raw.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	next := func() net.Conn {
		t.Helper()
		select {
		case c := <-accepted:
			return c
		case <-time.After(5 * time.Second):
			t.Fatal("no connection accepted")
			return nil
		}
	}
	dial("127.0.0.1")
	first := next()
	dial("127.0.0.2")
	next()
	over := dial("127.0.0.3")
	_ = over.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ne net.Error
	if _, err := over.Read(make([]byte, 1)); err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("a third connection over a total of 2: %v, want it closed", err)
	}
	if _, total := l.Open(netip.MustParseAddr("127.0.0.1")); total != 2 {
		t.Fatalf("open: %d, want 2", total)
	}
	first.Close()
	first.Close() // idempotent: frees one place, not two
	dial("127.0.0.3")
	next()
	mu.Lock()
	defer mu.Unlock()
	if len(refused) != 1 || refused[0] != "127.0.0.3: too many connections" {
		t.Fatalf("refused: %q", refused)
	}
	if n, total := l.Open(netip.MustParseAddr("127.0.0.1")); n != 0 || total != 2 {
		t.Fatalf("open after close: %d from 127.0.0.1, %d in all", n, total)
	}
}
