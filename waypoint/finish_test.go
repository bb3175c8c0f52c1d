package waypoint

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"maps"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/telemetry"
)

// finishFixture is a proxy, with access log w, and a request's record as
// forward leaves it for finish.
func finishFixture(w io.Writer) (*Proxy, func() *record) {
	p := &Proxy{m: newMetrics(), access: slog.New(slog.NewJSONHandler(w, nil))}
	ds := &downstream{
		peer:     spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/client"),
		peerAddr: netip.MustParseAddrPort("10.0.0.1:41000"),
		target:   netip.MustParseAddrPort("10.96.0.10:80"),
	}
	h := &host{spec: endpointSpec{
		addr:     netip.MustParseAddrPort("10.0.1.2:8080"),
		identity: spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/server"),
		labels:   hostLabels{workload: "server", namespace: "demo"},
	}}
	r := httptest.NewRequest("GET", "http://server.demo.svc.cluster.local/items?id=1", nil)
	r.Header.Set("User-Agent", "bench")
	return p, func() *record {
		return &record{start: time.Now(), ds: ds, r: r, protocol: "http", route: "default",
			clusterName: "outbound|80||server.demo.svc.cluster.local", host: h, service: "server.demo.svc.cluster.local",
			requestID: "5f0c6c1e-3d5a-4f7e-9f7a-1c2b3d4e5f60", traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
			attempts: 1}
	}
}

// The access-log line keeps Istio's fields, in their order, with their
// values' JSON types; ambit's (the HBONE transports of both legs) follow.
func TestFinishAccessLine(t *testing.T) {
	var buf bytes.Buffer
	p, newRec := finishFixture(&buf)
	rec := newRec()
	rec.upstreamMs = 3
	p.finish(rec, &respWriter{code: 200, bytes: 1024})
	dec := json.NewDecoder(&buf)
	dec.UseNumber()
	var keys []string
	line := map[string]any{}
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		t.Fatalf("line %q: %v", buf.String(), err)
	}
	for dec.More() {
		k, _ := dec.Token()
		var v any
		if err := dec.Decode(&v); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k.(string))
		line[k.(string)] = v
	}
	want := []string{"time", "level", "msg", "start_time", "method", "path", "protocol", "response_code", "response_flags",
		"response_code_details", "bytes_received", "bytes_sent", "duration", "upstream_service_time", "x_forwarded_for",
		"user_agent", "request_id", "traceparent", "authority", "upstream_host", "upstream_cluster",
		"downstream_local_address", "downstream_remote_address", "route_name", "attempts", "source_principal",
		"transport", "upstream_transport"}
	if !slices.Equal(keys, want) {
		t.Fatalf("keys %q, want %q", keys, want)
	}
	for k, v := range map[string]any{"msg": "waypoint: request", "method": "GET", "path": "/items?id=1", "protocol": "HTTP/1.1",
		"response_code": json.Number("200"), "response_flags": "-", "response_code_details": "-", "bytes_received": json.Number("0"),
		"bytes_sent": json.Number("1024"), "upstream_service_time": json.Number("3"), "x_forwarded_for": "-", "user_agent": "bench",
		"authority": "server.demo.svc.cluster.local", "upstream_host": "10.0.1.2:8080", "downstream_local_address": "10.96.0.10:80",
		"downstream_remote_address": "10.0.0.1:41000", "route_name": "default", "attempts": json.Number("1"),
		"source_principal": "spiffe://cluster.local/ns/demo/sa/client", "transport": "h2", "upstream_transport": "-"} {
		if line[k] != v {
			t.Errorf("%s = %#v, want %#v", k, line[k], v)
		}
	}
	if st, err := time.Parse(time.RFC3339Nano, line["start_time"].(string)); err != nil || !st.Equal(rec.start.UTC()) {
		t.Errorf("start_time %v (%v), want %v", line["start_time"], err, rec.start.UTC())
	}
}

// Requests with one label set count on one series, whatever the peers'
// non-label fields; another code is another series; the cache stays bounded.
func TestFinishMetricChildren(t *testing.T) {
	p, newRec := finishFixture(io.Discard)
	p.finish(newRec(), &respWriter{code: 200})
	p.finish(newRec(), &respWriter{code: 200})
	p.finish(newRec(), &respWriter{code: 503})
	src := p.m.sourcePeer(newRec().ds)
	tr := telemetry.Traffic{Reporter: "waypoint", Source: src, Destination: destinationPeer(newRec().host),
		Service: telemetry.ServiceFromHost("server.demo.svc.cluster.local"), Protocol: "http", Flags: "-", MTLS: true}
	mfs, err := p.m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "response_code" {
					got[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
	}
	if want := map[string]float64{"200": 2, "503": 1}; !maps.Equal(got, want) {
		t.Errorf("istio_requests_total by response_code = %v, want %v", got, want)
	}
	tr.ResponseCode = 200
	a := p.m.requestChildren(&tr, "server.demo.svc.cluster.local")
	tr.Source.UID, tr.Source.Pod = "uid-1", "client-abc"
	if b := p.m.requestChildren(&tr, "server.demo.svc.cluster.local"); a != b {
		t.Error("a peer's UID and Pod split its label set's children")
	}
	for i := range telemetry.MaxChildren + 10 {
		tr.Service = telemetry.ServiceFromHost("s" + strconv.Itoa(i) + ".demo.svc.cluster.local")
		p.m.requestChildren(&tr, tr.Service.Hostname)
	}
	n := p.m.children.Len()
	if n > telemetry.MaxChildren {
		t.Errorf("%d cached label sets, want at most %d", n, telemetry.MaxChildren)
	}
}

// BenchmarkFinish measures the per-request telemetry step alone: the
// request families' metrics, the flow event and the JSON access-log line.
func BenchmarkFinish(b *testing.B) {
	p, newRec := finishFixture(io.Discard)
	b.ReportAllocs()
	for b.Loop() {
		p.finish(newRec(), &respWriter{code: 200, bytes: 1024})
	}
}
