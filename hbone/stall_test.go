package hbone

import (
	"bytes"
	"io"
	"runtime"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestReadWhileWriteStalled: a peer that stops reading stalls the server's
// write(2) while a stream writer holds the write lock. The read loop must
// go on reading meanwhile: the peer's DATA reaches its stream although the
// peer's PING (whose ack cannot be written yet) came before it, and the ack
// follows once the peer reads again.
func TestReadWhileWriteStalled(t *testing.T) {
	h := newHeldStreams(t)
	e := newEnv(t, echo, func(s *Server) { s.Handler = h })
	rc := newRawClient(t, e)
	rc.c.SetDeadline(time.Now().Add(60 * time.Second))
	// Windows so large that only TCP stops the server's writer.
	if err := rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1}); err != nil {
		t.Fatal(err)
	}
	if err := rc.fr.WriteWindowUpdate(0, 1<<31-1-65535); err != nil {
		t.Fatal(err)
	}
	rc.connect(e, 1, false)
	rc.expectStatus(1, "200")
	st := h.next(t)

	// Far more than the sockets buffer on loopback (a few MiB each way).
	const total = 64 << 20
	wrote := make(chan error, 1)
	go func() {
		_, err := st.Write(make([]byte, total))
		wrote <- err
	}()
	waitLong(t, 20*time.Second, "the stream writer blocked in write(2)", func() bool {
		return stalledInWrite("(*batchConn).flushLocked")
	})

	ping := [8]byte{'s', 't', 'a', 'l', 'l', 'e', 'd'}
	if err := rc.fr.WritePing(false, ping); err != nil {
		t.Fatal(err)
	}
	if err := rc.fr.WriteData(1, false, []byte("through")); err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, len("through"))
	if _, err := io.ReadFull(st, buf); err != nil || string(buf) != "through" {
		t.Fatalf("stream read %q, %v: the read loop stopped behind the stalled write", buf, err)
	}

	// The peer reads again: the rest of the data, and the PING's ack.
	got, acked := 0, false
	for got < total || !acked {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatalf("after %d bytes (ping acked: %v): %v", got, acked, err)
		}
		switch f := f.(type) {
		case *http2.DataFrame:
			got += len(f.Data())
		case *http2.PingFrame:
			if f.IsAck() && f.Data == ping {
				acked = true
			}
		case *http2.RSTStreamFrame, *http2.GoAwayFrame:
			t.Fatalf("after %d bytes: %v", got, f)
		}
	}
	if got != total {
		t.Fatalf("read %d bytes, want %d", got, total)
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stream's Write did not return")
	}
}

// stalledInWrite reports whether a goroutine is parked on the network
// poller in a function whose name contains fn.
func stalledInWrite(fn string) bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("[IO wait")) && bytes.Contains(g, []byte(fn)) &&
			(bytes.Contains(g, []byte("poll.(*FD).Write")) || bytes.Contains(g, []byte("poll.(*FD).RawWrite"))) { // relay.Socket writes through RawConn
			return true
		}
	}
	return false
}
