package telemetry

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/relay"
)

// BenchmarkConnection is one ztunnel connection's telemetry: Begin,
// Establish, a read and a write counted, End; metrics registered, no flow
// subscribers, the access log at info (on, JSON to io.Discard) or warn
// (off), tunnelled (h2) or not.
func BenchmarkConnection(b *testing.B) {
	src := Peer{UID: "u1", Pod: "client-7d9f-x2", Workload: "client", Namespace: "shop", Cluster: "east",
		Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client")}
	dst := Peer{UID: "u2", Pod: "server-0", Workload: "server", Namespace: "shop", CanonicalService: "srv",
		CanonicalRevision: "v2", Cluster: "east", Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/server")}
	svc := Service{Hostname: "server.shop.svc.cluster.local", Name: "server", Namespace: "shop"}
	for _, bc := range []struct {
		name      string
		level     slog.Level
		transport string
	}{
		{"log=off", slog.LevelWarn, ""},
		{"log=on", slog.LevelInfo, ""},
		{"log=off/h2", slog.LevelWarn, "h2"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			tr := &Tracker{Metrics: NewMetrics(prometheus.NewRegistry()),
				Logger: slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: bc.level}))}
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				c := &Conn{Direction: Inbound, Via: "hbone",
					Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.0.0.2:8080"),
					Source: src, Destination: dst, Service: svc, Route: "hbone", MTLS: true,
					Transport: bc.transport, Policy: "shop/allow-client"}
				c.Upstream = c.Dst
				tr.Begin(c)
				tr.Establish(c)
				c.Count(relay.AToB, 100)
				c.Count(relay.BToA, 200)
				tr.End(c, FlagNone, "", nil)
			}
		})
	}
}
