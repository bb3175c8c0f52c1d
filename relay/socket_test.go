package relay

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

func TestSocketNotTCP(t *testing.T) {
	p, q := net.Pipe()
	defer p.Close()
	defer q.Close()
	if s := NewSocket(p); s != nil {
		t.Fatal("NewSocket of a pipe: not nil")
	}
}

// TestSocketReadWrite: what one end writes through a Socket the other
// reads through its Socket, both ways at once, a few MiB: more than the
// sockets buffer, so writes wait for the poller; then EOF after
// CloseWrite.
func TestSocketReadWrite(t *testing.T) {
	a, b := tcpPair(t)
	sa, sb := NewSocket(a), NewSocket(b)
	want := make([]byte, 8<<20)
	for i := range want {
		want[i] = byte(i * 7)
	}
	type res struct {
		got []byte
		err error
	}
	read := func(s *Socket) <-chan res {
		ch := make(chan res, 1)
		go func() {
			var got bytes.Buffer
			buf := make([]byte, 3000) // short of what arrives: short reads and full ones
			for {
				n, err := s.Read(buf)
				got.Write(buf[:n])
				if err != nil {
					if err == io.EOF {
						err = nil
					}
					ch <- res{got.Bytes(), err}
					return
				}
			}
		}()
		return ch
	}
	ra, rb := read(sa), read(sb)
	write := func(s *Socket, c *net.TCPConn) <-chan error {
		ch := make(chan error, 1)
		go func() {
			n, err := s.Write(want)
			if err == nil && n != len(want) {
				err = io.ErrShortWrite
			}
			c.CloseWrite()
			ch <- err
		}()
		return ch
	}
	wa, wb := write(sa, a), write(sb, b)
	for _, ch := range []<-chan error{wa, wb} {
		if err := <-ch; err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	for _, ch := range []<-chan res{ra, rb} {
		r := <-ch
		if r.err != nil || !bytes.Equal(r.got, want) {
			t.Fatalf("read %d bytes (want %d, equal %v), %v", len(r.got), len(want), bytes.Equal(r.got, want), r.err)
		}
	}
}

// TestSocketDeadlineAndClose: the conn's read deadline and its Close end
// a Read waiting for the poller, with net.Conn's errors.
func TestSocketDeadlineAndClose(t *testing.T) {
	a, _ := tcpPair(t)
	s := NewSocket(a)
	a.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := s.Read(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	a.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := s.Read(make([]byte, 10))
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("read returned before the close: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	a.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read after close: %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("read still waiting 10 s after the close")
	}
}

// TestSocketWriteReset: writing to a peer that reset the connection fails.
func TestSocketWriteReset(t *testing.T) {
	a, b := tcpPair(t)
	b.SetLinger(0)
	b.Close() // RST
	s := NewSocket(a)
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for err == nil && time.Now().Before(deadline) {
		_, err = s.Write(make([]byte, 64<<10))
	}
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("write to a reset peer: %v, want ECONNRESET or EPIPE", err)
	}
}

// TestWriteNow: on a full socket WriteNow returns what it wrote, without
// an error and without waiting.
func TestWriteNow(t *testing.T) {
	a, b := tcpPair(t)
	rc, err := a.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 64<<20) // more than the socket takes
	var n int
	var werr error
	start := time.Now()
	rc.Write(func(fd uintptr) bool {
		n, werr = WriteNow(fd, p)
		return true
	})
	if werr != nil || n == 0 || n >= len(p) {
		t.Fatalf("WriteNow into a full socket: %d of %d bytes, %v; want some, no error", n, len(p), werr)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("WriteNow took %v: it waited", d)
	}
	got, err := io.Copy(io.Discard, io.LimitReader(b, int64(n)))
	if err != nil || got != int64(n) {
		t.Fatalf("peer read %d of %d bytes, %v", got, n, err)
	}
}
