package relay

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

var wraps = []struct {
	name string
	wrap func(*net.TCPConn) net.Conn
}{
	{"splice", func(c *net.TCPConn) net.Conn { return c }},
	{"buffered", func(c *net.TCPConn) net.Conn { return hidden{c} }},
}

func joinWith(ctx context.Context, j Joiner, a, b net.Conn, hook func(Direction, int64)) <-chan joined {
	ch := make(chan joined, 1)
	go func() {
		n, m, err := j.Join(ctx, a, b, hook)
		ch <- joined{n, m, err}
	}()
	return ch
}

// within waits for Join's result and checks how long it took since start.
func within(t *testing.T, ch <-chan joined, start time.Time, lo, hi time.Duration) joined {
	t.Helper()
	r := wait(t, ch)
	if el := time.Since(start); el < lo || el > hi {
		t.Errorf("Join returned after %v, want between %v and %v", el, lo, hi)
	}
	return r
}

// A connection silent both ways is closed after IdleTimeout; both peers
// see it end.
func TestJoinIdle(t *testing.T) {
	const idle = 200 * time.Millisecond
	for _, w := range wraps {
		t.Run(w.name, func(t *testing.T) {
			client, a := tcpPair(t)
			b, server := tcpPair(t)
			start := time.Now()
			done := joinWith(t.Context(), Joiner{IdleTimeout: idle}, w.wrap(a), w.wrap(b), nil)
			r := within(t, done, start, idle, 2*idle+2*time.Second)
			if !errors.Is(r.err, ErrIdle) {
				t.Fatalf("Join: %v, want ErrIdle", r.err)
			}
			for _, c := range []*net.TCPConn{client, server} {
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, syscall.ETIMEDOUT) {
					t.Fatalf("peer still connected: %v", err)
				}
			}
		})
	}
}

// Bytes one way, however slow, keep the connection: the silent direction
// does not close it, also when the busy one is spliced (it reports its
// bytes only when asked).
func TestJoinTrickleNotIdle(t *testing.T) {
	const idle = 400 * time.Millisecond
	for _, w := range wraps {
		t.Run(w.name, func(t *testing.T) {
			client, a := tcpPair(t)
			b, server := tcpPair(t)
			done := joinWith(t.Context(), Joiner{IdleTimeout: idle}, w.wrap(a), w.wrap(b), nil)
			go io.Copy(io.Discard, server)
			tick := time.NewTicker(idle / 8)
			defer tick.Stop()
			for end := time.Now().Add(4 * idle); time.Now().Before(end); {
				select {
				case r := <-done:
					t.Fatalf("closed while bytes flowed: %v", r.err)
				case <-tick.C:
					if _, err := client.Write([]byte("x")); err != nil {
						t.Fatal(err)
					}
				}
			}
			start := time.Now()
			r := within(t, done, start, idle/2, 2*idle+2*time.Second)
			if !errors.Is(r.err, ErrIdle) {
				t.Fatalf("Join: %v, want ErrIdle", r.err)
			}
		})
	}
}

// After the client's FIN, a silent upstream gets HalfCloseTimeout, and so
// does one that keeps sending.
func TestJoinHalfCloseBound(t *testing.T) {
	const bound = 200 * time.Millisecond
	for _, w := range wraps {
		for _, talking := range []bool{false, true} {
			name := w.name + "/silent"
			if talking {
				name = w.name + "/talking"
			}
			t.Run(name, func(t *testing.T) {
				client, a := tcpPair(t)
				b, server := tcpPair(t)
				done := joinWith(t.Context(), Joiner{HalfCloseTimeout: bound, IdleTimeout: time.Hour}, w.wrap(a), w.wrap(b), nil)
				go io.Copy(io.Discard, client)
				client.CloseWrite()
				start := time.Now()
				if _, err := io.ReadAll(server); err != nil {
					t.Fatal(err)
				}
				if talking {
					go func() {
						for {
							if _, err := server.Write([]byte("y")); err != nil {
								return
							}
							time.Sleep(bound / 10)
						}
					}()
				}
				r := within(t, done, start, bound*3/4, bound+2*time.Second)
				if !errors.Is(r.err, ErrHalfClosed) {
					t.Fatalf("Join: %v, want ErrHalfClosed", r.err)
				}
			})
		}
	}
}

// A client that half-closed and then reset its connection ends the Join at
// once, not at the half-close bound.
func TestJoinResetAfterFIN(t *testing.T) {
	for _, w := range wraps[:1] { // the watch needs the TCP socket
		t.Run(w.name, func(t *testing.T) {
			client, a := tcpPair(t)
			b, server := tcpPair(t)
			done := joinWith(t.Context(), Joiner{HalfCloseTimeout: time.Minute, IdleTimeout: time.Hour}, w.wrap(a), w.wrap(b), nil)
			client.CloseWrite()
			if _, err := io.ReadAll(server); err != nil { // the FIN went through
				t.Fatal(err)
			}
			start := time.Now()
			client.SetLinger(0)
			client.Close() // RST
			r := within(t, done, start, 0, 5*time.Second)
			if !errors.Is(r.err, syscall.ECONNRESET) && !errors.Is(r.err, syscall.EPIPE) {
				t.Fatalf("Join: %v, want EPIPE or ECONNRESET", r.err)
			}
			server.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := server.Read(make([]byte, 1)); err == nil || errors.Is(err, syscall.ETIMEDOUT) {
				t.Fatalf("upstream still connected: %v", err)
			}
		})
	}
}

// The zero Joiner is Join: a silent connection stays.
func TestZeroJoinerKeeps(t *testing.T) {
	_, a := tcpPair(t)
	b, _ := tcpPair(t)
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	r := wait(t, joinWith(ctx, Joiner{}, a, b, nil))
	if !errors.Is(r.err, context.DeadlineExceeded) {
		t.Fatalf("Join: %v, want the context's end", r.err)
	}
}
