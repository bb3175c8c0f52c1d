package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/model"
)

// serveOutbound handles a connection captured on 15001: the original
// destination is the accepted socket's local address (IP_TRANSPARENT).
func (p *Proxy) serveOutbound(ctx context.Context, client net.Conn) {
	p.outbound(ctx, client, ListenerOutbound, addrPort(client.RemoteAddr()), addrPort(client.LocalAddr()), nil)
}

// outbound carries client, from src to the original destination dst, to
// where the model says. ready, if set, is called once with the upstream
// outcome (its response flags: flagNone on success) before any byte is
// relayed (SOCKS5 answers the client there); it may return an error to
// abandon the connection.
func (p *Proxy) outbound(ctx context.Context, client net.Conn, via string, src, dst netip.AddrPort, ready func(flags string) error) {
	c, ctx := p.begin(ctx, dirOutbound, via, src, dst)
	flags, reason, err := p.outboundConn(ctx, c, client, ready)
	if flags != flagNone && flags != flagAborted {
		if ready != nil {
			_ = ready(flags)
		}
		reset(client)
	}
	p.end(c, flags, reason, err)
}

func (p *Proxy) outboundConn(ctx context.Context, c *conn, client net.Conn, ready func(string) error) (flags, reason string, err error) {
	snap := p.cfg.Store.Load()
	c.srcW = snap.WorkloadByIP(c.Src.Addr())
	if c.srcW == nil || !p.cfg.isLocal(c.srcW) {
		return flagNoSource, "source address is not a workload on this node", nil
	}
	c.Source.Principal = c.srcW.Identity()
	if p.isOwnListener(c.Dst) {
		return flagNoRoute, "destination is one of the proxy's own listeners (a loop)", nil
	}
	route, err := Resolve(snap, c.srcW, c.Dst, nil)
	c.service, c.dstW = route.Service, route.Workload
	if err != nil {
		return flagNoRoute, "no route", err
	}
	c.Route = route.Kind.String()
	if route.Waypoint != nil {
		c.Route = "waypoint"
	}

	dctx, cancel := context.WithTimeout(ctx, p.cfg.connectTimeout())
	defer cancel()
	var upstream net.Conn
	switch route.Kind {
	case RoutePassthrough, RouteDirect:
		c.Upstream = route.Addr
		upstream, err = dialer(netip.Addr{}, p.cfg.Mark).DialContext(dctx, "tcp", route.Addr.String())
		if err != nil {
			return flagConnect, "upstream connect failed", fmt.Errorf("dial %s: %w", route.Addr, err)
		}
	case RouteHBONE:
		if p.dialer == nil {
			return flagConnect, "no certificates: cannot tunnel", nil
		}
		c.MTLS = true
		if len(route.Peers) > 0 {
			c.Destination.Principal = route.Peers[0]
		}
		c.Upstream = p.cfg.hboneDialAddr(route.Addr)
		req := hbone.DialRequest{
			Source:       c.Source.Principal,
			Peers:        route.Peers,
			Addr:         c.Upstream,
			Target:       route.Target,
			ForwardedFor: c.Src,
			Baggage:      baggage(c.srcW),
		}
		if route.Service != nil {
			req.Host = route.Service.Hostname
		}
		st, derr := p.dialer.Dial(dctx, req)
		if derr != nil {
			var se *hbone.StatusError
			if errors.As(derr, &se) && se.Code == http.StatusUnauthorized {
				return flagDeny, "denied by the destination's policy", derr
			}
			return flagConnect, "tunnel failed", derr
		}
		c.Destination.Principal = st.Peer()
		upstream = st
	}
	if ready != nil {
		if err := ready(flagNone); err != nil {
			upstream.Close()
			client.Close()
			return flagAborted, "client went away", err
		}
	}
	return flagNone, "", p.relay(ctx, c, client, upstream)
}

// baggage is the W3C baggage header Istio sends for w.
func baggage(w *model.Workload) string {
	if w == nil {
		return ""
	}
	name := w.WorkloadName
	kind := "deployment"
	if name == "" {
		name, kind = w.Name, "pod"
	}
	return hbone.Baggage{
		ClusterName:  w.ClusterID,
		Namespace:    w.Namespace,
		WorkloadKind: kind,
		WorkloadName: name,
		ServiceName:  w.CanonicalName,
		Version:      w.CanonicalRevision,
	}.String()
}
