package h3

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
)

// ErrServerClosed is returned by Serve after Close or Shutdown.
var ErrServerClosed = errors.New("h3: server closed")

// Server terminates HBONE over HTTP/3: QUIC on a UDP socket (15008),
// presenting the certificate of the workload that owns each connection's
// destination address, then CONNECT streams handed to Handler as
// *hbone.Request (Transport "h3"), with hbone.Server's checks and answers.
// Certs, LocalIdentity and Handler are required; the rest is optional.
type Server struct {
	// Certs supplies local workloads' SVIDs and the bundles to verify
	// clients with. Required.
	Certs hbone.CertSource
	// LocalIdentity reports which local workload owns dst, the destination
	// IP of a connection's packets. Unknown: the handshake fails. Required.
	LocalIdentity func(dst netip.Addr) (spiffeid.ID, bool)
	// Handler serves each stream, as hbone.Server's. Required.
	Handler hbone.Handler
	// IsWaypointFor: as hbone.Server's.
	IsWaypointFor func(local, target netip.Addr) bool
	// MaxHeaderBytes caps a request's header section
	// (hbone.DefaultMaxHeaderBytes if zero); larger requests get 431.
	MaxHeaderBytes int
	// MaxConcurrentStreams caps streams per connection
	// (hbone.DefaultMaxConcurrentStreams if zero).
	MaxConcurrentStreams int
	// HandshakeTimeout bounds the QUIC handshake
	// (hbone.DefaultHandshakeTimeout if zero).
	HandshakeTimeout time.Duration
	// IdleTimeout closes connections without streams after this long
	// (hbone.DefaultIdleTimeout if zero).
	IdleTimeout time.Duration
	// KeepAlive: as Dialer.KeepAlive.
	KeepAlive time.Duration
	// MaxPendingHandshakes bounds the connections in their QUIC handshake,
	// over all sources (hbone.DefaultMaxPendingHandshakes if zero); past
	// it new attempts are refused before any TLS work, and past half of it
	// a client must first prove its address (a Retry).
	MaxPendingHandshakes int
	// MaxPendingHandshakesPerSource bounds them per source (an IPv4
	// address, an IPv6 /64) the same way
	// (hbone.DefaultMaxPendingHandshakesPerSource if zero).
	MaxPendingHandshakesPerSource int
	// MaxConnsPerSource bounds a source's connections, in their handshake
	// or established (DefaultMaxConnsPerSource if zero).
	MaxConnsPerSource int
	// BaseContext, if set, returns the context handlers of connections on pc
	// run under. Nil: a context that only Close ends.
	BaseContext func(pc net.PacketConn) context.Context
	// OnReject, if set, is told of refused peers (failed handshakes) and
	// requests (malformed or misdirected); it must not block.
	OnReject func(hbone.Rejection)
	// Logger receives debug logs (nil: discard).
	Logger *slog.Logger

	// mu guards the fields below.
	mu         sync.Mutex
	servers    map[*http3.Server]*quic.Transport
	admission  *admission // set once by the first Serve
	closed     bool
	cancels    []context.CancelFunc // end each Serve's base context (Close)
	closedDone chan struct{}        // closed by Close once everything is: Serve loops return
	wg         sync.WaitGroup       // Serve loops
}

func (s *Server) logger() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

func (s *Server) reject(r hbone.Rejection) {
	if s.OnReject != nil {
		s.OnReject(r)
	}
}

// connInfo is what a connection's requests share.
type connInfo struct {
	ctx                 context.Context // ends when the QUIC connection does
	peer, local         spiffeid.ID
	localAddr, peerAddr netip.AddrPort
	peerNotAfter        time.Time // when the client's certificate expires
}

type connInfoKey struct{}

// Serve accepts HTTP/3 connections on pc until Close or Shutdown, then
// returns ErrServerClosed (or the socket's error). It closes pc.
func (s *Server) Serve(pc net.PacketConn) error {
	if s.Certs == nil || s.LocalIdentity == nil || s.Handler == nil {
		pc.Close()
		return errors.New("h3 serve: Certs, LocalIdentity and Handler are required")
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		pc.Close()
		return ErrServerClosed
	}
	base := context.Background() // only when the caller gave no BaseContext
	if s.BaseContext != nil {
		if base = s.BaseContext(pc); base == nil {
			panic("h3: BaseContext returned a nil context")
		}
	}
	base, cancel := context.WithCancel(base)
	s.cancels = append(s.cancels, cancel)
	if s.admission == nil {
		s.admission = &admission{
			maxPending:     orDefault(s.MaxPendingHandshakes, hbone.DefaultMaxPendingHandshakes),
			perSource:      orDefault(s.MaxPendingHandshakesPerSource, hbone.DefaultMaxPendingHandshakesPerSource),
			connsPerSource: orDefault(s.MaxConnsPerSource, DefaultMaxConnsPerSource),
		}
	}
	tr := &quic.Transport{Conn: pc, ConnContext: s.admission.connContext, VerifySourceAddress: s.admission.needsRetry}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS13, GetConfigForClient: s.configForClient}
	idle := orDefault(s.IdleTimeout, hbone.DefaultIdleTimeout)
	qcfg := quicConfig(orDefault(s.HandshakeTimeout, hbone.DefaultHandshakeTimeout), s.KeepAlive, idle,
		orDefault(s.MaxConcurrentStreams, hbone.DefaultMaxConcurrentStreams))
	ln, err := tr.Listen(tlsConf, qcfg)
	if err != nil {
		s.mu.Unlock()
		tr.Close()
		pc.Close()
		return fmt.Errorf("h3 serve: %w", err)
	}
	hs := &http3.Server{
		Handler:        http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.serveHTTP(base, w, r) }),
		MaxHeaderBytes: orDefault(s.MaxHeaderBytes, hbone.DefaultMaxHeaderBytes),
		IdleTimeout:    idle,
		ConnContext:    s.connContext,
	}
	if s.servers == nil {
		s.servers = map[*http3.Server]*quic.Transport{}
		s.closedDone = make(chan struct{})
	}
	s.servers[hs] = tr
	done := s.closedDone
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	// ServeListener returns as soon as Shutdown starts; the connections
	// (and the socket under them) live until Close.
	err = hs.ServeListener(ln)
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		<-done
		return ErrServerClosed
	}
	s.mu.Lock()
	delete(s.servers, hs)
	s.mu.Unlock()
	hs.Close()
	tr.Close()
	pc.Close()
	return fmt.Errorf("h3 serve: %w", err)
}

// configForClient presents the certificate of the workload owning the
// packets' destination address.
func (s *Server) configForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	local := addrPort(hello.Conn.LocalAddr())
	remote := addrPort(hello.Conn.RemoteAddr())
	fail := func(err error) {
		s.logger().Debug("h3: handshake failed", "remote", remote, "local", local, "err", err)
		s.reject(hbone.Rejection{Reason: hbone.RejectHandshake, Remote: remote, Local: local, Err: err})
	}
	id, ok := s.LocalIdentity(local.Addr())
	if !ok {
		err := fmt.Errorf("no local workload owns %s", local.Addr())
		fail(err)
		return nil, err
	}
	svid, err := currentSVID(hello.Context(), s.Certs, id)
	if err != nil {
		fail(err)
		return nil, err
	}
	return serverTLSConfig(svid, s.Certs, fail), nil
}

// connContext records who is on either end of c for its requests.
func (s *Server) connContext(ctx context.Context, c *quic.Conn) context.Context {
	handshakeDone(c.Context()) // accepted: its handshake is complete
	info := &connInfo{ctx: c.Context(), localAddr: addrPort(c.LocalAddr()), peerAddr: addrPort(c.RemoteAddr())}
	cs := c.ConnectionState().TLS
	info.peer, _ = x509svidID(cs)
	if len(cs.PeerCertificates) > 0 {
		info.peerNotAfter = cs.PeerCertificates[0].NotAfter
	}
	info.local, _ = s.LocalIdentity(info.localAddr.Addr())
	return context.WithValue(ctx, connInfoKey{}, info)
}

// serveHTTP checks one request and runs the handler on it.
func (s *Server) serveHTTP(base context.Context, w http.ResponseWriter, r *http.Request) {
	info, _ := r.Context().Value(connInfoKey{}).(*connInfo)
	if info == nil || info.peer.IsZero() || info.local.IsZero() {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	if !time.Now().Before(info.peerNotAfter) {
		// A kept-alive connection outlived the client's certificate: it
		// opens no new tunnel (those it carries go on); the client must
		// handshake again, with a current SVID.
		err := fmt.Errorf("peer %s: certificate expired at %s: %w", info.peer,
			info.peerNotAfter.Format(time.RFC3339), hbone.ErrExpiredCertificate)
		s.logger().Debug("h3: stream refused", "remote", info.peerAddr, "err", err)
		s.reject(hbone.Rejection{Reason: hbone.RejectHandshake, Remote: info.peerAddr, Local: info.localAddr,
			Status: http.StatusUnauthorized, Err: err})
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	req := hbone.Request{Peer: info.peer, Local: info.local, PeerAddr: info.peerAddr, LocalAddr: info.localAddr}
	if status := s.checkRequest(&req, r, info.localAddr); status != 0 {
		s.logger().Debug("h3: bad request", "remote", info.peerAddr, "status", status, "method", r.Method, "authority", r.Host)
		s.reject(hbone.Rejection{Reason: hbone.RejectBadRequest, Remote: info.peerAddr, Local: info.localAddr, Status: status})
		w.WriteHeader(status)
		return
	}
	// The handler's context ends with the connection or the server's base
	// context; not with r's, which ends when our side of the stream is
	// closed (a half-close: the tunnel goes on the other way). A reset
	// stream fails the tunnel's reads and writes.
	ctx, cancel := context.WithCancel(info.ctx)
	defer cancel()
	defer context.AfterFunc(base, cancel)()
	a := &answerer{w: w, peer: info.peer,
		local: net.UDPAddrFromAddrPort(info.localAddr), remote: net.UDPAddrFromAddrPort(info.peerAddr)}
	s.Handler.ServeHBONE(ctx, hbone.NewRequest(req, a, hbone.TransportH3))
	if a.t != nil {
		a.t.Close()
	} else if !a.answered {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
}

// checkRequest fills req from r and returns the status to refuse it with,
// or 0: hbone.Server's rules.
func (s *Server) checkRequest(req *hbone.Request, r *http.Request, local netip.AddrPort) int {
	if r.Method != http.MethodConnect || r.Proto != "HTTP/3.0" { // not extended CONNECT
		return http.StatusBadRequest
	}
	target, err := hbone.ParseAuthority(r.Host)
	if err != nil {
		return http.StatusBadRequest
	}
	if target.Addr() != local.Addr() && (s.IsWaypointFor == nil || !s.IsWaypointFor(local.Addr(), target.Addr())) {
		return http.StatusBadRequest
	}
	req.Target = target
	req.Header = r.Header
	if v := r.Header.Get("Forwarded"); v != "" {
		fw, err := hbone.ParseForwarded(v)
		if err != nil {
			return http.StatusBadRequest
		}
		req.Forwarded = fw
	}
	req.Baggage = hbone.ParseBaggage(r.Header.Get("Baggage"))
	req.TraceParent = r.Header.Get("Traceparent")
	return 0
}

// answerer answers a request through the http3 response writer; it is used
// on the handler's goroutine only.
type answerer struct {
	w             http.ResponseWriter
	peer          spiffeid.ID
	local, remote net.Addr
	answered      bool
	t             *tunnel // after Accept
}

func (a *answerer) Accept() (hbone.Tunnel, error) {
	a.answered = true
	a.w.WriteHeader(http.StatusOK)
	str, err := a.w.(http3.HTTPStreamer).HTTPStream() // sends the headers
	if err != nil {
		return nil, fmt.Errorf("h3: answer: %w", err)
	}
	a.t = &tunnel{str: str, peer: a.peer, local: a.local, remote: a.remote}
	return a.t, nil
}

func (a *answerer) Reject(status int) error {
	a.answered = true
	a.w.WriteHeader(status)
	return nil
}

// Shutdown stops accepting, tells every client to open no new streams
// (GOAWAY), and waits for the streams to finish or ctx to end; then it
// closes what is left and returns ctx's error, if any.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	servers := make([]*http3.Server, 0, len(s.servers))
	for hs := range s.servers {
		servers = append(servers, hs)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	errs := make([]error, len(servers))
	for i, hs := range servers {
		wg.Go(func() { errs[i] = hs.Shutdown(ctx) })
	}
	wg.Wait()
	s.Close()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return nil
}

// Close closes every connection (resetting streams), ends handlers'
// contexts, and waits for Serve loops. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	servers := s.servers
	s.servers = nil
	for _, cancel := range s.cancels {
		cancel()
	}
	done := s.closedDone
	s.mu.Unlock()
	for hs, tr := range servers {
		hs.Close()
		tr.Close()
		tr.Conn.Close()
	}
	if done != nil && servers != nil {
		close(done)
	}
	s.wg.Wait()
	return nil
}

// addrPort converts a UDP address, unmapping IPv4-in-IPv6.
func addrPort(a net.Addr) netip.AddrPort {
	if ua, ok := a.(*net.UDPAddr); ok {
		ap := ua.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	if a == nil {
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
