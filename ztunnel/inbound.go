package ztunnel

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/authz"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/model"
)

// localIdentity tells the HBONE server which identity to present for a
// connection to dst: the local enrolled workload that owns dst.
func (p *Proxy) localIdentity(dst netip.Addr) (spiffeid.ID, bool) {
	w := p.cfg.Store.Load().WorkloadByIP(dst)
	if w == nil || !w.Enrolled || !p.cfg.isLocal(w) {
		return spiffeid.ID{}, false
	}
	id := w.Identity()
	return id, !id.IsZero()
}

// serveHBONE handles one tunnel arriving on 15008: the target must be a
// local workload, a waypoint-bound target accepts only its waypoint's
// identity (401 otherwise: no bypass), the peer's identity must pass its
// policy (401 otherwise), and the workload must accept the connection from
// the client's address (503 otherwise) before the tunnel is answered 200.
func (p *Proxy) serveHBONE(ctx context.Context, r *hbone.Request) {
	src, srcW := p.hboneSource(r)
	c, ctx := p.begin(ctx, dirInbound, ListenerHBONE, src, r.Target)
	c.MTLS = true
	c.Source.Principal = r.Peer
	c.srcW = srcW
	c.srcTrusted = srcW != nil
	c.Route = "hbone"
	flags, reason, err := p.inboundHBONE(ctx, c, r)
	if flags != flagNone {
		status := http.StatusServiceUnavailable
		if flags == flagDeny {
			status = http.StatusUnauthorized
		}
		_ = r.Reject(status)
	}
	p.end(c, flags, reason, err)
}

// hboneSource is the client address a tunnel speaks for, and its workload.
// The forwarded header is only the peer's claim: it is believed when the
// mesh knows that address as a workload holding the peer's own identity (a
// ztunnel speaking for its pod). Otherwise the source is the tunnel's TCP
// peer, so that no identity can choose the address that ipBlocks rules match
// and the delivered connection comes from.
func (p *Proxy) hboneSource(r *hbone.Request) (netip.AddrPort, *model.Workload) {
	unmap := func(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }
	if claimed := r.Forwarded.For; claimed.IsValid() {
		if w := p.cfg.Store.Load().WorkloadByIP(claimed.Addr().Unmap()); w != nil && w.Identity() == r.Peer {
			return unmap(claimed), w
		}
	}
	return unmap(r.PeerAddr), nil
}

func (p *Proxy) inboundHBONE(ctx context.Context, c *conn, r *hbone.Request) (flags, reason string, err error) {
	snap, bind := p.snapshot()
	c.dstW = snap.WorkloadByIP(c.Dst.Addr())
	if c.dstW == nil || !c.dstW.Enrolled || !p.cfg.isLocal(c.dstW) {
		c.dstW = nil
		return flagNoDest, "target is not a local enrolled workload", nil
	}
	if p.isOwnListener(c.Dst) {
		// A workload address that is this host's own (plain hosts): the
		// proxy would deliver to itself, and again, without end.
		return flagNoDest, "target is one of the proxy's own listeners", nil
	}
	c.Destination.Principal = c.dstW.Identity()
	if p.draining.Load() {
		// Streams opened before the client saw our GOAWAY.
		return flagAborted, "proxy is draining", nil
	}
	if host := r.Forwarded.Host; host != "" {
		c.service = bind.byHost[host]
	}
	if why := bind.checkBypass(c.dstW, c.Dst, r.Peer); why != "" {
		p.m.bypassRefused.WithLabelValues(ListenerHBONE).Inc()
		return flagDeny, why, nil
	}
	d := p.az.Evaluate(snap, c.dstW, authz.Conn{SrcIdentity: r.Peer, SrcIP: c.Src.Addr(), DstPort: c.Dst.Port()})
	c.Policy = d.Policy
	if !d.Allow {
		return flagDeny, d.Reason, nil
	}
	upstream, err := p.deliver(ctx, c)
	if err != nil {
		return flagConnect, "local workload refused the connection", err
	}
	st, err := r.Accept()
	if err != nil {
		upstream.Close()
		return flagAborted, "tunnel closed before it was answered", err
	}
	return flagNone, "", p.relay(ctx, c, st, upstream)
}

// servePlaintextInbound handles a connection captured on 15006: plaintext
// to a local enrolled workload, whose original destination is the accepted
// socket's local address. A waypoint-bound target (a bypass: plaintext is
// never from its waypoint), PeerAuthentication STRICT or a policy refusing a
// peer without identity resets it.
func (p *Proxy) servePlaintextInbound(ctx context.Context, client net.Conn) {
	c, ctx := p.begin(ctx, dirInbound, ListenerInbound, addrPort(client.RemoteAddr()), addrPort(client.LocalAddr()))
	c.Route = "plaintext"
	flags, reason, err := p.plaintextInbound(ctx, c, client)
	if flags != flagNone {
		reset(client)
	}
	p.end(c, flags, reason, err)
}

func (p *Proxy) plaintextInbound(ctx context.Context, c *conn, client net.Conn) (flags, reason string, err error) {
	snap, bind := p.snapshot()
	c.srcW = snap.WorkloadByIP(c.Src.Addr())
	c.srcTrusted = true // the kernel's view of the peer
	c.dstW = snap.WorkloadByIP(c.Dst.Addr())
	if c.dstW == nil || !p.cfg.isLocal(c.dstW) {
		c.dstW = nil
		return flagNoDest, "destination is not a local workload", nil
	}
	c.Destination.Principal = c.dstW.Identity()
	if why := bind.checkBypass(c.dstW, c.Dst, spiffeid.ID{}); why != "" {
		// No identity at all: never its waypoint, whatever PeerAuthentication says.
		p.m.bypassRefused.WithLabelValues(ListenerInbound).Inc()
		return flagDeny, why, nil
	}
	d := p.az.AllowPlaintext(snap, c.dstW, authz.Conn{SrcIP: c.Src.Addr(), DstPort: c.Dst.Port()})
	c.Policy = d.Policy
	if !d.Allow {
		return flagDeny, d.Reason, nil
	}
	if p.isOwnListener(c.Dst) {
		return flagNoDest, "destination is one of the proxy's own listeners", nil
	}
	upstream, err := p.deliver(ctx, c)
	if err != nil {
		return flagConnect, "local workload refused the connection", err
	}
	return flagNone, "", p.relay(ctx, c, client, upstream)
}

// deliver connects to the local workload at c.Dst, from the client's own
// address when the proxy is transparent and that address is known for sure
// (else from the node's).
func (p *Proxy) deliver(ctx context.Context, c *conn) (net.Conn, error) {
	var src netip.Addr
	if p.cfg.Transparent && c.srcTrusted {
		src = c.Src.Addr()
	}
	c.Upstream = c.Dst
	dctx, cancel := context.WithTimeout(ctx, p.cfg.connectTimeout())
	defer cancel()
	up, err := dialer(src, p.cfg.Mark).DialContext(dctx, "tcp", c.Dst.String())
	if err != nil {
		return nil, fmt.Errorf("deliver to %s: %w", c.Dst, err)
	}
	return up, nil
}
