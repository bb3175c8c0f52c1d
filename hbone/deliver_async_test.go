package hbone

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// deliveryGoroutines counts the goroutines of asynchronous deliveries.
func deliveryGoroutines() int {
	buf := make([]byte, 1<<20)
	n := runtime.Stack(buf, true)
	return strings.Count(string(buf[:n]), "hbone.(*Stream).deliverSome(")
}

// TestDeliverAsync: as TestDeliverTo, with DeliverAsync. While the
// destination takes what arrives at once, no goroutine delivers (the read
// loop writes); once it stops reading, a goroutine writes the buffer out,
// and leaves when the buffer is empty; done reports every byte, once, at
// the stream's end.
func TestDeliverAsync(t *testing.T) {
	checkGoroutines(t)
	d, e, cli, st, dst, reader := heldDelivery(t)

	type result struct {
		n   int64
		err error
	}
	delivered := make(chan result, 1)
	var hooked atomic.Int64
	if !st.DeliverAsync(dst, func(n int64) { hooked.Add(n) }, func(n int64, err error) { delivered <- result{n, err} }) {
		t.Fatal("DeliverAsync refused a socket")
	}
	if st.DeliverAsync(dst, nil, func(int64, error) {}) {
		t.Fatal("a second DeliverAsync on the same stream started")
	}

	// Small messages: the read loop writes them, no goroutine runs.
	small := []byte("hello")
	for range 3 {
		if _, err := cli.Write(small); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(small))
		if _, err := io.ReadFull(reader, got); err != nil || !bytes.Equal(got, small) {
			t.Fatalf("read %q, %v", got, err)
		}
	}
	if n := deliveryGoroutines(); n != 0 {
		t.Fatalf("%d delivery goroutines while the destination takes every frame", n)
	}

	const total = connWindow + 5<<20 + 77
	data := make([]byte, total)
	rand.Read(data)
	go func() {
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
	waitFor(t, "the socket to fill and the stream to buffer", func() bool { return bufferedOn(st) > 2<<20 })
	if n := deliveryGoroutines(); n != 1 {
		t.Fatalf("%d delivery goroutines with the destination full, want 1", n)
	}
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
		if want := int64(total + 3*len(small)); r.err != nil || r.n != want {
			t.Fatalf("done: %d, %v; want %d, nil", r.n, r.err, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("done was not called at the stream's end")
	}
	if n, want := hooked.Load(), int64(total+3*len(small)); n != want {
		t.Fatalf("onBytes counted %d bytes, want %d", n, want)
	}
	waitFor(t, "the delivery goroutine to leave", func() bool { return deliveryGoroutines() == 0 })
}

// TestDeliverAsyncDeadline: an idle delivery ends with the stream's read
// deadline (os.ErrDeadlineExceeded), and can start again; a Close ends it
// with net.ErrClosed.
func TestDeliverAsyncDeadline(t *testing.T) {
	checkGoroutines(t)
	h := newHeldStreams(t)
	e := newEnv(t, echo, func(s *Server) { s.Handler = h })
	cli, err := e.dialer().Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	st := h.next(t)
	dst, reader := tcpPair(t)
	defer dst.Close()
	defer reader.Close()

	done := make(chan error, 1)
	start := func() {
		t.Helper()
		if !st.DeliverAsync(dst, nil, func(_ int64, err error) { done <- err }) {
			t.Fatal("DeliverAsync did not start")
		}
	}
	wait := func(what string) error {
		t.Helper()
		select {
		case err := <-done:
			return err
		case <-time.After(5 * time.Second):
			t.Fatalf("done not called after %s", what)
			return nil
		}
	}
	start()
	st.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if err := wait("the deadline"); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("done: %v, want the deadline", err)
	}
	st.SetReadDeadline(time.Time{})
	start()
	if _, err := cli.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	one := make([]byte, 1)
	if _, err := io.ReadFull(reader, one); err != nil || one[0] != 'x' {
		t.Fatalf("read %q, %v after restarting", one, err)
	}
	st.Close()
	if err := wait("Close"); err == nil {
		t.Fatal("done: nil after Close, want an error")
	}
}
