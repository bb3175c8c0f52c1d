package ztunnel

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/ambit-mesh/ambit/bpf"
	"github.com/ambit-mesh/ambit/model"
)

// BPFCapture adapts the eBPF capture (package bpf) to Config.Capture: the
// node's enrolled workloads become the captured pods, found by the route to
// their first IPv4 address.
type BPFCapture struct {
	Capture *bpf.Capture
}

// Reconcile implements Capture.
func (b BPFCapture) Reconcile(ctx context.Context, pods []*model.Workload) error {
	desired := make([]bpf.Pod, 0, len(pods))
	for _, w := range pods {
		bp := bpf.Pod{Name: w.Namespace + "/" + w.Name}
		for _, a := range w.Addresses {
			if a.Is4() {
				bp.IPs = append(bp.IPs, a)
			}
		}
		if len(bp.IPs) > 0 {
			desired = append(desired, bp)
		}
	}
	return b.Capture.Reconcile(ctx, desired)
}

// Status implements CaptureStatus: the captured pods, the skipped ones
// with why, the programs' counters and the guard (bpf.Status).
func (b BPFCapture) Status() (any, error) { return b.Capture.Status() }

// closeConnsOf ends the established connections from or to the workloads
// in uids and waits (up to timeout) until their sockets are closed: pods
// leaving capture must not hold proxied connections, since once released
// their packets no longer reach the proxy's sockets. A connection still
// being set up is not matched (its workloads are not final yet); it fails
// on its own once capture no longer carries its packets.
func (p *Proxy) closeConnsOf(uids map[string]bool, timeout time.Duration) int {
	if len(uids) == 0 {
		return 0
	}
	var ids []uint64
	for _, tc := range p.conns.Conns() {
		if !tc.Established() { // the handler's fields are final once established
			continue
		}
		if uids[tc.Source.UID] || uids[tc.Destination.UID] {
			tc.Cancel()
			ids = append(ids, tc.ID)
		}
	}
	deadline := time.Now().Add(timeout)
	for _, id := range ids {
		for p.conns.Open(id) && !time.Now().After(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
	}
	return len(ids)
}

// isOwnListener reports whether dst is one of the proxy's capture or HBONE
// listeners: a captured connection to it would loop.
func (p *Proxy) isOwnListener(dst netip.AddrPort) bool {
	for _, name := range []string{ListenerOutbound, ListenerInbound, ListenerHBONE, ListenerSOCKS5} {
		ln := p.listeners[name]
		if ln == nil {
			continue
		}
		la := addrPort(ln.Addr())
		if la.Port() != dst.Port() {
			continue
		}
		if la.Addr() == dst.Addr() || dst.Addr().IsLoopback() || (la.Addr().IsUnspecified() && isLocalAddr(dst.Addr())) {
			return true
		}
	}
	return false
}

// isLocalAddr reports whether a is assigned to an interface here. It asks
// the kernel (a netlink dump of every address) at most once per
// localAddrsTTL and answers from that list meanwhile: it runs for every
// plain connection of a transparent proxy and every connection to a
// listener's port.
func isLocalAddr(a netip.Addr) bool {
	return localAddrs.has(a, time.Now())
}

// localAddrsTTL is how long isLocalAddr trusts its list of the host's
// addresses: an address added to an interface counts as local at most this
// long after.
const localAddrsTTL = time.Second

// localAddrs is isLocalAddr's list.
var localAddrs addrCache

// addrCache is the host's interface addresses, listed at most once per
// localAddrsTTL. mu guards the fields.
type addrCache struct {
	mu    sync.Mutex
	at    time.Time // when addrs was listed; zero: never
	addrs []netip.Addr
}

// has reports whether a is in the list, listing the addresses again if
// the list is older than localAddrsTTL at now.
func (c *addrCache) has(a netip.Addr, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.at.IsZero() || now.Sub(c.at) >= localAddrsTTL || now.Before(c.at) {
		ifas, err := net.InterfaceAddrs()
		if err != nil {
			return false
		}
		c.addrs = c.addrs[:0]
		for _, ia := range ifas {
			if n, ok := ia.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok {
					c.addrs = append(c.addrs, ip.Unmap())
				}
			}
		}
		c.at = now
	}
	return slices.Contains(c.addrs, a)
}
