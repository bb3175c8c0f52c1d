package relay

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// hidden is a TCP connection Join cannot splice (as a TLS connection or an
// HBONE stream): it half-closes but is not a *net.TCPConn.
type hidden struct{ *net.TCPConn }

// noHalfClose cannot half-close at all.
type noHalfClose struct{ net.Conn }

// counts records the hook's calls.
type counts struct {
	ab, ba atomic.Int64
	calls  atomic.Int64
}

func (c *counts) hook(d Direction, n int64) {
	c.calls.Add(1)
	if d == AToB {
		c.ab.Add(n)
	} else {
		c.ba.Add(n)
	}
}

type joined struct {
	aToB, bToA int64
	err        error
}

func join(ctx context.Context, a, b net.Conn, hook func(Direction, int64)) <-chan joined {
	ch := make(chan joined, 1)
	go func() {
		n, m, err := Join(ctx, a, b, hook)
		ch <- joined{n, m, err}
	}()
	return ch
}

func wait(t *testing.T, ch <-chan joined) joined {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("Join did not return")
	}
	return joined{}
}

// Join carries a request to its EOF, then the reply the server sends after
// that EOF, spliced or buffered, and counts both ways in its result and its
// hook. Sizes span several buffers and splice chunks.
func TestJoinHalfClose(t *testing.T) {
	for _, tc := range []struct {
		name string
		wrap func(*net.TCPConn) net.Conn
	}{
		{"splice", func(c *net.TCPConn) net.Conn { return c }},
		{"buffered", func(c *net.TCPConn) net.Conn { return hidden{c} }},
	} {
		for _, size := range []int{7, 3*BufSize + 11, SpliceChunk + 5} {
			t.Run(tc.name, func(t *testing.T) {
				client, a := tcpPair(t)
				b, server := tcpPair(t)
				var c counts
				done := join(t.Context(), tc.wrap(a), tc.wrap(b), c.hook)
				req, resp := strings.Repeat("q", size), strings.Repeat("r", size+2)
				go func() {
					io.WriteString(client, req)
					client.CloseWrite()
				}()
				got, err := io.ReadAll(server)
				if err != nil || string(got) != req {
					t.Fatalf("server read %d bytes, %v", len(got), err)
				}
				io.WriteString(server, resp)
				server.CloseWrite()
				got, err = io.ReadAll(client)
				if err != nil || string(got) != resp {
					t.Fatalf("client read %d bytes, %v", len(got), err)
				}
				r := wait(t, done)
				if r.aToB != int64(size) || r.bToA != int64(size+2) || r.err != nil {
					t.Fatalf("Join = %d, %d, %v; want %d, %d, nil", r.aToB, r.bToA, r.err, size, size+2)
				}
				if c.ab.Load() != r.aToB || c.ba.Load() != r.bToA {
					t.Fatalf("hook counted %d, %d; Join %d, %d", c.ab.Load(), c.ba.Load(), r.aToB, r.bToA)
				}
				if _, err := a.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
					t.Fatalf("a not closed after Join: %v", err)
				}
			})
		}
	}
}

// The hook hears of bytes while the connection is open, on the buffered
// path: an interactive exchange is counted before its end.
func TestHookLive(t *testing.T) {
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	var c counts
	done := join(t.Context(), hidden{a}, hidden{b}, c.hook)
	io.WriteString(client, "ping")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(server, buf); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.ab.Load() != 4 {
		if time.Now().After(deadline) {
			t.Fatalf("hook counted %d bytes of 4 before the end", c.ab.Load())
		}
		time.Sleep(time.Millisecond)
	}
	client.Close()
	server.Close()
	wait(t, done)
}

// A destination that cannot half-close is closed at its source's EOF.
func TestNoHalfCloseCloses(t *testing.T) {
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	done := join(t.Context(), a, noHalfClose{b}, nil)
	io.WriteString(client, "bye")
	client.CloseWrite()
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "bye" {
		t.Fatalf("server read %q, %v", got, err)
	}
	// b was closed, not half-closed: the server's reply cannot go back, and
	// the client sees its end.
	if _, err := io.ReadAll(client); err != nil {
		t.Fatalf("client: %v", err)
	}
	r := wait(t, done)
	if r.aToB != 3 || r.err != nil {
		t.Fatalf("Join = %+v", r)
	}
}

// Join ends with ctx, closing both connections.
func TestJoinContext(t *testing.T) {
	client, a := tcpPair(t)
	b, _ := tcpPair(t)
	ctx, cancel := context.WithCancel(t.Context())
	done := join(ctx, a, b, nil)
	cancel()
	if r := wait(t, done); !errors.Is(r.err, context.Canceled) {
		t.Fatalf("Join: %v, want context.Canceled", r.err)
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client read %v, want EOF (a closed)", err)
	}
}

// When one direction fails, the other (idle) one is not left hanging, and
// the error is reported.
func TestJoinError(t *testing.T) {
	for _, wrap := range []func(*net.TCPConn) net.Conn{
		func(c *net.TCPConn) net.Conn { return c },
		func(c *net.TCPConn) net.Conn { return hidden{c} },
	} {
		client, a := tcpPair(t)
		b, _ := tcpPair(t)
		done := join(t.Context(), wrap(a), wrap(b), nil)
		// The client sends and resets; the server side stays silent.
		io.WriteString(client, "x")
		client.SetLinger(0)
		client.Close()
		r := wait(t, done)
		if r.err == nil || errors.Is(r.err, net.ErrClosed) {
			t.Fatalf("Join: %v, want the reset", r.err)
		}
	}
}

// The buffered path takes its buffer from the pool.
func TestCopyAllocations(t *testing.T) {
	data := strings.Repeat("z", 3*BufSize)
	src, dst := &memConn{r: strings.NewReader(data)}, &memConn{}
	copyConn(dst, src, AToB, nil, false) // warm the pool
	var total int64
	allocs := testing.AllocsPerRun(50, func() {
		src.r.Reset(data)
		n, _ := copyConn(dst, src, AToB, nil, false)
		total += n
	})
	if allocs > 1 || total == 0 {
		t.Errorf("copyConn: %v allocations per copy (want a pooled buffer)", allocs)
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// memConn is an in-memory net.Conn: reads from r, writes are discarded.
type memConn struct {
	net.Conn // nil: only Read and Write are used
	r        *strings.Reader
}

func (m *memConn) Read(p []byte) (int, error)  { return m.r.Read(p) }
func (m *memConn) Write(p []byte) (int, error) { return len(p), nil }

func BenchmarkJoin(b *testing.B) {
	for _, tc := range []struct {
		name string
		wrap func(*net.TCPConn) net.Conn
		hook bool
	}{
		{"splice", func(c *net.TCPConn) net.Conn { return c }, false},
		{"splice-hook", func(c *net.TCPConn) net.Conn { return c }, true},
		{"buffered-hook", func(c *net.TCPConn) net.Conn { return hidden{c} }, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			client, a := tcpPair(b)
			up, server := tcpPair(b)
			var c counts
			var hook func(Direction, int64)
			if tc.hook {
				hook = c.hook
			}
			var wg sync.WaitGroup
			wg.Add(2)
			go func() { defer wg.Done(); Join(context.Background(), tc.wrap(a), tc.wrap(up), hook) }()
			go func() { defer wg.Done(); io.Copy(io.Discard, server); server.Close() }()
			buf := make([]byte, 64<<10)
			b.SetBytes(int64(len(buf)))
			b.ReportAllocs()
			start := cpuTime()
			b.ResetTimer()
			for range b.N {
				if _, err := client.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			client.CloseWrite()
			io.Copy(io.Discard, client)
			wg.Wait()
			b.StopTimer()
			// The process's CPU (sender, relay and sink): wall time means
			// little on a loaded machine.
			b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
		})
	}
}
