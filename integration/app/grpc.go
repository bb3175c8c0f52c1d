package app

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// HeaderGRPCApp is the response header (gRPC metadata) naming the HTTP
// server that answered a gRPC call.
const HeaderGRPCApp = "x-ambit-app"

// The HTTP server also speaks gRPC: a connection that opens with the
// HTTP/2 preface (prior knowledge, as gRPC without TLS does) goes to a real
// grpc.Server on its own transport serving grpc.health.v1.Health, whose
// calls are counted and fail with FailRatio and Delay as HTTP requests
// do: a failed call is UNAVAILABLE, trailers-only (before any message), as
// gRPC servers answer errors.

// newGRPC returns h's gRPC server.
func (h *HTTP) newGRPC() *grpc.Server {
	gs := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
		n := h.served.Add(1)
		if h.Delay > 0 {
			t := time.NewTimer(h.Delay)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return nil, status.FromContextError(ctx.Err()).Err()
			}
		}
		if h.fails(n) {
			// Before any header metadata: with some pending, grpc-go sends
			// it in its own HEADERS frame and the status as trailers, which
			// no proxy can retry on.
			h.failed.Add(1)
			return nil, status.Errorf(codes.Unavailable, "ambit-app %s failing call %d on purpose", h.Name, n)
		}
		grpc.SetHeader(ctx, metadata.Pairs(HeaderGRPCApp, h.Name))
		return next(ctx, req)
	}))
	healthpb.RegisterHealthServer(gs, health.NewServer())
	return gs
}

var http2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

// splitListener hands the connections of ln that open with the HTTP/2
// preface to h2, the others to its own Accept.
type splitListener struct {
	net.Listener
	h1, h2 *chanListener
	wg     sync.WaitGroup // the accept loop and the sniffing goroutines
}

func newSplitListener(ln net.Listener) *splitListener {
	s := &splitListener{Listener: ln, h1: newChanListener(ln.Addr()), h2: newChanListener(ln.Addr())}
	s.wg.Add(1)
	go s.loop()
	return s
}

func (s *splitListener) loop() {
	defer s.wg.Done()
	defer s.h1.Close()
	defer s.h2.Close()
	for {
		c, err := s.Listener.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if h2, head, ok := sniff(c); ok {
				pc := &prefixConn{Conn: c, prefix: head}
				if h2 {
					s.h2.put(pc)
				} else {
					s.h1.put(pc) // net/http answers whatever it is
				}
			}
		}()
	}
}

// sniff reads c until its bytes leave the HTTP/2 preface (h2 false) or
// complete it (h2 true), at most 10s; ok is false when nothing came (c is
// closed then). head is what was read.
func sniff(c net.Conn) (h2 bool, head []byte, ok bool) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, len(http2Preface))
	n := 0
	for n < len(buf) {
		k, err := c.Read(buf[n:])
		n += k
		if !bytes.HasPrefix(http2Preface, buf[:n]) {
			return false, buf[:n], true
		}
		if err != nil {
			if n == 0 {
				c.Close()
				return false, nil, false
			}
			return false, buf[:n], true
		}
	}
	return true, buf, true
}

// Close closes ln and waits for the sniffing to end.
func (s *splitListener) Close() error {
	err := s.Listener.Close()
	s.wg.Wait()
	return err
}

// chanListener is a listener fed with connections.
type chanListener struct {
	addr net.Addr
	ch   chan net.Conn
	once sync.Once
	done chan struct{}
}

func newChanListener(addr net.Addr) *chanListener {
	return &chanListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) put(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// prefixConn reads prefix before the connection's bytes.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// serveGRPC serves gs on ln until it is closed; grpc.ErrServerStopped and
// closed listeners are not errors.
func serveGRPC(gs *grpc.Server, ln net.Listener) error {
	if err := gs.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}
