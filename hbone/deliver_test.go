package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// TestDeliverTo: a stream delivered into a socket whose reader stops
// reading. The read loop writes what the socket takes and buffers the
// rest (it never blocks: another stream of the connection still echoes),
// DeliverTo writes the buffer out once the reader reads again, and every
// byte arrives, in order, more than a connection window's worth (so the
// windows were credited for what the read loop wrote), counted once.
func TestDeliverTo(t *testing.T) {
	checkGoroutines(t)
	d, e, cli, st, dst, reader := heldDelivery(t)

	const total = connWindow + 5<<20 + 77
	data := make([]byte, total)
	rand.Read(data)
	type result struct {
		n   int64
		err error
	}
	delivered := make(chan result, 1)
	var hooked atomic.Int64
	go func() {
		n, err := st.DeliverTo(dst, func(n int64) { hooked.Add(n) })
		delivered <- result{n, err}
	}()
	go func() {
		// Uneven writes: frames of many sizes.
		rest := data
		for i := 1; len(rest) > 0; i++ {
			n := min(len(rest), i*7919%(1<<20)+1)
			if _, err := cli.Write(rest[:n]); err != nil {
				return
			}
			rest = rest[n:]
		}
		cli.CloseWrite()
	}()

	// Megabytes buffered: the socket is full and DeliverTo blocked in its
	// write (it drains a few frames' worth at once otherwise).
	waitFor(t, "the socket to fill and the stream to buffer", func() bool { return bufferedOn(st) > 2<<20 })
	echoOnce(t, e, d, 5*time.Second) // the read loop still reads

	got := sha256.New()
	n, err := io.Copy(got, io.LimitReader(reader, total))
	if err != nil || n != total {
		t.Fatalf("read %d bytes, %v; want %d", n, err, total)
	}
	if want := sha256.Sum256(data); !bytes.Equal(got.Sum(nil), want[:]) {
		t.Fatal("delivered bytes differ from those sent")
	}
	select {
	case r := <-delivered:
		if r.err != nil || r.n != total {
			t.Fatalf("DeliverTo: %d, %v; want %d, nil", r.n, r.err, total)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("DeliverTo did not return at the stream's end")
	}
	if n := hooked.Load(); n != total {
		t.Fatalf("onBytes counted %d bytes, want %d", n, total)
	}
}

// heldDelivery serves streams whose first is held for the test (the others
// are dialled as usual), dials that first one (cli, its client side; st,
// its server side) and makes a TCP pair for a delivery (dst, written to;
// reader, its other end). All are closed when the test ends.
func heldDelivery(t *testing.T) (d *Dialer, e *env, cli, st *Stream, dst, reader net.Conn) {
	t.Helper()
	h := newHeldStreams(t)
	var first atomic.Bool
	e = newEnv(t, echo, func(s *Server) {
		s.Handler = HandlerFunc(func(ctx context.Context, r *Request) {
			if first.CompareAndSwap(false, true) {
				h.ServeHBONE(ctx, r)
				return
			}
			dialHandler(ctx, r)
		})
	})
	d = e.dialer()
	cli, err := d.Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	st = h.next(t)
	dst, reader = tcpPair(t)
	t.Cleanup(func() { dst.Close(); reader.Close() })
	return d, e, cli, st, dst, reader
}
