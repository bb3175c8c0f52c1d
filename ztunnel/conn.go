package ztunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/model"
)

// Directions of a connection.
const (
	dirOutbound = "outbound" // from a local workload (capture or SOCKS5)
	dirInbound  = "inbound"  // to a local workload (HBONE or plaintext)
)

// conn is one proxied connection, tracked for the admin dump, metrics, the
// access log and the drain. Fields other than the counters are written by
// the connection's handler before established is set and only read after.
type conn struct {
	id        uint64
	direction string
	via       string // listener: outbound, socks5, hbone, inbound
	start     time.Time
	src, dst  netip.AddrPort // client address and original destination

	// set by the handler as it learns them
	srcW, dstW   *model.Workload
	srcID, dstID spiffeid.ID
	service      *model.Service
	route        string         // passthrough, direct, hbone, waypoint
	upstream     netip.AddrPort // the address connected to
	mtls         bool
	srcTrusted   bool // src is the client's real address (not an unverified claim)

	cancel     context.CancelFunc // ends the connection (relay closes both sides)
	stopCancel func() bool        // unhooks cancel from the proxy's force close

	established atomic.Bool
	received    atomic.Int64 // client -> upstream
	sent        atomic.Int64 // upstream -> client
	opened      bool         // istio_tcp_connections_opened_total counted; handler goroutine only
}

// begin registers a connection and returns the context its handler runs
// under: it ends when ctx ends, when the proxy force-closes connections, or
// when the connection's pod leaves the node.
func (p *Proxy) begin(ctx context.Context, direction, via string, src, dst netip.AddrPort) (*conn, context.Context) {
	c := &conn{direction: direction, via: via, start: time.Now(), src: src, dst: dst}
	ctx, c.cancel = context.WithCancel(ctx)
	c.stopCancel = context.AfterFunc(p.connCtx, c.cancel)
	p.mu.Lock()
	p.nextID++
	c.id = p.nextID
	p.conns[c.id] = c
	p.mu.Unlock()
	p.m.active.WithLabelValues(direction).Inc()
	return c, ctx
}

// labels returns the Istio label values for c with response flags.
func (p *Proxy) labels(c *conn, flags string) prometheus.Labels {
	reporter := "source"
	if c.direction == dirInbound {
		reporter = "destination"
	}
	security := "none"
	if c.mtls {
		security = "mutual_tls"
	}
	srcName, srcNS := workloadLabels(c.srcW)
	dstName, dstNS := workloadLabels(c.dstW)
	svc := "unknown"
	if c.service != nil {
		svc = c.service.Hostname
	}
	return prometheus.Labels{
		"reporter":                       reporter,
		"source_workload":                srcName,
		"source_workload_namespace":      srcNS,
		"source_principal":               principal(c.srcID),
		"destination_workload":           dstName,
		"destination_workload_namespace": dstNS,
		"destination_principal":          principal(c.dstID),
		"destination_service":            svc,
		"response_flags":                 flags,
		"connection_security_policy":     security,
	}
}

func workloadLabels(w *model.Workload) (name, namespace string) {
	if w == nil {
		return "unknown", "unknown"
	}
	name = w.WorkloadName
	if name == "" {
		name = w.Name
	}
	return name, w.Namespace
}

func principal(id spiffeid.ID) string {
	if id.IsZero() {
		return "unknown"
	}
	return id.String()
}

// relay counts c as opened and established, then copies between client and
// upstream (see relay), adding bytes to the Istio counters as they move.
func (p *Proxy) relay(ctx context.Context, c *conn, client, upstream net.Conn) error {
	l := p.labels(c, flagNone)
	p.countOpened(c, l)
	rx, tx := p.m.received.With(l), p.m.sent.With(l)
	c.established.Store(true)
	err := relay(ctx, client, upstream, &c.received, &c.sent, func(r, t int64) {
		if r > 0 {
			rx.Add(float64(r))
		}
		if t > 0 {
			tx.Add(float64(t))
		}
	})
	if p.connCtx.Err() != nil {
		return errors.Join(errForceClosed, err)
	}
	return err
}

// errForceClosed ends connections still open at the end of a drain.
var errForceClosed = errors.New("closed by proxy shutdown")

func (p *Proxy) countOpened(c *conn, l prometheus.Labels) {
	if !c.opened {
		c.opened = true
		p.m.opened.With(l).Inc()
	}
}

// end unregisters c, counts it closed with flags, and writes its access-log
// line. reason explains a refusal or failure; err is the error, if any.
func (p *Proxy) end(c *conn, flags, reason string, err error) {
	c.stopCancel()
	c.cancel()
	p.mu.Lock()
	delete(p.conns, c.id)
	p.mu.Unlock()
	p.m.active.WithLabelValues(c.direction).Dec()
	if flags == flagNone && errors.Is(err, errForceClosed) {
		flags = flagAborted
	}
	l := p.labels(c, flags)
	p.countOpened(c, l)
	p.m.closed.With(l).Inc()
	if flags != flagNone && flags != flagAborted {
		p.m.denied.WithLabelValues(c.direction, flags).Inc()
	}

	attrs := []any{
		"id", c.id, "direction", c.direction, "via", c.via,
		"src", c.src.String(), "dst", c.dst.String(),
		"src_principal", principal(c.srcID), "dst_principal", principal(c.dstID),
		"src_workload", l["source_workload_namespace"] + "/" + l["source_workload"],
		"dst_workload", l["destination_workload_namespace"] + "/" + l["destination_workload"],
		"service", l["destination_service"],
		"route", c.route,
		"bytes_received", c.received.Load(), "bytes_sent", c.sent.Load(),
		"duration", time.Since(c.start).Round(time.Microsecond).String(),
		"outcome", outcome(flags),
	}
	if c.upstream.IsValid() {
		attrs = append(attrs, "upstream", c.upstream.String())
	}
	if reason != "" {
		attrs = append(attrs, "reason", reason)
	}
	if err != nil {
		attrs = append(attrs, "err", err.Error())
	}
	p.log.Info("connection", attrs...)
}

func outcome(flags string) string {
	switch flags {
	case flagNone:
		return "ok"
	case flagDeny:
		return "denied"
	case flagAborted:
		return "aborted"
	}
	return "failed"
}

// reset closes c with an RST instead of a FIN, so the client sees the
// refusal as one.
func reset(c net.Conn) {
	if pc, ok := c.(*prefixConn); ok {
		c = pc.Conn
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// addrPort returns a's IP and port (v4-mapped addresses unmapped).
func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
