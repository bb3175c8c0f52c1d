package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

func (s *Server) logger() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

func orDefault[T int | time.Duration](v, def T) T {
	if v > 0 {
		return v
	}
	return def
}

func keepAlive(d time.Duration) time.Duration {
	switch {
	case d < 0:
		return 0
	case d == 0:
		return DefaultKeepAlive
	}
	return d
}

// Serve accepts HBONE connections on ln until Close or Shutdown, then
// returns ErrServerClosed (or the listener's error). It closes ln.
func (s *Server) Serve(ln net.Listener) error {
	if s.Certs == nil || s.LocalIdentity == nil || s.Handler == nil {
		ln.Close()
		return errors.New("hbone serve: Certs, LocalIdentity and Handler are required")
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	if s.listeners == nil {
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[*conn]struct{})
	}
	if s.pending == nil {
		timeout := orDefault(s.HandshakeTimeout, DefaultHandshakeTimeout)
		s.pending = &pendingSet{
			max:       orDefault(s.MaxPendingHandshakes, DefaultMaxPendingHandshakes),
			perSource: orDefault(s.MaxPendingHandshakesPerSource, DefaultMaxPendingHandshakesPerSource),
			timeout:   timeout,
			loaded:    min(orDefault(s.HandshakeTimeoutUnderLoad, DefaultHandshakeTimeoutUnderLoad), timeout),
		}
	}
	pending := s.pending
	s.listeners[ln] = struct{}{}
	base := context.Background() // only when the caller gave no BaseContext
	if s.BaseContext != nil {
		if base = s.BaseContext(ln); base == nil {
			panic("hbone: BaseContext returned a nil context")
		}
	}
	// The root of the handlers' contexts of this listener: Close ends it.
	ctx, cancel := context.WithCancel(base)
	s.cancels = append(s.cancels, cancel)
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()

	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.logger().Warn("hbone: accept", "err", err, "retry", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("hbone serve: %w", err)
		}
		backoff = 0
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return ErrServerClosed
		}
		s.wg.Add(1)
		s.mu.Unlock()
		// Bounded before the goroutine starts: a flood sheds its own oldest.
		pc := pending.add(nc, addrPort(nc.RemoteAddr()).Addr())
		go func() {
			defer s.wg.Done()
			s.serveConn(ctx, nc, pending, pc)
		}()
	}
}

func (s *Server) reject(r Rejection) {
	if s.OnReject != nil {
		s.OnReject(r)
	}
}

// serveConn runs the TLS handshake and the HTTP/2 connection. nc is
// pending (pc, with its handshake deadline set) until the preface is read.
func (s *Server) serveConn(ctx context.Context, nc net.Conn, pending *pendingSet, pc *pendingConn) {
	log := s.logger()
	local := addrPort(nc.LocalAddr())
	remote := addrPort(nc.RemoteAddr())
	var localID spiffeid.ID
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			id, ok := s.LocalIdentity(local.Addr())
			if !ok {
				return nil, fmt.Errorf("no local workload owns %s", local.Addr())
			}
			svid, err := currentSVID(hello.Context(), s.Certs, id)
			if err != nil {
				return nil, err
			}
			localID = id
			return serverTLSConfig(svid, s.Certs), nil
		},
	}
	handshaking := true
	defer func() {
		if handshaking {
			pending.remove(pc)
		}
	}()
	out := newBatchConn(nc)
	tc := tls.Server(out, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		log.Debug("hbone: handshake failed", "remote", remote, "local", local, "err", err)
		s.reject(Rejection{Reason: RejectHandshake, Remote: remote, Local: local, Err: err})
		nc.Close()
		return
	}
	peer, err := peerID(tc.ConnectionState())
	if err != nil {
		log.Debug("hbone: handshake failed", "remote", remote, "local", local, "err", err)
		s.reject(Rejection{Reason: RejectHandshake, Remote: remote, Local: local, Err: err})
		nc.Close()
		return
	}
	// The handshake deadline still holds: for writes until our preface is
	// out, for reads until the first request's headers (the read loop).
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(tc, preface[:]); err != nil || string(preface[:]) != http2.ClientPreface {
		log.Debug("hbone: bad or slow preface", "remote", remote, "err", err)
		if err == nil {
			err = errors.New("not an HTTP/2 client preface")
		}
		s.reject(Rejection{Reason: RejectPreface, Remote: remote, Local: local, Err: err})
		tc.Close()
		return
	}
	handshaking = false
	pending.remove(pc)
	c := newConn(tc, out, true, log)
	c.peer, c.local = peer, localID
	c.maxStreams = orDefault(s.MaxConcurrentStreams, DefaultMaxConcurrentStreams)
	c.idleTimeout = orDefault(s.IdleTimeout, DefaultIdleTimeout)
	c.keepAlive = keepAlive(s.KeepAlive)
	maxHeader := orDefault(s.MaxHeaderBytes, DefaultMaxHeaderBytes)
	c.setHeaderLimit(maxHeader)
	var peerNotAfter time.Time // when the client's certificate expires
	if pcs := tc.ConnectionState().PeerCertificates; len(pcs) > 0 {
		peerNotAfter = pcs[0].NotAfter
	}
	c.onStream = func(st *stream, f *http2.MetaHeadersFrame) {
		s.onStream(ctx, c, local, remote, peerNotAfter, st, f)
	}
	c.onClose = func(c *conn) {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}
	err = c.writePreface([]http2.Setting{
		{ID: http2.SettingMaxConcurrentStreams, Val: uint32(c.maxStreams)},
		{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: uint32(maxHeader)},
	})
	if err != nil {
		log.Debug("hbone: write preface", "remote", remote, "err", err)
		tc.Close()
		return
	}
	tc.SetWriteDeadline(time.Time{})
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		tc.Close()
		return
	}
	s.conns[c] = struct{}{}
	c.start(&s.wg)
	s.mu.Unlock()
}

// onStream validates a new request and runs the handler (read loop).
func (s *Server) onStream(ctx context.Context, c *conn, local, remote netip.AddrPort, peerNotAfter time.Time, st *stream, f *http2.MetaHeadersFrame) {
	req := &Request{Peer: c.peer, Local: c.local, PeerAddr: remote, LocalAddr: local, st: st}
	if !time.Now().Before(peerNotAfter) {
		// A kept-alive connection outlived the client's certificate: this
		// stream is refused and GOAWAY says to open no more (the streams it
		// carries go on); the client must handshake again, with a current
		// SVID.
		err := fmt.Errorf("peer %s: certificate expired at %s: %w", c.peer, peerNotAfter.Format(time.RFC3339), ErrExpiredCertificate)
		s.logger().Debug("hbone: stream refused", "remote", remote, "err", err)
		s.reject(Rejection{Reason: RejectHandshake, Remote: remote, Local: local, Status: http.StatusUnauthorized, Err: err})
		s.wg.Add(1)
		go func() { // the read loop must not wait for writes
			defer s.wg.Done()
			req.Reject(http.StatusUnauthorized)
			st.close()
			c.shutdown()
		}()
		return
	}
	status := s.checkRequest(c, req, local, f)
	if status != 0 {
		s.logger().Debug("hbone: bad request", "remote", remote, "status", status,
			"method", f.PseudoValue("method"), "authority", f.PseudoValue("authority"))
		s.reject(Rejection{Reason: RejectBadRequest, Remote: remote, Local: local, Status: status})
		s.wg.Add(1)
		go func() { // the read loop must not wait for writes
			defer s.wg.Done()
			req.Reject(status)
			st.close()
		}()
		return
	}
	sctx, cancel := context.WithCancel(ctx)
	c.mu.Lock()
	if st.err != nil {
		cancel()
	} else {
		st.cancel = cancel
	}
	c.handlers++
	c.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer func() {
			c.mu.Lock()
			c.handlers--
			c.mu.Unlock()
		}()
		defer cancel()
		defer st.close()
		s.Handler.ServeHBONE(sctx, req)
		if !req.answered {
			req.Reject(http.StatusServiceUnavailable)
		}
	}()
}

// checkRequest fills req from f and returns the status to reject it with,
// or 0.
func (s *Server) checkRequest(c *conn, req *Request, local netip.AddrPort, f *http2.MetaHeadersFrame) int {
	if f.Truncated || headerListSize(f.Fields) > c.maxHeader {
		return http.StatusRequestHeaderFieldsTooLarge
	}
	if f.PseudoValue("method") != http.MethodConnect {
		return http.StatusBadRequest
	}
	// Plain CONNECT has no :scheme, :path or :protocol (RFC 9113 8.5).
	if f.PseudoValue("scheme") != "" || f.PseudoValue("path") != "" || f.PseudoValue("protocol") != "" {
		return http.StatusBadRequest
	}
	target, err := ParseAuthority(f.PseudoValue("authority"))
	if err != nil {
		return http.StatusBadRequest
	}
	if target.Addr() != local.Addr() && (s.IsWaypointFor == nil || !s.IsWaypointFor(local.Addr(), target.Addr())) {
		return http.StatusBadRequest
	}
	req.Target = target
	req.Header = make(http.Header, len(f.Fields))
	for _, hf := range f.RegularFields() {
		req.Header.Add(hf.Name, hf.Value)
	}
	if v := req.Header.Get("Forwarded"); v != "" {
		fw, err := ParseForwarded(v)
		if err != nil {
			return http.StatusBadRequest
		}
		req.Forwarded = fw
	}
	req.Baggage = ParseBaggage(req.Header.Get("Baggage"))
	req.TraceParent = req.Header.Get("Traceparent")
	return 0
}

// Accept answers 200 and returns the stream, for the handler to copy
// (usually with Join). Call it after the upstream connection succeeded.
// The stream is closed when the handler returns.
func (r *Request) Accept() (*Stream, error) {
	if r.answered {
		return nil, errors.New("hbone: request already answered")
	}
	r.answered = true
	if r.ext != nil {
		return r.acceptExt()
	}
	if err := r.respond(200, false); err != nil {
		return nil, err
	}
	return &Stream{s: r.st}, nil
}

// Reject answers status (e.g. 401 denied by policy, 503 upstream
// unreachable) and ends the stream.
func (r *Request) Reject(status int) error {
	if r.answered {
		return errors.New("hbone: request already answered")
	}
	r.answered = true
	if r.ext != nil {
		return r.ext.Reject(status)
	}
	return r.respond(status, true)
}

func (r *Request) respond(status int, end bool) error {
	s, c := r.st, r.st.c
	c.mu.Lock()
	if s.err != nil {
		err := s.err
		c.mu.Unlock()
		return err
	}
	if end {
		// Ended before it is written: a client that reads the answer and
		// sends on the stream again finds it closed, not half-closed.
		s.answered = true
		s.wclosed = true
		c.maybeDoneLocked(s)
	}
	c.mu.Unlock()
	c.lockWrite()
	err := c.writeHeadersLocked(s.id, end, []hpack.HeaderField{{Name: ":status", Value: strconv.Itoa(status)}})
	if ferr := c.unlockWrite(); err == nil {
		err = ferr
	}
	if err != nil {
		c.close(fmt.Errorf("hbone: write: %w", err))
		return err
	}
	if !end {
		c.mu.Lock()
		s.answered = true
		c.mu.Unlock()
	}
	return nil
}

// Shutdown stops accepting, tells every client to open no new streams
// (GOAWAY), and waits for the streams to finish or ctx to end; then it
// closes what is left (as Close) and returns ctx's error, if any.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.shutdown()
	}
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.Close()
		return nil
	case <-ctx.Done():
		s.Close()
		<-done
		return ctx.Err()
	}
}

// Close closes the listeners and all connections, cancels handlers'
// contexts and waits for all goroutines (handlers included). It is
// idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	for _, cancel := range s.cancels {
		cancel()
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close(errConnClosed)
	}
	s.wg.Wait()
	return nil
}

// addrPort converts a TCP address, unmapping IPv4-in-IPv6.
func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
