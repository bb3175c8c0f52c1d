package ztunnel

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/hbone/h3"
	"github.com/ambit-mesh/ambit/model"
)

// quicMesh is testMesh with QUIC on both nodes (serve, on node2, only when
// serve2) and the servers advertising it.
func quicMesh(t *testing.T, serve2 bool) *testMesh {
	t.Helper()
	nodes := 0
	m := newTestMesh(t, func(c *Config) {
		nodes++
		c.QUIC = nodes == 1 || serve2
	})
	m.serverA.QUIC, m.serverB.QUIC = true, true
	m.setConfig(nil, nil)
	return m
}

// transports returns the Transport of p's established connections.
func transports(p *Proxy) []string {
	var out []string
	for _, c := range p.conns.Conns() {
		if c.Established() {
			out = append(out, c.Direction+":"+c.Transport)
		}
	}
	return out
}

// TestQUICTunnel: with QUIC on both ends, connections to a pod that
// advertises it go over HTTP/3, byte-exact both ways with half-close, and
// both sides' connection records say so.
func TestQUICTunnel(t *testing.T) {
	m := quicMesh(t, true)
	pod := netip.AddrPortFrom(m.serverA.Addresses[0], 8080).String()
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], pod)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "established on both nodes", func() bool {
		return len(transports(m.n1.p)) == 1 && len(transports(m.n2.p)) == 1
	})
	if got := transports(m.n1.p)[0] + " " + transports(m.n2.p)[0]; got != "outbound:h3 inbound:h3" {
		t.Errorf("transports %q, want outbound:h3 inbound:h3", got)
	}
	if _, err := exchange(c, 4<<20, 3<<20, 9); err != nil {
		t.Fatal(err)
	}
	qd := m.n1.p.dialer.(*h3.Fallback)
	if qd.H3.Conns() != 1 || qd.H2.Conns() != 0 {
		t.Errorf("h3 connections %d, h2 %d; want 1, 0", qd.H3.Conns(), qd.H2.Conns())
	}
	// A destination that does not advertise QUIC: HTTP/2.
	m.serverB.QUIC = false
	m.setConfig(nil, nil)
	c, err = socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], netip.AddrPortFrom(m.serverB.Addresses[0], 8080).String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exchange(c, 1<<10, 1<<10, 10); err != nil {
		t.Fatal(err)
	}
	if qd.H2.Conns() != 1 {
		t.Errorf("h2 connections %d to a destination without QUIC, want 1", qd.H2.Conns())
	}
}

// TestQUICFallback: the destination advertises QUIC but its ztunnel does
// not serve it: the dial falls back to HTTP/2 (never plaintext), and the
// next connection goes straight to HTTP/2 (remembered).
func TestQUICFallback(t *testing.T) {
	m := quicMesh(t, false)
	pod := netip.AddrPortFrom(m.serverA.Addresses[0], 8080).String()
	for i := range 2 {
		c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], pod)
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "established", func() bool { return len(transports(m.n2.p)) == 1 })
		if got := transports(m.n2.p)[0]; got != "inbound:h2" {
			t.Errorf("connection %d: %q, want inbound:h2", i, got)
		}
		if _, err := exchange(c, 1<<20, 1<<20, uint64(i)); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "closed", func() bool { return len(transports(m.n2.p)) == 0 })
	}
	if n := strings.Count(m.n1.logs.String(), "falling back to http/2"); n != 1 {
		t.Errorf("%d fallbacks logged for 2 connections, want 1 (the failure is remembered)", n)
	}
	// Nothing reached the server in clear: every connection it saw came
	// through node2's HBONE listener.
	if n := len(m.srvA.all()); n != 2 {
		t.Errorf("server saw %d connections, want 2", n)
	}
}

// TestQUICPolicyDenied: the destination's policy applies over HTTP/3 as
// over HTTP/2: a denied peer gets a 401 through the QUIC tunnel (SOCKS5
// "not allowed"), without falling back; the allowed one gets through.
func TestQUICPolicyDenied(t *testing.T) {
	m := quicMesh(t, true)
	allow := &model.Policy{Name: "only-client", Namespace: "shop", Action: model.ActionAllow,
		Selector: map[string]string{"app": "server"},
		Rules:    []model.Rule{{From: []model.Source{{Principals: []string{"cluster.local/ns/shop/sa/client"}}}}}}
	m.setConfig([]*model.Policy{allow}, nil)
	pod := netip.AddrPortFrom(m.serverA.Addresses[0], 8080).String()
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.intruder.Addresses[0], pod)
	if err == nil {
		_, err = exchange(c, 10, 10, 1)
	}
	var se *socksReplyError
	if !errors.As(err, &se) || se.code != socksNotAllowed {
		t.Fatalf("intruder over QUIC: %v, want SOCKS5 'not allowed'", err)
	}
	c, err = socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], pod)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exchange(c, 1<<10, 1<<10, 2); err != nil {
		t.Fatal(err)
	}
	qd := m.n1.p.dialer.(*h3.Fallback)
	if qd.H2.Conns() != 0 || strings.Contains(m.n1.logs.String(), "falling back") {
		t.Error("a denial over QUIC fell back to HTTP/2")
	}
}
