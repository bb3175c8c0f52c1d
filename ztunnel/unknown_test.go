package ztunnel

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/model"
)

// TestUnknownPodDestination: a destination inside the pod CIDRs that the
// config does not know is never passed through in clear. The connection
// waits for the config: when the pod is learned in time it is tunnelled
// (HBONE) like any pod of the mesh; when it is not, it is reset, and the
// server listening at that address never sees a byte. Outside the pod
// CIDRs, unknown destinations still pass through.
func TestUnknownPodDestination(t *testing.T) {
	const wait = 700 * time.Millisecond
	m := newTestMesh(t, nil)
	// node1's proxy, again, with the pod CIDRs (the mesh's own node1 is
	// left unused): tunnels go to node2, which holds the pods.
	n1 := startNode(t, "node1", m.store, m.certs, func(c *Config) {
		c.HBONEDialAddr = func(a netip.AddrPort) netip.AddrPort {
			return netip.AddrPortFrom(a.Addr(), m.n2.port(ListenerHBONE))
		}
		c.PodCIDRs = []netip.Prefix{netip.PrefixFrom(m.net.ip(64), 26)} // .64 - .127
		c.UnknownDestinationWait = wait
	})
	ip := m.net.ip
	late := startServer(t, netip.AddrPortFrom(ip(70), 8080))
	unknown := startServer(t, netip.AddrPortFrom(ip(71), 8080))
	socks := n1.p.Addr(ListenerSOCKS5)

	t.Run("never learned: reset, nothing in clear", func(t *testing.T) {
		start := time.Now()
		c, err := socksDial(socks, ip(11), netip.AddrPortFrom(ip(71), 8080).String())
		if err == nil {
			_, xerr := exchange(c, 1000, 1000, 3)
			t.Fatalf("connected to an unknown pod address (exchange: %v): passed through in clear", xerr)
		}
		took := time.Since(start)
		var se *socksReplyError
		if !errors.As(err, &se) {
			t.Fatalf("dial: %v, want a SOCKS5 refusal", err)
		}
		if took < wait || took > wait+2*time.Second {
			t.Errorf("refused after %v, want after the %v wait", took, wait)
		}
		if n := len(unknown.all()); n != 0 {
			t.Errorf("the server at the unknown address got %d connections", n)
		}
		waitFor(t, "the access log", func() bool {
			l := n1.logs.String()
			return strings.Contains(l, "destination in the pod CIDRs is unknown to the config") && strings.Contains(l, `"outcome":"failed"`)
		})
	})

	t.Run("learned while waiting: tunnelled", func(t *testing.T) {
		pod := &model.Workload{UID: "test/Pod/shop/late", Name: "late", Namespace: "shop", ServiceAccount: "late", Node: "node2",
			Addresses: []netip.Addr{ip(70)}, Enrolled: true, Ready: true}
		type result struct {
			sum [32]byte
			err error
		}
		done := make(chan result, 1)
		go func() {
			c, err := socksDial(socks, ip(11), netip.AddrPortFrom(ip(70), 8080).String())
			if err != nil {
				done <- result{err: err}
				return
			}
			sum, err := exchange(c, 64<<10, 32<<10, 4)
			done <- result{sum, err}
		}()
		// The connection is waiting (the proxy holds it) before the pod
		// is learned.
		waitFor(t, "the connection to wait", func() bool { return n1.p.unknownWaits.Load() == 1 })
		m.store.Apply(&model.Delta{Workloads: []*model.Workload{pod}})
		var r result
		select {
		case r = <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("no outcome")
		}
		if r.err != nil {
			t.Fatalf("connection to a pod learned during the wait: %v", r.err)
		}
		waitFor(t, "the server's result", func() bool { return len(late.all()) == 1 })
		if got := late.all()[0]; got.sum != r.sum || got.peer.Addr() != ip(11) {
			t.Errorf("server saw %v from %s, want the client's bytes from %s", got.err, got.peer, ip(11))
		}
		waitFor(t, "the tunnelled access log", func() bool {
			l := m.n2.logs.String() // node2 delivered it from a tunnel
			return strings.Contains(l, `"via":"hbone"`) && strings.Contains(l, netip.AddrPortFrom(ip(70), 8080).String())
		})
	})

	t.Run("outside the pod CIDRs: passthrough", func(t *testing.T) {
		c, err := socksDial(socks, ip(11), netip.AddrPortFrom(ip(50), 9000).String())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := exchange(c, 1000, 1000, 5); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("too many waiting: reset at once", func(t *testing.T) {
		n1.p.unknownWaits.Add(maxUnknownWaits)
		defer n1.p.unknownWaits.Add(-maxUnknownWaits)
		start := time.Now()
		if c, err := socksDial(socks, ip(11), netip.AddrPortFrom(ip(72), 8080).String()); err == nil {
			c.Close()
			t.Fatal("connected")
		}
		if took := time.Since(start); took > wait/2 {
			t.Errorf("refused after %v: waited past the bound on waiting connections", took)
		}
	})
}
