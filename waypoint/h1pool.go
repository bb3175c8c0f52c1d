package waypoint

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"
)

// h1Pool is one endpoint's HTTP/1.1 keep-alive connections, as Envoy's
// HTTP/1 connection pool: a request takes an idle connection (the most
// recently used) or dials a new one, and the connection goes back once its
// response body has been read to the end.
//
// Unlike net/http's Transport, the request is written and the response read
// on the caller's goroutine: no read and write loop per connection, so a
// request costs no goroutine hand-offs (at 1000 req/s they were a fifth of
// the waypoint's CPU). The price is that nobody watches an idle
// connection: take checks, without blocking, that the peer has not closed
// it or sent stray bytes, and a request that fails on a reused connection
// before any response byte is sent again on a new one when nothing of it
// was written, or when it is replayable (net/http's rules).
type h1Pool struct {
	dial        func(ctx context.Context) (net.Conn, error)
	idleTimeout time.Duration // an idle connection is closed after this long (0: never)
	maxRequests int64         // requests per connection (max_requests_per_connection; 0: no limit)

	mu   sync.Mutex // guards idle
	idle []*h1Conn  // most recently used last
}

// maxIdlePerHost bounds an endpoint's idle connections.
const maxIdlePerHost = 1024

// h1Conn is one upstream connection; it belongs to one request at a time
// (or to the pool while idle).
type h1Conn struct {
	p      *h1Pool
	nc     net.Conn
	br     *bufio.Reader
	head   headLimit      // between nc and br: bounds a response head
	bw     *bufio.Writer  // writes to cw
	cw     countingWriter // counts what reached nc
	used   int64          // requests sent on it
	idleAt time.Time      // when it went idle; guarded by p.mu
	timer  *time.Timer    // idle timeout, armed while idle; guarded by p.mu
}

// aLongTimeAgo is a deadline in the past: the read fails at once unless
// bytes or an EOF are already there.
var aLongTimeAgo = time.Unix(1, 0)

func newH1Pool(dial func(ctx context.Context) (net.Conn, error), idle time.Duration, maxRequests int64) *h1Pool {
	return &h1Pool{dial: dial, idleTimeout: idle, maxRequests: maxRequests}
}

// take returns an idle connection that is still usable, or nil.
func (p *h1Pool) take() *h1Conn {
	for {
		p.mu.Lock()
		n := len(p.idle)
		if n == 0 {
			p.mu.Unlock()
			return nil
		}
		c := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		if c.timer != nil {
			c.timer.Stop()
		}
		p.mu.Unlock()
		if c.alive() {
			return c
		}
		c.nc.Close()
	}
}

// alive reports whether an idle connection can carry a request: no EOF,
// error or unsolicited bytes from the peer are waiting (a non-blocking
// read: an expired deadline).
func (c *h1Conn) alive() bool {
	if c.br.Buffered() > 0 {
		return false
	}
	nc := c.nc
	if cc, ok := nc.(*countedConn); ok {
		nc = cc.Conn
	}
	if sc, ok := nc.(syscall.Conn); ok {
		// A socket: Go's poller fails a read past its deadline before
		// asking the kernel, so peek without waiting instead.
		rc, err := sc.SyscallConn()
		if err != nil {
			return false
		}
		var perr error
		if err := rc.Read(func(fd uintptr) bool {
			var b [1]byte
			_, _, perr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			return true
		}); err != nil {
			return false
		}
		return perr == syscall.EAGAIN
	}
	if err := c.nc.SetReadDeadline(aLongTimeAgo); err != nil {
		return false
	}
	_, err := c.br.Peek(1)
	if c.nc.SetReadDeadline(time.Time{}) != nil {
		return false
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// put returns c to the pool after a complete response, or closes it.
func (p *h1Pool) put(c *h1Conn) {
	if p.maxRequests > 0 && c.used >= p.maxRequests {
		c.nc.Close()
		return
	}
	p.mu.Lock()
	if len(p.idle) >= maxIdlePerHost {
		p.mu.Unlock()
		c.nc.Close()
		return
	}
	c.idleAt = time.Now()
	p.idle = append(p.idle, c)
	if p.idleTimeout > 0 {
		if c.timer == nil {
			c.timer = time.AfterFunc(p.idleTimeout, func() { p.expire(c) })
		} else {
			c.timer.Reset(p.idleTimeout)
		}
	}
	p.mu.Unlock()
}

// expire closes c if it is still idle and has been for idleTimeout.
func (p *h1Pool) expire(c *h1Conn) {
	p.mu.Lock()
	for i, x := range p.idle {
		if x == c {
			if time.Since(c.idleAt) < p.idleTimeout { // taken and put back since: its new timer decides
				break
			}
			p.idle = append(p.idle[:i], p.idle[i+1:]...)
			p.mu.Unlock()
			c.nc.Close()
			return
		}
	}
	p.mu.Unlock()
}

// CloseIdleConnections closes the idle connections; connections in use
// return to the pool as usual.
func (p *h1Pool) CloseIdleConnections() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	for _, c := range idle {
		if c.timer != nil {
			c.timer.Stop()
		}
	}
	p.mu.Unlock()
	for _, c := range idle {
		c.nc.Close()
	}
}

// RoundTrip sends req on a pooled or new connection and reads the
// response head; the body is read from the connection as the caller reads
// it. req's context bounds it all: once it ends, the connection is closed.
func (p *h1Pool) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	for retried := false; ; retried = true {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		c := p.take()
		reused := c != nil
		if c == nil {
			nc, err := p.dial(ctx)
			if err != nil {
				return nil, err
			}
			c = &h1Conn{p: p, nc: nc, cw: countingWriter{w: nc}}
			c.head.r = nc
			c.br = bufio.NewReader(&c.head)
			c.bw = bufio.NewWriter(&c.cw)
		}
		resp, wrote, err := c.roundTrip(ctx, req)
		if err == nil {
			return resp, nil
		}
		// A reused connection the peer closed while it sat idle (it did not
		// answer at all): try once more on a new one, if that is safe.
		if reused && !retried && ctx.Err() == nil && rewindable(req) && (!wrote || idempotent(req)) {
			if req.GetBody != nil {
				b, gerr := req.GetBody()
				if gerr != nil {
					return nil, err
				}
				r2 := *req
				r2.Body = b
				req = &r2
			}
			continue
		}
		return nil, err
	}
}

// rewindable reports whether r's body can be sent again.
func rewindable(r *http.Request) bool {
	return r.Body == nil || r.Body == http.NoBody || r.GetBody != nil
}

// idempotent is net/http's rule for resending a request that may have
// reached the server.
func idempotent(r *http.Request) bool {
	switch r.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return r.Header.Get("Idempotency-Key") != "" || r.Header.Get("X-Idempotency-Key") != ""
}

// roundTrip writes req and reads the response head on c. wrote reports
// whether any of the request went out (a failure before that can be
// retried anywhere). On error c is closed.
func (c *h1Conn) roundTrip(ctx context.Context, req *http.Request) (resp *http.Response, wrote bool, err error) {
	stop := context.AfterFunc(ctx, func() { c.nc.Close() })
	c.used++
	w := req
	if c.p.maxRequests == 1 && !req.Close || req.Header.Get("Expect") != "" {
		r2 := *req
		if c.p.maxRequests == 1 {
			r2.Close = true // this connection carries one request: say so
		}
		// The body goes at once (the client had its 100 Continue from the
		// waypoint when its body was read, as Envoy answers it itself):
		// an upstream told to expect one could answer before reading the
		// body and then parse it as a next request of the connection.
		if req.Header.Get("Expect") != "" {
			r2.Header = req.Header.Clone()
			r2.Header.Del("Expect")
		}
		w = &r2
	}
	c.cw.n = 0
	werr := w.Write(c.bw)
	if werr == nil {
		werr = c.bw.Flush()
	}
	wrote = c.cw.n > 0
	if werr != nil {
		// The request did not go out whole (the connection failed, or the
		// client's body did): an answer the server already sent stands
		// (a non-blocking read), else the request fails.
		c.nc.SetReadDeadline(aLongTimeAgo)
	}
	// The response head, 1xx heads included, reads at most
	// maxResponseHeadBytes from the connection, and at most max1xx 1xx
	// answers precede the final one (as net/http's Transport): an upstream
	// cannot grow the waypoint's memory without bound.
	c.head.n, c.head.limited = maxResponseHeadBytes, true
	for n1xx := 0; ; n1xx++ {
		resp, err = http.ReadResponse(c.br, req)
		if err != nil || resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
		// 1xx (100 Continue, 103 Early Hints): the final answer follows.
		if n1xx == max1xx {
			err = fmt.Errorf("more than %d 1xx responses", max1xx)
			break
		}
	}
	c.head.limited = false
	if werr != nil && err == nil {
		c.nc.SetReadDeadline(time.Time{}) // its body may still be on the way
	}
	if err != nil {
		stop()
		c.nc.Close()
		if werr != nil {
			err = werr
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return nil, wrote, err
	}
	// The server may answer before it has read the whole request (and
	// close): the answer stands, the connection does not.
	keep := werr == nil && !resp.Close && !w.Close && resp.StatusCode != http.StatusSwitchingProtocols
	resp.Body = &h1Body{rc: resp.Body, c: c, stop: stop, keep: keep}
	return resp, true, nil
}

const (
	// maxResponseHeadBytes bounds a response head read from an upstream
	// (net/http's Transport: 10 MiB; Envoy's default: 60 KiB of headers).
	maxResponseHeadBytes = 1 << 20
	// max1xx bounds the 1xx answers before a final one (net/http's 5).
	max1xx = 5
)

var errResponseHeadTooLarge = fmt.Errorf("response head larger than %d bytes", maxResponseHeadBytes)

// headLimit reads from r, at most n bytes while limited (a response head
// is being read), then fails with errResponseHeadTooLarge.
type headLimit struct {
	r       io.Reader
	n       int64
	limited bool
}

func (h *headLimit) Read(p []byte) (int, error) {
	if !h.limited {
		return h.r.Read(p)
	}
	if h.n <= 0 {
		return 0, errResponseHeadTooLarge
	}
	if int64(len(p)) > h.n {
		p = p[:h.n]
	}
	n, err := h.r.Read(p)
	h.n -= int64(n)
	return n, err
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (cw *countingWriter) Write(p []byte) (int, error) {
	n, err := cw.w.Write(p)
	cw.n += int64(n)
	return n, err
}

// h1Body is a response body on a pooled connection: read to its end, the
// connection goes back to the pool; closed early or failed, it is closed.
type h1Body struct {
	rc   io.ReadCloser
	c    *h1Conn
	stop func() bool // unhooks the context from the connection
	keep bool        // reusable once the body is read
	done bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	if b.done {
		return 0, io.EOF
	}
	n, err := b.rc.Read(p)
	if err != nil {
		b.finish(err == io.EOF)
	}
	return n, err
}

func (b *h1Body) Close() error {
	if !b.done {
		b.finish(false)
	}
	return nil
}

// finish releases the connection: to the pool when the body ended well,
// the connection may be reused and the context did not close it.
func (b *h1Body) finish(eof bool) {
	b.done = true
	if b.stop() && eof && b.keep {
		b.rc.Close()
		b.c.p.put(b.c)
		return
	}
	b.c.nc.Close() // first: net/http's body.Close reads the rest
	b.rc.Close()
}
