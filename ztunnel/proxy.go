package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/authz"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/telemetry"
)

// Listener names, for Addr.
const (
	ListenerOutbound = "outbound"
	ListenerInbound  = "inbound"
	ListenerHBONE    = "hbone"
	ListenerSOCKS5   = "socks5"
	ListenerAdmin    = "admin"
	ListenerMetrics  = "metrics"
	ListenerReady    = "readiness"
)

// Proxy is a running ztunnel. Make it with New, serve with Run, stop with
// Close (or by ending Run's context).
type Proxy struct {
	cfg    Config
	log    *slog.Logger
	m      *metrics
	az     authz.Evaluator
	dialer tunnelDialer  // nil without Certs; *hbone.Dialer, or quicDialer (Config.QUIC)
	hbone  *hbone.Server // nil without Certs or HBONEAddr
	http   []*http.Server
	// listeners are opened by New and never reassigned.
	listeners map[string]net.Listener

	// HBONE over HTTP/3 on the HBONE address's UDP port (Config.QUIC; quic.go).
	quic     *h3.Server     // nil without Certs, HBONEAddr or QUIC
	quicConn net.PacketConn // its socket

	// connCtx is the parent of every connection's context; forceClose ends
	// them all (at the end of a drain).
	connCtx    context.Context
	forceClose context.CancelFunc

	unknownWaits      atomic.Int32 // outbound connections waiting for an unknown destination (outbound.go)
	unknownWaitsBySrc waitShares   // the same, per source address

	configured atomic.Bool // the store changed after New
	captured   atomic.Bool // Capture (if any) reconciled once
	serving    atomic.Bool // Run has started every listener
	draining   atomic.Bool // shutdown started

	quit         chan struct{} // closed by Close
	quitOnce     sync.Once
	shutdownOnce sync.Once
	runDone      chan struct{}  // closed when Run returns
	wg           sync.WaitGroup // accept loops, connection handlers, servers, the config watcher

	// conns are the open connections: metrics, access log, admin dump.
	conns telemetry.Tracker

	// bind is the bindings index of the newest snapshot indexed (see
	// snapshot); bindMu serializes its builds.
	bind   atomic.Pointer[bindings]
	bindMu sync.Mutex

	mu      sync.Mutex // guards started
	started bool
}

// New checks cfg and opens the configured listeners; the proxy serves
// nothing until Run.
func New(ctx context.Context, cfg Config) (_ *Proxy, err error) {
	if cfg.Store == nil {
		return nil, errors.New("ztunnel: config has no Store")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{
		cfg:       cfg,
		log:       log,
		m:         newMetrics(),
		az:        authz.Evaluator{RootNamespace: cfg.RootNamespace},
		listeners: map[string]net.Listener{},
		quit:      make(chan struct{}),
		runDone:   make(chan struct{}),
	}
	p.conns.Metrics, p.conns.Logger = p.m.tcp, log
	p.conns.Flows = &telemetry.Flows{Node: cfg.Node}
	p.connCtx, p.forceClose = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			p.forceClose()
			for _, ln := range p.listeners {
				ln.Close()
			}
		}
	}()
	for _, l := range []struct {
		name, addr  string
		transparent bool
	}{
		{ListenerOutbound, cfg.OutboundAddr, cfg.Transparent},
		{ListenerInbound, cfg.InboundAddr, cfg.Transparent},
		{ListenerHBONE, cfg.HBONEAddr, cfg.Transparent},
		{ListenerSOCKS5, cfg.SOCKS5Addr, false},
		{ListenerAdmin, cfg.AdminAddr, false},
		{ListenerMetrics, cfg.MetricsAddr, false},
		{ListenerReady, cfg.ReadyAddr, false},
	} {
		if l.addr == "" {
			continue
		}
		var mark uint32
		if l.transparent { // the capture listeners: see listen
			mark = cfg.Mark
		}
		ln, err := listen(ctx, l.addr, l.transparent, mark)
		if err != nil {
			return nil, fmt.Errorf("ztunnel: %s: %w", l.name, err)
		}
		p.listeners[l.name] = ln
		if l.name == ListenerAdmin && !addrPort(ln.Addr()).Addr().IsLoopback() {
			return nil, fmt.Errorf("ztunnel: the admin listener must be on localhost, not %s", ln.Addr())
		}
	}
	if cfg.Certs != nil {
		p.dialer, err = p.setupQUIC(ctx, &hbone.Dialer{Certs: cfg.Certs, Logger: log, DialContext: p.dialTCP})
		if err != nil {
			return nil, err
		}
		if _, ok := p.listeners[ListenerHBONE]; ok {
			p.hbone = &hbone.Server{
				Certs:         cfg.Certs,
				LocalIdentity: p.localIdentity,
				Handler:       hbone.HandlerFunc(p.serveHBONE),
				BaseContext:   func(net.Listener) context.Context { return p.connCtx },
				OnReject:      p.hboneRejected,
				Logger:        log.With("component", "hbone"),
			}
		}
	} else if _, ok := p.listeners[ListenerHBONE]; ok {
		return nil, errors.New("ztunnel: an HBONE listener needs Certs")
	}
	return p, nil
}

// Addr returns the address a listener is bound to (nil if not configured).
func (p *Proxy) Addr(name string) net.Addr {
	if ln := p.listeners[name]; ln != nil {
		return ln.Addr()
	}
	return nil
}

// Gatherer returns the proxy's Prometheus registry (served on MetricsAddr).
func (p *Proxy) Gatherer() prometheus.Gatherer { return p.m.reg }

// Ready reports what the readiness endpoint reports: listeners serving,
// config received, not draining.
func (p *Proxy) Ready() bool {
	return p.serving.Load() && !p.draining.Load() && p.synced()
}

func (p *Proxy) synced() bool {
	if p.cfg.Capture != nil && !p.captured.Load() {
		return false
	}
	return p.haveConfig()
}

// haveConfig reports whether the config source has delivered a first
// config. Until then the store's emptiness means "not known yet", not "no
// pods": acting on it would release the capture that a restarted proxy
// inherited from its pins, and let enrolled pods' traffic out uncaptured.
func (p *Proxy) haveConfig() bool {
	if p.cfg.Synced != nil {
		return p.cfg.Synced()
	}
	return p.configured.Load() || len(p.cfg.Store.Load().Workloads) > 0
}

// Run serves until ctx ends or Close is called, then drains: it stops
// accepting, lets open connections finish until Config.DrainTimeout, closes
// what remains and returns. It returns nil after a drain, or an error if
// the proxy was already running or closed.
func (p *Proxy) Run(ctx context.Context) error {
	p.mu.Lock()
	if p.started {
		p.mu.Unlock()
		return errors.New("ztunnel: Run called twice")
	}
	p.started = true
	p.mu.Unlock()
	defer close(p.runDone)
	select {
	case <-p.quit:
		p.shutdown(ctx)
		return errors.New("ztunnel: proxy closed")
	default:
	}

	changed := p.cfg.Store.Changed()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.watchConfig(changed)
	}()
	p.startListeners()
	p.serving.Store(true)
	p.log.Info("ztunnel serving", "listeners", p.addrs())

	select {
	case <-ctx.Done():
	case <-p.quit:
	}
	p.shutdown(ctx)
	return nil
}

// Close stops the proxy at once (without waiting for connections to finish)
// and waits for its goroutines. It is idempotent.
func (p *Proxy) Close() error {
	p.quitOnce.Do(func() {
		p.draining.Store(true)
		close(p.quit)
		p.forceClose()
	})
	p.mu.Lock()
	started := p.started
	p.mu.Unlock()
	if started {
		<-p.runDone
	} else {
		p.shutdown(p.connCtx)
	}
	return nil
}

func (p *Proxy) addrs() map[string]string {
	m := map[string]string{}
	for name, ln := range p.listeners {
		m[name] = ln.Addr().String()
	}
	return m
}

func (p *Proxy) startListeners() {
	serve := func(name string, handle func(ctx context.Context, c net.Conn)) {
		ln := p.listeners[name]
		if ln == nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.acceptLoop(name, ln, handle)
		}()
	}
	serve(ListenerOutbound, p.serveOutbound)
	serve(ListenerInbound, p.servePlaintextInbound)
	serve(ListenerSOCKS5, p.serveSOCKS5)
	if p.hbone != nil {
		ln := p.listeners[ListenerHBONE]
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if err := p.hbone.Serve(ln); err != nil && !errors.Is(err, hbone.ErrServerClosed) {
				p.log.Error("hbone server stopped", "err", err)
			}
		}()
	}
	p.serveQUIC()
	for name, h := range map[string]http.Handler{
		ListenerAdmin:   p.adminHandler(),
		ListenerMetrics: p.metricsHandler(),
		ListenerReady:   p.readyHandler(),
	} {
		ln := p.listeners[name]
		if ln == nil {
			continue
		}
		srv := &http.Server{
			Handler:           h,
			ReadHeaderTimeout: 10 * time.Second,
			BaseContext:       func(net.Listener) context.Context { return p.connCtx },
			ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		}
		p.http = append(p.http, srv)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				p.log.Error("http server stopped", "listener", name, "err", err)
			}
		}()
	}
}

func (p *Proxy) acceptLoop(name string, ln net.Listener, handle func(ctx context.Context, c net.Conn)) {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off, keep serving.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			p.log.Warn("accept failed", "listener", name, "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-p.quit:
				return
			}
		}
		backoff = 0
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			handle(p.connCtx, c)
		}()
	}
}

// shutdown drains and stops everything; it runs once.
func (p *Proxy) shutdown(ctx context.Context) {
	p.shutdownOnce.Do(func() {
		p.draining.Store(true)
		for _, name := range []string{ListenerOutbound, ListenerInbound, ListenerSOCKS5} {
			if ln := p.listeners[name]; ln != nil {
				ln.Close()
			}
		}
		if p.serving.Load() {
			p.log.Info("ztunnel draining", "connections", p.connCount(), "deadline", p.cfg.drainTimeout().String())
		}
		drainCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.drainTimeout())
		go func() {
			select {
			case <-drainCtx.Done():
			case <-p.quit:
			}
			cancel()
		}()
		if p.hbone != nil && p.serving.Load() {
			// Stop accepting tunnels (GOAWAY) and wait for streams.
			_ = p.hbone.Shutdown(drainCtx)
		}
		if p.serving.Load() {
			p.shutdownQUIC(drainCtx)
		}
		p.waitIdle(drainCtx)
		cancel()
		if n := p.connCount(); n > 0 {
			p.log.Warn("drain deadline reached: closing connections", "connections", n)
		}
		p.forceClose()
		if p.hbone != nil {
			p.hbone.Close()
		}
		p.closeQUIC()
		for _, srv := range p.http {
			srv.Close()
		}
		for _, ln := range p.listeners {
			ln.Close()
		}
		p.wg.Wait()
		if p.dialer != nil {
			p.dialer.Close()
		}
		p.serving.Store(false)
	})
}

// waitIdle returns when no connection is open or ctx ends.
func (p *Proxy) waitIdle(ctx context.Context) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for p.connCount() > 0 {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (p *Proxy) connCount() int { return p.conns.Len() }

// watchConfig keeps the certificate identities and the capture in step
// with the node's workloads. A failed capture reconcile is retried.
func (p *Proxy) watchConfig(changed <-chan struct{}) {
	var last []spiffeid.ID
	var lastPods []string // UIDs, sorted
	var retry <-chan time.Time
	for {
		if !p.haveConfig() {
			// Nothing to act on yet; the source's first config may land
			// between its store update and its synced flag, so look again.
			select {
			case <-changed:
				p.configured.Store(true)
			case <-time.After(50 * time.Millisecond):
			case <-p.quit:
				return
			case <-p.connCtx.Done():
				return
			}
			continue
		}
		snap, _ := p.snapshot() // indexes the new config before connections need it
		ids, pods := p.localWorkloads(snap)
		if setter, ok := p.cfg.Certs.(interface{ SetIdentities([]spiffeid.ID) }); ok && !slices.Equal(ids, last) {
			setter.SetIdentities(ids)
			last = ids
		}
		if p.cfg.Capture != nil {
			uids := make([]string, len(pods))
			for i, w := range pods {
				uids[i] = w.UID
			}
			if !p.captured.Load() || !slices.Equal(uids, lastPods) {
				gone := map[string]bool{}
				for _, uid := range lastPods {
					if _, found := slices.BinarySearch(uids, uid); !found {
						gone[uid] = true
					}
				}
				if n := p.closeConnsOf(gone, 5*time.Second); n > 0 {
					p.log.Info("closed connections of pods leaving capture", "connections", n, "pods", len(gone))
				}
				retry = nil
				if err := p.cfg.Capture.Reconcile(p.connCtx, pods); err != nil {
					p.log.Error("capture reconcile failed; retrying", "err", err)
					retry = time.After(time.Second)
				} else {
					lastPods = uids
					p.captured.Store(true)
					p.log.Info("capture reconciled", "pods", len(pods))
				}
			}
		}
		select {
		case <-changed:
			p.configured.Store(true)
		case <-retry:
		case <-p.quit:
			return
		case <-p.connCtx.Done():
			return
		}
	}
}

// localWorkloads returns the identities (sorted, unique) and the workloads
// (sorted by UID) of the node's enrolled workloads.
func (p *Proxy) localWorkloads(snap *model.Snapshot) ([]spiffeid.ID, []*model.Workload) {
	var pods []*model.Workload
	seen := map[spiffeid.ID]bool{}
	var ids []spiffeid.ID
	for _, w := range snap.Workloads {
		if !w.Enrolled || !p.cfg.isLocal(w) {
			continue
		}
		pods = append(pods, w)
		if id := w.Identity(); !id.IsZero() && !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	slices.SortFunc(ids, func(a, b spiffeid.ID) int { return strings.Compare(a.String(), b.String()) })
	slices.SortFunc(pods, func(a, b *model.Workload) int { return strings.Compare(a.UID, b.UID) })
	return ids, pods
}

// dialTCP dials with the proxy's socket mark (the HBONE dialer's
// DialContext).
func (p *Proxy) dialTCP(ctx context.Context, network, addr string) (net.Conn, error) {
	return dialer(netip.Addr{}, p.cfg.Mark).DialContext(ctx, network, addr)
}

var _ io.Closer = (*Proxy)(nil)
