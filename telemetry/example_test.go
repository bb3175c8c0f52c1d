package telemetry_test

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/relay"
	"github.com/ambit-mesh/ambit/telemetry"
)

// The access log: one line per connection, Istio's ztunnel's field names
// first, then ambit's (docs/observability.md). The ztunnel logs JSON.
func ExampleTracker_accessLog() {
	noTime := func(_ []string, a slog.Attr) slog.Attr {
		if a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}
	tr := &telemetry.Tracker{Logger: slog.New(slog.NewJSONHandler(os.Stdout, &slog.HandlerOptions{ReplaceAttr: noTime}))}

	// A connection the destination's ztunnel delivered.
	c := &telemetry.Conn{Direction: telemetry.Inbound, Via: "hbone", Route: "hbone", MTLS: true, Policy: "shop/allow-frontend",
		Start: time.Now().Add(-1500 * time.Millisecond),
		Src:   netip.MustParseAddrPort("10.244.1.7:51234"), Dst: netip.MustParseAddrPort("10.244.2.9:8080"),
		Source: telemetry.Peer{Pod: "frontend-6f9c-x2kq", Workload: "frontend", Namespace: "shop",
			Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/frontend")},
		Destination: telemetry.Peer{Pod: "reviews-v1-5d8f-7hj2", Workload: "reviews-v1", Namespace: "shop",
			Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/reviews")},
		Service:  telemetry.Service{Hostname: "reviews.shop.svc.cluster.local", Name: "reviews", Namespace: "shop"},
		Upstream: netip.MustParseAddrPort("10.244.2.9:8080")}
	tr.Begin(c)
	tr.Establish(c)
	c.Count(relay.AToB, 517)
	c.Count(relay.BToA, 20480)
	tr.End(c, telemetry.FlagNone, "", nil)

	// One the destination's policy refused.
	d := &telemetry.Conn{Direction: telemetry.Inbound, Via: "hbone", Route: "hbone", MTLS: true, Policy: "shop/deny-other",
		Start: time.Now(),
		Src:   netip.MustParseAddrPort("10.244.1.8:40000"), Dst: netip.MustParseAddrPort("10.244.2.9:8080"),
		Source:      telemetry.Peer{Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/other/sa/intruder")},
		Destination: c.Destination}
	tr.Begin(d)
	tr.End(d, telemetry.FlagDeny, "denied by policy shop/deny-other", errors.New("401 Unauthorized"))
	// Output:
	// {"level":"INFO","msg":"connection complete","src.addr":"10.244.1.7:51234","src.workload":"frontend-6f9c-x2kq","src.namespace":"shop","src.identity":"spiffe://cluster.local/ns/shop/sa/frontend","dst.addr":"10.244.2.9:8080","dst.service":"reviews.shop.svc.cluster.local","dst.workload":"reviews-v1-5d8f-7hj2","dst.namespace":"shop","dst.identity":"spiffe://cluster.local/ns/shop/sa/reviews","direction":"inbound","bytes_sent":20480,"bytes_recv":517,"duration":"1500ms","id":1,"via":"hbone","route":"hbone","upstream":"10.244.2.9:8080","response_flags":"-","outcome":"ok","policy":"shop/allow-frontend"}
	// {"level":"INFO","msg":"connection complete","src.addr":"10.244.1.8:40000","src.identity":"spiffe://cluster.local/ns/other/sa/intruder","dst.addr":"10.244.2.9:8080","dst.workload":"reviews-v1-5d8f-7hj2","dst.namespace":"shop","dst.identity":"spiffe://cluster.local/ns/shop/sa/reviews","direction":"inbound","bytes_sent":0,"bytes_recv":0,"duration":"0ms","error":"401 Unauthorized","id":2,"via":"hbone","route":"hbone","response_flags":"DENY","outcome":"denied","policy":"shop/deny-other","reason":"denied by policy shop/deny-other"}
}
