package waypoint

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"
)

// rawBackend runs answer on each accepted connection after reading one
// request head, and sends each request's headers on heads.
func rawBackend(t *testing.T, answer func(c net.Conn)) (addr string, heads chan http.Header) {
	t.Helper()
	ln := listen(t)
	heads = make(chan http.Header, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				heads <- req.Header
				answer(c)
			}()
		}
	}()
	return ln.Addr().String(), heads
}

func poolTo(addr string) *h1Pool {
	return newH1Pool(func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}, time.Minute, 0)
}

// TestH1PoolResponseHeadLimits: an upstream cannot grow the waypoint's
// memory with a response head: one that never ends fails the request once
// maxResponseHeadBytes were read (the heap stays small), and so does a
// stream of 1xx answers after max1xx of them. (Security review, session 4:
// the pool had replaced net/http's Transport and its limits.)
func TestH1PoolResponseHeadLimits(t *testing.T) {
	endless, _ := rawBackend(t, func(c net.Conn) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX: ")
		chunk := []byte(strings.Repeat("a", 32<<10))
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	})
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://backend/", nil)
	_, err := poolTo(endless).RoundTrip(req)
	if !errors.Is(err, errResponseHeadTooLarge) {
		t.Fatalf("endless response head: %v, want %v", err, errResponseHeadTooLarge)
	}
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 32<<20 {
		t.Errorf("the heap grew %d MiB reading one response head", grew>>20)
	}

	continues, _ := rawBackend(t, func(c net.Conn) {
		for {
			if _, err := io.WriteString(c, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
				return
			}
		}
	})
	req, _ = http.NewRequestWithContext(t.Context(), "GET", "http://backend/", nil)
	if _, err := poolTo(continues).RoundTrip(req); err == nil || !strings.Contains(err.Error(), "1xx") {
		t.Fatalf("endless 1xx answers: %v, want an error", err)
	}

	// A head within the limit, after a 103, passes.
	fine, _ := rawBackend(t, func(c net.Conn) {
		io.WriteString(c, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nX: "+strings.Repeat("b", 64<<10)+"\r\nContent-Length: 2\r\n\r\nok")
	})
	req, _ = http.NewRequestWithContext(t.Context(), "GET", "http://backend/", nil)
	resp, err := poolTo(fine).RoundTrip(req)
	if err != nil {
		t.Fatalf("a 64 KiB header after a 103: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "ok" {
		t.Errorf("got %d %q", resp.StatusCode, b)
	}
}

// TestH1PoolStripsExpect: the body goes upstream with the request, so the
// upstream is not told to expect a 100 Continue (an upstream answering
// before the body could take the body for the connection's next request).
func TestH1PoolStripsExpect(t *testing.T) {
	addr, heads := rawBackend(t, func(c net.Conn) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	})
	req, _ := http.NewRequestWithContext(t.Context(), "POST", "http://backend/", strings.NewReader("body"))
	req.Header.Set("Expect", "100-continue")
	req.Header.Set("X-Kept", "1")
	resp, err := poolTo(addr).RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	h := <-heads
	if h.Get("Expect") != "" || h.Get("X-Kept") != "1" {
		t.Errorf("upstream got Expect %q, X-Kept %q; want no Expect, the rest kept", h.Get("Expect"), h.Get("X-Kept"))
	}
	if req.Header.Get("Expect") == "" {
		t.Error("the caller's request was modified")
	}
}
