package waypoint

import (
	"context"
	"errors"
	"log"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/relay"
)

// downstream is what the HBONE CONNECT told us about the client.
type downstream struct {
	peer     spiffeid.ID    // the client's verified identity (source principal)
	peerAddr netip.AddrPort // TCP source of the HBONE connection
	target   netip.AddrPort // the CONNECT authority: VIP:port or podIP:port
	srcAddr  netip.AddrPort // forwarded for=, when sent
	baggage  hbone.Baggage

	framing    *framing     // the tunnelled HTTP/1.x request heads
	h1Requests atomic.Int64 // HTTP/1.x requests served so far (net/http serves them in order)
}

func (d *downstream) principal() string {
	if d.peer.IsZero() {
		return ""
	}
	return d.peer.String()
}

// serveHBONE serves one CONNECT stream: the target picks the filter chain;
// HTTP chains get an HTTP/1.1 or HTTP/2 server on the tunnelled bytes, TCP
// chains a relay.
func (p *Proxy) serveHBONE(ctx context.Context, r *hbone.Request) {
	snap := p.snap.Load()
	ds := &downstream{peer: r.Peer, peerAddr: r.PeerAddr, target: r.Target, srcAddr: r.Forwarded.For, baggage: r.Baggage}
	if snap == nil {
		r.Reject(http.StatusServiceUnavailable)
		return
	}
	chain := snap.chainFor(r.Target)
	if chain == nil {
		p.m.noChain.Inc()
		p.access.Info("waypoint: no filter chain", "authority", r.Target.String(), "response_flags", "NR",
			"downstream_remote_address", r.PeerAddr.String(), "source_principal", ds.principal())
		r.Reject(http.StatusServiceUnavailable)
		return
	}
	if chain.tcp != nil {
		p.serveTCP(ctx, r, snap, chain, ds)
		return
	}
	st, err := r.Accept()
	if err != nil {
		return
	}
	p.serveConn(ctx, st, chain.http, ds)
}

// track registers a tunnelled connection's server for drain; false when
// closed. A stream that raced the drain's GOAWAY is still served, without
// keep-alive.
func (p *Proxy) track(hs innerServer) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	if p.draining.Load() {
		hs.SetKeepAlivesEnabled(false)
	}
	p.inner[hs] = struct{}{}
	return true
}

func (p *Proxy) untrack(hs innerServer) {
	p.mu.Lock()
	delete(p.inner, hs)
	p.mu.Unlock()
}

var discardLog = log.New(discardWriter{}, "", 0)

type discardWriter struct{}

func (discardWriter) Write(p []byte) (int, error) { return len(p), nil }

// serveNetHTTP runs net/http's server on the one tunnelled connection
// that starts with the HTTP/2 preface (serveConn): HTTP/2 with prior
// knowledge, h2c and gRPC included. HTTP/2's defences against rapid reset
// and CONTINUATION floods are net/http's.
func (p *Proxy) serveNetHTTP(ctx context.Context, c net.Conn, hc *httpChain, ds *downstream) {
	hs := &http.Server{
		Handler:           http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { p.serveHTTP(w, r, ds) }),
		MaxHeaderBytes:    hc.maxHeaderBytes,
		ReadHeaderTimeout: p.cfg.ReadHeaderTimeout,
		IdleTimeout:       hc.idleTimeout,
		ReadTimeout:       hc.requestTimeout, // HCM request_timeout: the whole request read (0: none)
		ErrorLog:          discardLog,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		Protocols:         new(http.Protocols),
		HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: 250},
		// "OPTIONS *" is routed like any request (and counted in order:
		// ds.h1Requests).
		DisableGeneralOptionsHandler: true,
	}
	hs.Protocols.SetHTTP1(true)
	hs.Protocols.SetUnencryptedHTTP2(true)
	ln := &oneConnListener{c: c, done: make(chan struct{})}
	connDone := make(chan struct{})
	hs.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateClosed || s == http.StateHijacked {
			ln.Close()
			close(connDone)
		}
	}
	if !p.track(hs) {
		c.Close()
		return
	}
	defer p.untrack(hs)
	hs.Serve(ln) // returns once the listener closes: when the connection ends, or on Shutdown
	if !ln.closeListener() {
		<-connDone // accepted: wait for it (Shutdown lets its requests finish)
	}
}

// oneConnListener hands out one connection, then blocks until closed.
type oneConnListener struct {
	mu       sync.Mutex // guards c and accepted
	c        net.Conn
	accepted bool
	once     sync.Once
	done     chan struct{}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.c
	l.c = nil
	if c != nil {
		l.accepted = true
	}
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

// Close closes the listener; it reports whether the connection had never
// been accepted (and closes it then).
func (l *oneConnListener) Close() error {
	l.closeListener()
	return nil
}

func (l *oneConnListener) closeListener() bool {
	l.mu.Lock()
	c := l.c
	l.c = nil
	l.mu.Unlock()
	if c != nil {
		c.Close()
	}
	l.once.Do(func() { close(l.done) })
	return l.neverAccepted()
}

func (l *oneConnListener) neverAccepted() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return !l.accepted
}

func (l *oneConnListener) Addr() net.Addr { return dummyAddr{} }

type dummyAddr struct{}

func (dummyAddr) Network() string { return "hbone" }
func (dummyAddr) String() string  { return "hbone" }

// serveTCP relays a TCP chain's stream to an endpoint of its cluster,
// after network RBAC. The stream is in the connection table from the
// start, counted opened once the upstream is connected, its bytes as they
// move, and closed with its response flag at the end.
func (p *Proxy) serveTCP(ctx context.Context, r *hbone.Request, snap *snapshot, chain *filterChain, ds *downstream) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c := p.m.tcpConn(chain, ds)
	c.Cancel = cancel
	p.conns.Begin(c)
	flag := "-"
	var h *host
	var err error
	defer func() {
		p.conns.End(c, flag, "", err)
		p.access.Info("waypoint: tcp", "start_time", c.Start.UTC().Format(time.RFC3339Nano), "response_flags", flag,
			"bytes_received", c.Received(), "bytes_sent", c.Sent(), "duration", time.Since(c.Start).Milliseconds(),
			"upstream_cluster", chain.tcp.cluster, "upstream_host", hostAddr(h), "authority", ds.target.String(),
			"downstream_remote_address", ds.peerAddr.String(), "source_principal", ds.principal())
	}()
	rin := &rbacInput{principal: ds.principal(), port: uint32(ds.target.Port())}
	for _, f := range chain.tcp.rbac {
		if f.denies(rin) {
			flag = "RBAC"
			r.Reject(http.StatusUnauthorized)
			return
		}
	}
	v := snap.clusters[chain.tcp.cluster]
	if v == nil {
		flag = "NC"
		r.Reject(http.StatusServiceUnavailable)
		return
	}
	if h = v.pick(time.Now(), nil); h == nil {
		flag = "UH"
		r.Reject(http.StatusServiceUnavailable)
		return
	}
	tcpDestination(c, h)
	release, aerr := v.admit(ctx, false)
	if aerr != nil {
		flag = "UO"
		r.Reject(http.StatusServiceUnavailable)
		return
	}
	defer release()
	dctx, dcancel := context.WithTimeout(ctx, v.s.connectTimeout)
	up, derr := p.dialHost(dctx, h)
	dcancel()
	if derr != nil {
		flag, err = "UF", derr
		v.report(h, outcomeGateway, time.Now())
		r.Reject(http.StatusServiceUnavailable)
		return
	}
	v.report(h, outcomeOK, time.Now())
	st, aerr := r.Accept()
	if aerr != nil {
		up.Close()
		return
	}
	c.Transport = st.Transport() // h2 or h3: flows and ambit_hbone_*
	p.conns.Establish(c)
	if _, _, jerr := relay.Join(ctx, st, up, c.Count); jerr != nil && !errors.Is(jerr, net.ErrClosed) && !errors.Is(jerr, context.Canceled) {
		p.log.Debug("waypoint: tcp relay", "err", jerr)
	}
}

func hostAddr(h *host) string {
	if h == nil {
		return "-"
	}
	return h.spec.addr.String()
}
