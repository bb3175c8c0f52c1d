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
// local workload, the peer's identity must pass its policy (401 otherwise),
// and the workload must accept the connection from the client's address
// (503 otherwise) before the tunnel is answered 200.
func (p *Proxy) serveHBONE(ctx context.Context, r *hbone.Request) {
	src := r.Forwarded.For
	if !src.IsValid() {
		src = r.PeerAddr
	}
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	c, ctx := p.begin(ctx, dirInbound, ListenerHBONE, src, r.Target)
	c.mtls = true
	c.srcID = r.Peer
	c.route = "hbone"
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

func (p *Proxy) inboundHBONE(ctx context.Context, c *conn, r *hbone.Request) (flags, reason string, err error) {
	snap := p.cfg.Store.Load()
	if w := snap.WorkloadByIP(c.src.Addr()); w != nil && w.Identity() == r.Peer {
		c.srcW = w
	}
	c.dstW = snap.WorkloadByIP(c.dst.Addr())
	if c.dstW == nil || !c.dstW.Enrolled || !p.cfg.isLocal(c.dstW) {
		c.dstW = nil
		return flagNoDest, "target is not a local enrolled workload", nil
	}
	c.dstID = c.dstW.Identity()
	if p.draining.Load() {
		// Streams opened before the client saw our GOAWAY.
		return flagAborted, "proxy is draining", nil
	}
	if host := r.Forwarded.Host; host != "" {
		for _, s := range snap.Services {
			if s.Hostname == host {
				c.service = s
				break
			}
		}
	}
	d := p.az.Evaluate(snap, c.dstW, authz.Conn{SrcIdentity: r.Peer, SrcIP: c.src.Addr(), DstPort: c.dst.Port()})
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
// socket's local address. PeerAuthentication STRICT or a policy refusing a
// peer without identity resets it.
func (p *Proxy) servePlaintextInbound(ctx context.Context, client net.Conn) {
	c, ctx := p.begin(ctx, dirInbound, ListenerInbound, addrPort(client.RemoteAddr()), addrPort(client.LocalAddr()))
	c.route = "plaintext"
	flags, reason, err := p.plaintextInbound(ctx, c, client)
	if flags != flagNone {
		reset(client)
	}
	p.end(c, flags, reason, err)
}

func (p *Proxy) plaintextInbound(ctx context.Context, c *conn, client net.Conn) (flags, reason string, err error) {
	snap := p.cfg.Store.Load()
	c.srcW = snap.WorkloadByIP(c.src.Addr())
	c.dstW = snap.WorkloadByIP(c.dst.Addr())
	if c.dstW == nil || !p.cfg.isLocal(c.dstW) {
		c.dstW = nil
		return flagNoDest, "destination is not a local workload", nil
	}
	c.dstID = c.dstW.Identity()
	d := p.az.AllowPlaintext(snap, c.dstW, authz.Conn{SrcIP: c.src.Addr(), DstPort: c.dst.Port()})
	if !d.Allow {
		return flagDeny, d.Reason, nil
	}
	upstream, err := p.deliver(ctx, c)
	if err != nil {
		return flagConnect, "local workload refused the connection", err
	}
	return flagNone, "", p.relay(ctx, c, client, upstream)
}

// deliver connects to the local workload at c.dst, from the client's own
// address when the proxy is transparent.
func (p *Proxy) deliver(ctx context.Context, c *conn) (net.Conn, error) {
	var src netip.Addr
	if p.cfg.Transparent {
		src = c.src.Addr()
	}
	c.upstream = c.dst
	dctx, cancel := context.WithTimeout(ctx, p.cfg.connectTimeout())
	defer cancel()
	up, err := dialer(src, p.cfg.Mark).DialContext(dctx, "tcp", c.dst.String())
	if err != nil {
		return nil, fmt.Errorf("deliver to %s: %w", c.dst, err)
	}
	return up, nil
}
