package waypoint

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// h2Pool is one endpoint's HTTP/2 (prior knowledge) connections, as
// Envoy's HTTP/2 connection pool: a request goes on a connection with a
// free stream under maxStreams (http2_protocol_options
// .max_concurrent_streams; 0: the server's SETTINGS only), or on a new one
// (net/http's ClientConn, one per connection);
// a connection that has carried maxRequests requests
// (max_requests_per_connection; 0: no limit) takes no more and closes when
// its last stream ends. A stream counts until its response body is done.
type h2Pool struct {
	t           *http.Transport // makes the connections (NewClientConn), never pools
	maxStreams  int
	maxRequests int64

	mu    sync.Mutex // guards conns and their counters
	conns []*h2Conn
}

// h2Conn is a pooled connection, or one being dialled (requests wait for
// it, up to maxStreams, as Envoy queues them on a connecting connection).
// Its fields but ready are guarded by h2Pool.mu.
type h2Conn struct {
	ready   chan struct{} // closed once dialled: cc or err is set
	cc      *http.ClientConn
	err     error
	active  int   // streams open or waiting for the connection
	used    int64 // requests sent
	retired bool  // takes no new request; closed when active is 0
}

func newH2Pool(dial func(ctx context.Context) (net.Conn, error), idle time.Duration, maxStreams uint32, maxRequests int64) *h2Pool {
	t := &http.Transport{
		DialContext:        func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
		DisableCompression: true,
		IdleConnTimeout:    idle,
		Protocols:          new(http.Protocols),
		HTTP2:              &http.HTTP2Config{SendPingTimeout: 30 * time.Second},
	}
	t.Protocols.SetUnencryptedHTTP2(true) // prior knowledge (h2c) inside the tunnel
	return &h2Pool{t: t, maxStreams: int(maxStreams), maxRequests: maxRequests}
}

// RoundTrip sends req on a pooled connection with a free stream, or on a
// new one.
func (p *h2Pool) RoundTrip(req *http.Request) (*http.Response, error) {
	c, dial := p.take()
	if dial {
		p.connect(req.Context(), c)
	}
	select {
	case <-c.ready:
	case <-req.Context().Done():
		p.release(c)
		return nil, req.Context().Err()
	}
	p.mu.Lock()
	cc, err := c.cc, c.err
	p.mu.Unlock()
	if err != nil {
		p.release(c)
		return nil, err
	}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		p.release(c)
		return nil, err
	}
	resp.Body = &h2Body{ReadCloser: resp.Body, release: func() { p.release(c) }}
	return resp, nil
}

// connect dials c for every request waiting on it: the first one's
// cancellation does not fail the others (the dial has its own timeout).
func (p *h2Pool) connect(ctx context.Context, c *h2Conn) {
	cc, err := p.t.NewClientConn(context.WithoutCancel(ctx), "http", "upstream:80") // the address is the dialer's
	var ce *connectError
	if err != nil && !errors.As(err, &ce) {
		err = &connectError{err}
	}
	p.mu.Lock()
	c.cc, c.err = cc, err
	p.mu.Unlock()
	close(c.ready)
}

// take reserves a stream on a connection (dialled or being dialled) with
// one free, or on a new connection to dial (dial true). Connections that
// can take no more (failed, closed, GOAWAY) and carry no stream are
// dropped.
func (p *h2Pool) take() (pick *h2Conn, dial bool) {
	var dead []*h2Conn
	p.mu.Lock()
	live := p.conns[:0]
	for _, c := range p.conns {
		usable := !c.retired
		select {
		case <-c.ready:
			usable = usable && c.err == nil && c.cc.Available() > 0
			if !usable && c.active == 0 {
				dead = append(dead, c)
				continue
			}
		default: // being dialled
		}
		live = append(live, c)
		if pick == nil && usable && (p.maxStreams == 0 || c.active < p.maxStreams) {
			pick = c
		}
	}
	clear(p.conns[len(live):])
	p.conns = live
	if pick == nil {
		pick, dial = &h2Conn{ready: make(chan struct{})}, true
		p.conns = append(p.conns, pick)
	}
	p.use(pick)
	p.mu.Unlock()
	for _, c := range dead {
		if c.cc != nil {
			c.cc.Close()
		}
	}
	return pick, dial
}

// use counts a request on c (p.mu held).
func (p *h2Pool) use(c *h2Conn) {
	c.active++
	c.used++
	if p.maxRequests > 0 && c.used >= p.maxRequests {
		c.retired = true
	}
}

// release ends a stream on c; a retired connection closes with its last.
func (p *h2Pool) release(c *h2Conn) {
	p.mu.Lock()
	c.active--
	done := c.retired && c.active == 0
	if done {
		for i, x := range p.conns {
			if x == c {
				p.conns = append(p.conns[:i], p.conns[i+1:]...)
				break
			}
		}
	}
	cc := c.cc
	p.mu.Unlock()
	if done && cc != nil {
		cc.Close()
	}
}

// CloseIdleConnections closes the connections with no stream; the others
// take no new request and close after their last (the pool is retired when
// its cluster's settings change, and when its endpoint goes).
func (p *h2Pool) CloseIdleConnections() {
	p.mu.Lock()
	var idle []*h2Conn
	live := p.conns[:0]
	for _, c := range p.conns {
		c.retired = true
		if c.active == 0 && c.cc != nil {
			idle = append(idle, c)
			continue
		}
		live = append(live, c)
	}
	clear(p.conns[len(live):])
	p.conns = live
	p.mu.Unlock()
	for _, c := range idle {
		c.cc.Close()
	}
}

// h2Body releases its stream once, when the body is closed or read to its
// end.
type h2Body struct {
	io.ReadCloser
	once    sync.Once
	release func()
}

func (b *h2Body) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		b.once.Do(b.release)
	}
	return n, err
}

func (b *h2Body) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.release)
	return err
}
