package ztunnel

import (
	"net/netip"
	"testing"
)

// TestPassthroughAndDirect: a destination outside the mesh and a workload
// that is not enrolled both get plain TCP, byte-exact.
func TestPassthroughAndDirect(t *testing.T) {
	m := newTestMesh(t, nil)
	ip := m.net.ip
	for _, tc := range []struct {
		name  string
		dst   netip.AddrPort
		srv   *server
		route string
	}{
		{"outside the mesh", netip.AddrPortFrom(ip(50), 9000), m.srvOutside, "passthrough"},
		{"not enrolled", netip.AddrPortFrom(ip(31), 9000), m.srvLegacy, "direct"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), tc.dst.String())
			if err != nil {
				t.Fatal(err)
			}
			sum, err := exchange(c, 3<<20, 2<<20, 9)
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, "server result", func() bool { return len(tc.srv.all()) == 1 })
			if r := tc.srv.all()[0]; r.err != nil || r.n != 3<<20 || r.sum != sum {
				t.Fatalf("server got %d bytes, %v", r.n, r.err)
			}
			waitFor(t, "closed metric", func() bool {
				return metricSum(t, m.n1.p, "istio_tcp_connections_closed_total", map[string]string{
					"reporter": "source", "response_flags": "-", "connection_security_policy": "none",
					"source_principal": "spiffe://cluster.local/ns/shop/sa/client"}) >= 1
			})
		})
	}
	if got := metricSum(t, m.n1.p, "istio_tcp_connections_closed_total", map[string]string{"destination_workload": "legacy", "destination_principal": "unknown"}); got != 1 {
		t.Errorf("direct connection to legacy counted %v times", got)
	}
	if got := metricSum(t, m.n2.p, "istio_tcp_connections_opened_total", nil); got != 0 {
		t.Errorf("node2 proxied %v connections: plain TCP must not touch it", got)
	}
}
