package ztunnel

import (
	"encoding/json"
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

// TestQUICTransportTelemetry: over a real HTTP/3 tunnel and a real HTTP/2
// one, both ends say which transport each connection used: the admin
// dump's connections, the ambit_hbone_* counters (by reporter and
// transport) and the access log's transport field; Istio's families carry
// no transport label.
func TestQUICTransportTelemetry(t *testing.T) {
	m := quicMesh(t, true)
	m.serverB.QUIC = false // reached over HTTP/2
	m.setConfig(nil, nil)
	for _, tc := range []struct {
		dst       netip.Addr
		transport string
		up, down  int64
	}{{m.serverA.Addresses[0], "h3", 3 << 20, 1 << 20}, {m.serverB.Addresses[0], "h2", 1 << 20, 2 << 20}} {
		c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], netip.AddrPortFrom(tc.dst, 8080).String())
		if err != nil {
			t.Fatal(err)
		}
		// While it is open, both admin dumps show its transport.
		for _, n := range []*node{m.n1, m.n2} {
			waitFor(t, n.p.cfg.Node+" dump shows "+tc.transport, func() bool {
				var dump []connDump
				resp, err := http.Get("http://" + n.p.Addr(ListenerAdmin).String() + "/debug/connections")
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				if err := json.NewDecoder(resp.Body).Decode(&dump); err != nil {
					t.Fatal(err)
				}
				return len(dump) == 1 && dump[0].Established && dump[0].Transport == tc.transport
			})
		}
		if _, err := exchange(c, tc.up, tc.down, 7); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "closed on both nodes", func() bool { return m.n1.p.conns.Len() == 0 && m.n2.p.conns.Len() == 0 })
		for _, n := range []struct {
			n        *node
			reporter string
		}{{m.n1, "source"}, {m.n2, "destination"}} {
			l := map[string]string{"reporter": n.reporter, "transport": tc.transport}
			if got := metricSum(t, n.n.p, "ambit_hbone_connections_opened_total", l); got != 1 {
				t.Errorf("%s: ambit_hbone_connections_opened_total%v = %v, want 1", n.n.p.cfg.Node, l, got)
			}
			if got := metricSum(t, n.n.p, "ambit_hbone_connections_closed_total", l); got != 1 {
				t.Errorf("%s: ambit_hbone_connections_closed_total%v = %v, want 1", n.n.p.cfg.Node, l, got)
			}
			// The client's bytes (plus the 8-byte header exchange sends first).
			if got := metricSum(t, n.n.p, "ambit_hbone_received_bytes_total", l); got != float64(tc.up+8) {
				t.Errorf("%s: ambit_hbone_received_bytes_total%v = %v, want %d", n.n.p.cfg.Node, l, got, tc.up+8)
			}
			if got := metricSum(t, n.n.p, "ambit_hbone_sent_bytes_total", l); got != float64(tc.down) {
				t.Errorf("%s: ambit_hbone_sent_bytes_total%v = %v, want %d", n.n.p.cfg.Node, l, got, tc.down)
			}
			if want := `"transport":"` + tc.transport + `"`; !strings.Contains(n.n.logs.String(), want) {
				t.Errorf("%s: no access-log line with %s:\n%s", n.n.p.cfg.Node, want, n.n.logs.String())
			}
		}
	}
	for _, n := range []*node{m.n1, m.n2} {
		if got := metricSum(t, n.p, "istio_tcp_connections_opened_total", map[string]string{"transport": ""}); got != 2 {
			t.Errorf("%s: istio_tcp_connections_opened_total without a transport label = %v, want 2", n.p.cfg.Node, got)
		}
	}
}
