package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"testing"
	"time"
)

// TestDeliverAsyncPrebuffered: DeliverAsync started on a stream that
// already buffers data (it arrived while the destination was dialled) must
// not let the read loop write into the destination itself until the
// delivery goroutine has written what is buffered: else the read loop
// writes later bytes before earlier ones, or blocks on the socket the
// goroutine is writing to, stalling every stream of the connection.
// (Security review, session 4.)
func TestDeliverAsyncPrebuffered(t *testing.T) {
	d, e, cli, st, dst, reader := heldDelivery(t)
	dst.(*net.TCPConn).SetWriteBuffer(4096)
	reader.(*net.TCPConn).SetReadBuffer(4096)

	pre := make([]byte, 100<<10)
	rand.Read(pre)
	go cli.Write(pre)
	waitFor(t, "data buffered before the delivery", func() bool { return bufferedOn(st) >= len(pre) })
	st.DeliverAsync(dst, nil, func(int64, error) {})
	st.s.c.mu.Lock()
	direct := st.s.sink != nil && st.s.sink.direct
	st.s.c.mu.Unlock()
	if direct {
		t.Fatal("DeliverAsync with 100 KiB buffered lets the read loop write into the destination at once")
	}
	tail := []byte("tail")
	if _, err := cli.Write(tail); err != nil {
		t.Fatal(err)
	}

	// Another stream of the same connection works while the destination
	// does not read.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	s, err := d.Dial(ctx, e.request())
	if err != nil {
		t.Fatalf("another stream on the connection: %v", err)
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(3 * time.Second))
	s.Write([]byte("ping"))
	if _, err := io.ReadFull(s, make([]byte, 4)); err != nil {
		t.Fatalf("another stream on the same connection stalled: %v", err)
	}

	// The destination gets every byte, in order.
	want := append(append([]byte(nil), pre...), tail...)
	got := make([]byte, len(want))
	reader.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(reader, got); err != nil {
		t.Fatalf("destination read: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the destination got the bytes out of order")
	}
}
