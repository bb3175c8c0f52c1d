package hbone

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// TestOnReadEOF: the function runs once the peer's END_STREAM is in and
// every byte before it was read, not while bytes wait; registered after
// that, at once.
func TestOnReadEOF(t *testing.T) {
	streams := make(chan *Stream, 1)
	e := newEnv(t, func(net.Conn) {}, func(s *Server) {
		s.Handler = HandlerFunc(func(ctx context.Context, r *Request) {
			st, err := r.Accept()
			if err != nil {
				return
			}
			streams <- st
			<-ctx.Done()
		})
	})
	d := e.dialer()
	for _, size := range []int{5, 3 * recvChunkSize} { // small frames, and frames read straight into the buffer
		cli, err := d.Dial(t.Context(), e.request())
		if err != nil {
			t.Fatal(err)
		}
		var st *Stream
		select {
		case st = <-streams:
		case <-time.After(5 * time.Second):
			t.Fatal("no stream")
		}
		fired := make(chan struct{})
		st.OnReadEOF(func() { close(fired) })
		data := bytes.Repeat([]byte("x"), size)
		if _, err := cli.Write(data); err != nil {
			t.Fatal(err)
		}
		cli.CloseWrite()
		st.SetReadDeadline(time.Now().Add(5 * time.Second))
		got := make([]byte, 0, size)
		for len(got) < size {
			select {
			case <-fired:
				t.Fatalf("%d bytes: fired with %d bytes unread", size, size-len(got))
			default:
			}
			var b [1024]byte
			n, err := st.Read(b[:min(len(b), size-len(got))])
			if err != nil {
				t.Fatalf("%d bytes: read: %v", size, err)
			}
			got = append(got, b[:n]...)
		}
		select {
		case <-fired:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d bytes: not fired after the last byte and the FIN", size)
		}
		if n, err := st.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Fatalf("after: %d %v, want EOF", n, err)
		}
		again := false
		st.OnReadEOF(func() { again = true })
		if !again {
			t.Error("registered at the end: not called at once")
		}
		st.Close()
		cli.Close()
	}
}
