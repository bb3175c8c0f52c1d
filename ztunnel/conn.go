package ztunnel

import (
	"cmp"
	"context"
	"errors"
	"net"
	"net/netip"

	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/telemetry"
)

// Directions of a connection.
const (
	dirOutbound = telemetry.Outbound // from a local workload (capture or SOCKS5)
	dirInbound  = telemetry.Inbound  // to a local workload (HBONE or plaintext)
)

// conn is one proxied connection: its telemetry record (tracked for the
// admin dump, metrics, the access log and the drain) and what the handler
// resolved. Fields are written by the connection's handler before
// established is set and only read by others after.
type conn struct {
	telemetry.Conn

	// set by the handler as it learns them
	srcW, dstW *model.Workload
	service    *model.Service
	srcTrusted bool // Src is the client's real address (not an unverified claim)

	stopCancel func() bool // unhooks Cancel from the proxy's force close
}

// begin registers a connection and returns the context its handler runs
// under: it ends when ctx ends, when the proxy force-closes connections, or
// when the connection's pod leaves the node.
func (p *Proxy) begin(ctx context.Context, direction, via string, src, dst netip.AddrPort) (*conn, context.Context) {
	c := &conn{Conn: telemetry.Conn{Direction: direction, Via: via, Src: src, Dst: dst}}
	ctx, c.Cancel = context.WithCancel(ctx)
	c.stopCancel = context.AfterFunc(p.connCtx, c.Cancel)
	p.conns.Begin(&c.Conn)
	p.m.active.WithLabelValues(direction).Inc()
	return c, ctx
}

// fill copies what the handler resolved into c's telemetry record.
func (c *conn) fill() {
	c.Source = peer(c.srcW, c.Source)
	c.Destination = peer(c.dstW, c.Destination)
	if s := c.service; s != nil {
		c.Service = telemetry.Service{Hostname: s.Hostname, Name: s.Name, Namespace: s.Namespace}
	}
}

// peer names workload w (nil: unknown) with principal p.Principal, its
// canonical names as istiod-lite derived them or else from its labels.
func peer(w *model.Workload, p telemetry.Peer) telemetry.Peer {
	if w == nil {
		return telemetry.Peer{Principal: p.Principal}
	}
	name := cmp.Or(w.WorkloadName, w.Name)
	return telemetry.Peer{
		UID: w.UID, Pod: w.Name, Workload: name, Namespace: w.Namespace,
		CanonicalService:  cmp.Or(w.CanonicalName, telemetry.CanonicalService(w.Labels, name)),
		CanonicalRevision: cmp.Or(w.CanonicalRevision, telemetry.CanonicalRevision(w.Labels)),
		Cluster:           w.ClusterID,
		Principal:         p.Principal,
	}
}

// relay counts c as opened and established, then copies between client and
// upstream (relay.Joiner: the bounds on silent connections), adding bytes
// to the Istio counters as they move.
func (p *Proxy) relay(ctx context.Context, c *conn, client, upstream net.Conn) error {
	c.fill()
	c.Transport = transportOf(client, upstream)
	p.conns.Establish(&c.Conn)
	_, _, err := p.cfg.joiner().Join(ctx, client, upstream, c.Count)
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		err = nil // ended by the proxy or by the pod leaving, not failed
	}
	if p.connCtx.Err() != nil {
		return errors.Join(errForceClosed, err)
	}
	return err
}

// errForceClosed ends connections still open at the end of a drain.
var errForceClosed = errors.New("closed by proxy shutdown")

// end unregisters c, counts it closed with flags, and writes its access-log
// line. reason explains a refusal or failure; err is the error, if any.
func (p *Proxy) end(c *conn, flags, reason string, err error) {
	c.stopCancel()
	c.Cancel()
	p.m.active.WithLabelValues(c.Direction).Dec()
	if flags == flagNone && errors.Is(err, errForceClosed) {
		flags = flagAborted
	}
	if !c.Established() { // else relay filled it, and readers (the admin dump) see it as final
		c.fill()
	}
	p.conns.End(&c.Conn, flags, reason, err)
	if flags != flagNone && flags != flagAborted {
		p.m.denied.WithLabelValues(c.Direction, flags).Inc()
	}
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
