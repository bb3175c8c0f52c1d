package waypoint

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// oneShotBackend answers one request per TCP connection with a keep-alive
// response, then closes the connection (as a server whose idle timeout
// fired would). It counts connections, and reports each close on closed
// once close(2) has returned (on loopback the FIN is then in the peer's
// receive queue).
func oneShotBackend(t *testing.T) (addr string, conns *atomic.Int64, closed chan struct{}) {
	t.Helper()
	ln := listen(t)
	conns = new(atomic.Int64)
	closed = make(chan struct{}, 100)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer func() { c.Close(); closed <- struct{}{} }()
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				io.Copy(io.Discard, req.Body)
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			}()
		}
	}()
	return ln.Addr().String(), conns, closed
}

// TestH1PoolClosedIdleConnection: the upstream closes every connection
// after one answer; POSTs (not replayable by net/http's rules once
// written) through the waypoint still all succeed, each on a new
// connection: the pool sees that its idle connection was closed before
// using it.
func TestH1PoolClosedIdleConnection(t *testing.T) {
	e := newEnv(t, nil)
	addr, conns, closed := oneShotBackend(t)
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: netip.MustParseAddrPort(addr)}}})...)
	c := e.client(e.cliID, target, false)
	for i := range 5 {
		resp, err := c.Post("http://"+svc+"/", "text/plain", strings.NewReader("body"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "ok" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, b)
		}
		select { // the backend closed that connection
		case <-closed:
		case <-time.After(5 * time.Second):
			t.Fatal("backend did not close")
		}
	}
	if n := conns.Load(); n != 5 {
		t.Errorf("%d upstream connections for 5 requests, want 5", n)
	}
}

// TestH1PoolStaleStream: over a connection without a socket (net.Pipe,
// as an HBONE stream), an idle connection whose peer closed is not used;
// a GET whose reused connection fails before any answer is sent again on
// a new one; a body closed early closes its connection without reading
// the rest.
func TestH1PoolStaleStream(t *testing.T) {
	var dials atomic.Int64
	// serve answers n requests on the pipe's server end, then closes it;
	// n < 0: it answers one request with an endless body.
	serve := func(c net.Conn, n int, closeBeforeAnswer bool) {
		defer c.Close()
		br := bufio.NewReader(c)
		for i := 0; n < 0 || i < n; i++ {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			if closeBeforeAnswer {
				return
			}
			if n < 0 {
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
				for {
					if _, err := c.Write(make([]byte, 4096)); err != nil {
						return
					}
				}
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	}
	var mode atomic.Int32 // 0: one answer then close; 1: close before answering; 2: endless body
	p := newH1Pool(func(ctx context.Context) (net.Conn, error) {
		dials.Add(1)
		cli, srv := net.Pipe()
		switch mode.Load() {
		case 0:
			go serve(srv, 1, false)
		case 1:
			go serve(srv, 1, true)
		case 2:
			go serve(srv, -1, false)
		}
		return cli, nil
	}, time.Minute, 0)
	get := func() (*http.Response, error) {
		req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://upstream/", nil)
		return p.RoundTrip(req)
	}
	readAll := func(resp *http.Response) string {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return string(b)
	}

	resp, err := get()
	if err != nil || readAll(resp) != "ok" {
		t.Fatalf("first: %v", err)
	}
	// The server closed its end after answering: the idle connection is
	// seen to be closed (once the close arrives) and a new one dialled.
	waitFor(t, func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return len(p.idle) == 1 && !p.idle[0].alive()
	})
	resp, err = get()
	if err != nil || readAll(resp) != "ok" {
		t.Fatalf("after the close: %v", err)
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("%d dials, want 2", n)
	}

	// A reused connection that fails before answering: retried on a new one.
	mode.Store(1)
	p.mu.Lock()
	p.idle = nil
	p.mu.Unlock()
	cli, srv := net.Pipe()
	go serve(srv, 1, true)
	br := bufio.NewReader(cli)
	p.put(&h1Conn{p: p, nc: cli, br: br, cw: countingWriter{w: cli}})
	p.idle[0].bw = bufio.NewWriter(&p.idle[0].cw)
	mode.Store(0)
	resp, err = get()
	if err != nil || readAll(resp) != "ok" {
		t.Fatalf("retried GET: %v", err)
	}

	// An endless body closed early: Close returns, the connection is gone.
	mode.Store(2)
	p.CloseIdleConnections()
	resp, err = get()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() { resp.Body.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close of an endless body did not return")
	}
	p.mu.Lock()
	idle := len(p.idle)
	p.mu.Unlock()
	if idle != 0 {
		t.Errorf("%d idle connections after an early close, want 0", idle)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5s")
		}
		time.Sleep(time.Millisecond)
	}
}
