package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

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
	if err == nil && route.Kind == RoutePassthrough && p.cfg.inPodCIDRs(c.Dst.Addr()) {
		// A pod the config does not know yet: never in clear.
		route, err = p.awaitDestination(ctx, snap, c.srcW, c.Src.Addr(), c.Dst)
		if errors.Is(err, errUnknownDestination) {
			return flagNoRoute, "destination in the pod CIDRs is unknown to the config", err
		}
		if err != nil && ctx.Err() != nil {
			return flagAborted, "closed while waiting for the destination", err
		}
	}
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
		upstream, err = dialer(p.plainSource(c, route.Addr.Addr()), p.cfg.Mark).DialContext(dctx, "tcp", route.Addr.String())
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

// plainSource is the address that plain TCP (passthrough, or direct to a
// workload outside the mesh) leaves from: the pod's own, for a connection
// captured from a local pod when the proxy is transparent, so that
// NetworkPolicy, IP allowlists and the destination see the pod, not the
// node (which Kubernetes always lets reach its pods). Replies come back to
// the proxy's socket: the capture matches segments to a pod's address with
// the proxy's established sockets first (on the uplink, and on the veth of
// a pod of this node). The zero Addr (the node's address) otherwise: for
// SOCKS5 clients (a process of this host), and for a destination on this
// host, whose replies to the pod's address would be routed to the pod
// instead of the proxy.
func (p *Proxy) plainSource(c *conn, dst netip.Addr) netip.Addr {
	if !p.cfg.Transparent || c.Via != ListenerOutbound || c.srcW == nil {
		return netip.Addr{}
	}
	if dst.IsLoopback() || dst.IsUnspecified() || isLocalAddr(dst) {
		return netip.Addr{}
	}
	return c.Src.Addr()
}

// errUnknownDestination fails an outbound connection to a destination in
// the pod CIDRs that the config did not learn in time.
var errUnknownDestination = errors.New("unknown destination in the pod CIDRs")

// unknownWaitPoll is how often a waiting connection looks for a new config.
const unknownWaitPoll = 20 * time.Millisecond

// awaitDestination waits (Config.UnknownDestinationWait) for a config
// newer than snap to resolve dst to something other than a passthrough,
// and returns that route (or Resolve's error). It fails with
// errUnknownDestination when the wait ends first, when waiting is off, or
// when too many connections wait already (maxUnknownWaits on the node,
// maxUnknownWaitsPerSource from srcAddr); with ctx's error if ctx ends.
func (p *Proxy) awaitDestination(ctx context.Context, snap *model.Snapshot, src *model.Workload, srcAddr netip.Addr, dst netip.AddrPort) (Route, error) {
	wait := positive(p.cfg.UnknownDestinationWait, DefaultUnknownDestinationWait)
	if wait == 0 {
		return Route{}, errUnknownDestination
	}
	if p.unknownWaits.Add(1) > maxUnknownWaits {
		p.unknownWaits.Add(-1)
		return Route{}, fmt.Errorf("%w: too many connections waiting", errUnknownDestination)
	}
	defer p.unknownWaits.Add(-1)
	// Each source gets a share of the node's slots: one pod scanning the
	// pod CIDRs cannot take them all from the node's other pods.
	if !p.unknownWaitsBySrc.take(srcAddr, maxUnknownWaitsPerSource) {
		return Route{}, fmt.Errorf("%w: too many connections of %s waiting", errUnknownDestination, srcAddr)
	}
	defer p.unknownWaitsBySrc.give(srcAddr)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	tick := time.NewTicker(unknownWaitPoll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return Route{}, ctx.Err()
		case <-timer.C:
			return Route{}, fmt.Errorf("%w: not learned within %v", errUnknownDestination, wait)
		case <-tick.C:
		}
		cur := p.cfg.Store.Load()
		if cur == snap {
			continue
		}
		snap = cur
		route, err := Resolve(snap, src, dst, nil)
		if err != nil || route.Kind != RoutePassthrough {
			return route, err
		}
	}
}

// waitShares counts, per source address, the connections waiting for an
// unknown destination. The zero value is ready to use.
type waitShares struct {
	mu sync.Mutex // guards n
	n  map[netip.Addr]int
}

// take counts one more waiting connection of src, unless src has max
// waiting already; it reports whether it did.
func (w *waitShares) take(src netip.Addr, max int) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n[src] >= max {
		return false
	}
	if w.n == nil {
		w.n = map[netip.Addr]int{}
	}
	w.n[src]++
	return true
}

// give ends one waiting connection of src counted by take.
func (w *waitShares) give(src netip.Addr) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n[src]--; w.n[src] <= 0 {
		delete(w.n, src)
	}
}

// waiting returns how many connections of src wait.
func (w *waitShares) waiting(src netip.Addr) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.n[src]
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
