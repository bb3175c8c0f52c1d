package waypoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
	"github.com/ambit-mesh/ambit/telemetry"
)

// Config configures a Proxy. Identity and Certs are required.
type Config struct {
	// Identity is the waypoint's own SPIFFE ID: presented to clients on
	// 15008 and to destinations when re-tunnelling. Required.
	Identity spiffeid.ID
	// Certs supplies the waypoint's SVID and the trust bundles. Required.
	Certs hbone.CertSource
	// Dialer originates HBONE to destinations (default: one built on Certs,
	// closed by Close).
	Dialer *hbone.Dialer
	// Listen addresses for Start (defaults: ":15008", "127.0.0.1:15000",
	// ":15020", ":15021").
	HBONEAddr, AdminAddr, MetricsAddr, ReadyAddr string
	// DrainDuration is how long, once Serve's context ends, the waypoint
	// keeps accepting on HBONE while it fails readiness, so that the
	// control plane takes it out of the ztunnels' endpoints before it
	// stops (Istio's terminationDrainDuration; 0: no wait). Every response
	// in that time tells its client to reconnect: "Connection: close" on
	// HTTP/1.1, GOAWAY on tunnelled HTTP/2.
	DrainDuration time.Duration
	// DrainTimeout bounds what follows the drain duration: GOAWAY on every
	// HBONE connection, idle tunnelled connections closed, in-flight
	// requests finish (default 30s).
	DrainTimeout time.Duration
	// RetryBufferBytes: request bodies up to this size are buffered so
	// they can be retried or mirrored; larger ones are streamed once
	// (default 64 KiB).
	RetryBufferBytes int64
	// MaxRequestBodyBytes answers 413 to larger request bodies (0: no
	// limit).
	MaxRequestBodyBytes int64
	// ReadHeaderTimeout bounds reading a request's headers (default 10s).
	ReadHeaderTimeout time.Duration
	// QUIC also serves HBONE over HTTP/3 (package hbone/h3) on UDP at the
	// HBONE address (Start; Serve takes Listeners.QUIC), with the same
	// identity, caller checks, requests and drain as over HTTP/2 (quic.go).
	// Off by default. It also turns QUICUpstream on.
	QUIC bool
	// QUICUpstream dials HBONE over HTTP/3 to endpoints that advertise it
	// (EDS hbone_quic) and are not on Node, falling back to HTTP/2 where
	// UDP is dropped or refused (h3.Fallback, remembered per address), with
	// the waypoint's identity (quic.go). Off by default.
	QUICUpstream bool
	// QUICDialTimeout bounds an upstream QUIC dial before it falls back to
	// HTTP/2 (h3.DefaultFallbackDialTimeout if zero).
	QUICDialTimeout time.Duration
	// Node is the name of the waypoint's node: endpoints on it are dialled
	// over HTTP/2 (UDP from a local pod to a pod's 15008 is dropped).
	Node string
	// Logger receives operational logs; AccessLog one line per request
	// (nil: discard).
	Logger, AccessLog *slog.Logger
}

// Proxy is the waypoint: HBONE in, Envoy-configured HTTP routing, HBONE
// (or TCP) out.
type Proxy struct {
	cfg     Config
	log     *slog.Logger
	access  *slog.Logger
	dialer  *hbone.Dialer
	ownDial bool
	m       *metrics
	conns   telemetry.Tracker // tcp_proxy streams: the open-connection table and istio_tcp_*
	server  *hbone.Server
	quic    *h3.Server   // HBONE over HTTP/3: served only on Listeners.QUIC
	h3      *h3.Fallback // upstream HBONE over HTTP/3 in front of dialer; nil: off

	snap atomic.Pointer[snapshot] // the config every new request uses

	applyMu  sync.Mutex          // serializes Apply; guards clusters
	clusters map[string]*cluster // runtime state by cluster name
	lastErr  atomic.Pointer[string]

	draining atomic.Bool
	serving  atomic.Bool

	mu        sync.Mutex               // guards inner, closed, bgCtx and bgStop
	inner     map[innerServer]struct{} // tunnelled connections' servers (drain)
	closed    bool
	bg        sync.WaitGroup     // mirrors
	bgCtx     context.Context    // set by Serve; parent of mirrors and of the drain
	bgStop    context.CancelFunc // cancels bgCtx (Close)
	closeOnce sync.Once
}

// New returns a Proxy; it serves nothing until Start or Serve.
func New(cfg Config) (*Proxy, error) {
	if cfg.Identity.IsZero() || cfg.Certs == nil {
		return nil, errors.New("waypoint: Identity and Certs are required")
	}
	p := &Proxy{cfg: cfg, log: orDiscard(cfg.Logger), access: orDiscard(cfg.AccessLog), clusters: map[string]*cluster{},
		inner: map[innerServer]struct{}{}, m: newMetrics()}
	p.conns.Metrics = p.m.tcp
	p.conns.Flows = p.m.flows
	if p.cfg.RetryBufferBytes == 0 {
		p.cfg.RetryBufferBytes = 64 << 10
	}
	if p.cfg.ReadHeaderTimeout == 0 {
		p.cfg.ReadHeaderTimeout = 10 * time.Second
	}
	if p.cfg.DrainTimeout == 0 {
		p.cfg.DrainTimeout = 30 * time.Second
	}
	p.dialer = cfg.Dialer
	if p.dialer == nil {
		p.dialer = &hbone.Dialer{Certs: cfg.Certs, Logger: cfg.Logger}
		p.ownDial = true
	}
	p.server = &hbone.Server{
		Certs:         cfg.Certs,
		LocalIdentity: func(netip.Addr) (spiffeid.ID, bool) { return cfg.Identity, true },
		IsWaypointFor: func(local, target netip.Addr) bool { return true }, // any target; the filter chains decide
		Handler:       hbone.HandlerFunc(p.serveHBONE),
		Logger:        cfg.Logger,
	}
	p.quic = p.newQUICServer()
	p.h3 = p.newQUICDialer()
	return p, nil
}

func orDiscard(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

// Apply validates rs, the complete set of the waypoint's resources, and
// swaps it in as one snapshot. An invalid set returns an error naming the
// field (NACK) and keeps the previous snapshot; a valid but incomplete set
// returns an error wrapping ErrIncomplete and also keeps it.
func (p *Proxy) Apply(rs []Resource) error {
	c, err := compile(rs)
	if err != nil {
		if !errors.Is(err, ErrIncomplete) {
			s := err.Error()
			p.lastErr.Store(&s)
			p.m.configRejected.Inc()
		}
		return fmt.Errorf("waypoint: %w", err)
	}
	p.applyMu.Lock()
	defer p.applyMu.Unlock()
	snap := &snapshot{resources: c.resources, chains: c.chains, routes: c.routes, clusters: map[string]*clusterView{}}
	var dropped []*host
	next := map[string]*cluster{}
	for name, s := range c.clusters {
		st := p.clusters[name]
		if st == nil {
			st = &cluster{name: name, hosts: map[string]*host{}}
		}
		next[name] = st
		v := &clusterView{s: s, c: st}
		hosts := map[string]*host{}
		st.mu.Lock()
		for _, e := range c.endpoints[s.edsName] {
			k := e.key()
			h := st.hosts[k]
			if h == nil {
				h = &host{spec: e}
			}
			if _, dup := hosts[k]; dup {
				continue
			}
			hosts[k] = h
			v.hosts = append(v.hosts, h)
		}
		for k, h := range st.hosts {
			if _, ok := hosts[k]; !ok {
				dropped = append(dropped, h)
			}
		}
		st.hosts = hosts
		st.mu.Unlock()
		snap.clusters[name] = v
	}
	for name, st := range p.clusters {
		if _, ok := next[name]; !ok {
			for _, h := range st.hosts {
				dropped = append(dropped, h)
			}
		}
	}
	p.clusters = next
	p.snap.Store(snap)
	p.lastErr.Store(nil)
	p.m.configApplied.Inc()
	for _, h := range dropped {
		h.closeIdle()
	}
	p.log.Info("waypoint: config applied", "chains", len(snap.chains), "routes", len(snap.routes), "clusters", len(snap.clusters))
	return nil
}

// Listeners are what Serve serves on; nil ones are not served.
type Listeners struct {
	HBONE, Admin, Metrics, Ready net.Listener
	// QUIC is the UDP socket of HBONE over HTTP/3; Serve closes it.
	QUIC net.PacketConn
}

// Start listens on the configured addresses and serves until ctx ends,
// then drains: not ready and still accepting for DrainDuration, then
// GOAWAY, in-flight requests finish within DrainTimeout.
func (p *Proxy) Start(ctx context.Context) error {
	addr := func(a, def string) string {
		if a == "" {
			return def
		}
		return a
	}
	var ls Listeners
	var err error
	listen := func(a string) net.Listener {
		if err != nil {
			return nil
		}
		var ln net.Listener
		ln, err = net.Listen("tcp", a)
		return ln
	}
	ls.HBONE = listen(addr(p.cfg.HBONEAddr, ":15008"))
	ls.Admin = listen(addr(p.cfg.AdminAddr, "127.0.0.1:15000"))
	ls.Metrics = listen(addr(p.cfg.MetricsAddr, ":15020"))
	ls.Ready = listen(addr(p.cfg.ReadyAddr, ":15021"))
	if err == nil && p.cfg.QUIC {
		ls.HBONE, ls.QUIC, err = listenQUIC(ls.HBONE, addr(p.cfg.HBONEAddr, ":15008"))
	}
	if err != nil {
		for _, ln := range []net.Listener{ls.HBONE, ls.Admin, ls.Metrics, ls.Ready} {
			if ln != nil {
				ln.Close()
			}
		}
		return fmt.Errorf("waypoint: listen: %w", err)
	}
	return p.Serve(ctx, ls)
}

// Serve serves on ls until ctx ends, then drains and closes.
func (p *Proxy) Serve(ctx context.Context, ls Listeners) error {
	p.mu.Lock()
	if p.bgCtx == nil { // mirrors outlive their request, and drain outlives ctx: both end with Close
		p.bgCtx, p.bgStop = context.WithCancel(context.WithoutCancel(ctx))
	}
	p.mu.Unlock()
	g, gctx := errgroup.WithContext(ctx)
	var side []*http.Server
	for _, x := range []struct {
		ln net.Listener
		h  http.Handler
	}{{ls.Admin, p.adminHandler()}, {ls.Metrics, p.metricsHandler()}, {ls.Ready, p.readyHandler()}} {
		if x.ln == nil {
			continue
		}
		hs := &http.Server{Handler: x.h, ReadHeaderTimeout: 5 * time.Second}
		side = append(side, hs)
		g.Go(func() error {
			if err := hs.Serve(x.ln); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	if ls.HBONE != nil {
		g.Go(func() error {
			p.serving.Store(true)
			if err := p.server.Serve(ls.HBONE); !errors.Is(err, hbone.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	if ls.QUIC != nil {
		g.Go(func() error { return p.serveQUIC(ls.QUIC) })
	}
	g.Go(func() error {
		<-gctx.Done()
		p.drain()
		for _, hs := range side {
			hs.Close()
		}
		return nil
	})
	err := g.Wait()
	p.Close()
	return err
}

// drain fails readiness and tells clients to reconnect (serveHTTP) while
// still accepting for DrainDuration; then it stops accepting, sends GOAWAY
// and lets in-flight requests finish.
func (p *Proxy) drain() {
	p.draining.Store(true)
	p.mu.Lock()
	bg := p.bgCtx
	p.mu.Unlock()
	if d := p.cfg.DrainDuration; d > 0 {
		p.log.Info("waypoint: draining: not ready, still accepting", "drain_duration", d.String())
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-bg.Done(): // Close
			t.Stop()
		}
	}
	ctx, cancel := context.WithTimeout(bg, p.cfg.DrainTimeout)
	defer cancel()
	p.mu.Lock()
	inner := make([]innerServer, 0, len(p.inner))
	for hs := range p.inner {
		inner = append(inner, hs)
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, hs := range inner {
		wg.Add(1)
		go func() { defer wg.Done(); hs.Shutdown(ctx) }()
	}
	wg.Add(1)
	go func() { defer wg.Done(); p.shutdownQUIC(ctx) }()
	p.server.Shutdown(ctx)
	wg.Wait()
}

// Close stops everything at once and waits for goroutines. Idempotent.
func (p *Proxy) Close() error {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		inner := make([]innerServer, 0, len(p.inner))
		for hs := range p.inner {
			inner = append(inner, hs)
		}
		p.mu.Unlock()
		for _, hs := range inner {
			hs.Close()
		}
		p.server.Close()
		p.quic.Close()
		p.mu.Lock()
		stop := p.bgStop
		p.mu.Unlock()
		if stop != nil {
			stop()
		}
		p.bg.Wait()
		p.closeQUICDialer()
		if p.ownDial {
			p.dialer.Close()
		}
		p.applyMu.Lock()
		for _, c := range p.clusters {
			for _, h := range c.hosts {
				h.closeIdle()
			}
		}
		p.applyMu.Unlock()
	})
	return nil
}

// dialHost connects to an endpoint: HBONE to podIP:hbone_port (CONNECT
// podIP:port, our own identity, requiring the endpoint's; over HTTP/3 when
// it advertises QUIC: dialTunnel) or plain TCP.
func (p *Proxy) dialHost(ctx context.Context, h *host) (net.Conn, error) {
	if h.spec.hbonePort != 0 {
		return p.dialTunnel(ctx, h, hbone.DialRequest{
			Source: p.cfg.Identity,
			Peers:  []spiffeid.ID{h.spec.identity},
			Addr:   netip.AddrPortFrom(h.spec.addr.Addr(), h.spec.hbonePort),
			Target: h.spec.addr,
		})
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", h.spec.addr.String())
}
