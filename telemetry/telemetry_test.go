package telemetry

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/relay"
)

// sample returns the value of the one sample of name with exactly labels.
func sample(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, l := range m.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue metrics
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return -1
}

func labels(kv ...string) map[string]string {
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

// A served connection: opened and closed with Istio's labels, bytes each
// way, one access-log line with the ztunnel's fields.
func TestServedConnection(t *testing.T) {
	reg := prometheus.NewRegistry()
	var logs bytes.Buffer
	tr := &Tracker{Metrics: NewMetrics(reg), Logger: slog.New(slog.NewJSONHandler(&logs, nil))}
	c := &Conn{Direction: Inbound, Via: "hbone",
		Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.0.0.2:8080")}
	tr.Begin(c)
	if c.ID == 0 || tr.Len() != 1 || !tr.Open(c.ID) || c.Established() {
		t.Fatalf("after Begin: id %d, len %d", c.ID, tr.Len())
	}
	c.Source = Peer{UID: "u1", Workload: "client", Namespace: "shop", Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client")}
	c.Destination = Peer{UID: "u2", Workload: "server", Namespace: "shop", Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/server")}
	c.Service, c.Route, c.MTLS = "server.shop.svc.cluster.local", "hbone", true
	c.Upstream = c.Dst
	tr.Establish(c)
	c.Count(relay.AToB, 100)
	c.Count(relay.BToA, 7)
	c.Count(relay.AToB, 1)
	if !c.Established() || c.Received() != 101 || c.Sent() != 7 {
		t.Fatalf("established %v, received %d, sent %d", c.Established(), c.Received(), c.Sent())
	}
	if got := tr.Conns(); len(got) != 1 || got[0] != c {
		t.Fatalf("Conns %v", got)
	}
	tr.End(c, FlagNone, "", nil)
	if tr.Len() != 0 || tr.Open(c.ID) {
		t.Fatal("still open after End")
	}
	want := labels("reporter", "destination",
		"source_workload", "client", "source_workload_namespace", "shop", "source_principal", "spiffe://cluster.local/ns/shop/sa/client",
		"destination_workload", "server", "destination_workload_namespace", "shop", "destination_principal", "spiffe://cluster.local/ns/shop/sa/server",
		"destination_service", "server.shop.svc.cluster.local", "response_flags", "-", "connection_security_policy", "mutual_tls")
	for name, v := range map[string]float64{
		"istio_tcp_connections_opened_total": 1, "istio_tcp_connections_closed_total": 1,
		"istio_tcp_received_bytes_total": 101, "istio_tcp_sent_bytes_total": 7,
	} {
		if got := sample(t, reg, name, want); got != v {
			t.Errorf("%s = %v, want %v", name, got, v)
		}
	}
	var line map[string]any
	if err := json.Unmarshal(logs.Bytes(), &line); err != nil {
		t.Fatalf("log %q: %v", logs.String(), err)
	}
	var keys []string
	for k := range line {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	wantKeys := []string{"bytes_received", "bytes_sent", "direction", "dst", "dst_principal", "dst_workload", "duration", "id",
		"level", "msg", "outcome", "route", "service", "src", "src_principal", "src_workload", "time", "upstream", "via"}
	if !slices.Equal(keys, wantKeys) {
		t.Fatalf("log keys %v, want %v", keys, wantKeys)
	}
	for k, v := range map[string]any{"msg": "connection", "outcome": "ok", "src_workload": "shop/client", "dst_workload": "shop/server",
		"bytes_received": 101.0, "bytes_sent": 7.0, "src": "10.0.0.1:40000", "upstream": "10.0.0.2:8080", "via": "hbone", "direction": "inbound"} {
		if line[k] != v {
			t.Errorf("log %s = %v, want %v", k, line[k], v)
		}
	}
}

// A refused connection is counted opened and closed (never established)
// with its flags; unknown peers are "unknown"; the log has reason and err.
func TestRefusedConnection(t *testing.T) {
	reg := prometheus.NewRegistry()
	var logs bytes.Buffer
	tr := &Tracker{Metrics: NewMetrics(reg), Logger: slog.New(slog.NewJSONHandler(&logs, nil))}
	c := &Conn{Direction: Outbound, Via: "outbound"}
	tr.Begin(c)
	tr.End(c, FlagNoRoute, "no route", errors.New("no endpoint"))
	want := labels("reporter", "source",
		"source_workload", "unknown", "source_workload_namespace", "unknown", "source_principal", "unknown",
		"destination_workload", "unknown", "destination_workload_namespace", "unknown", "destination_principal", "unknown",
		"destination_service", "unknown", "response_flags", "NR", "connection_security_policy", "none")
	for _, name := range []string{"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"} {
		if got := sample(t, reg, name, want); got != 1 {
			t.Errorf("%s = %v, want 1", name, got)
		}
	}
	var line map[string]any
	if err := json.Unmarshal(logs.Bytes(), &line); err != nil {
		t.Fatal(err)
	}
	if line["outcome"] != "failed" || line["reason"] != "no route" || line["err"] != "no endpoint" || line["upstream"] != nil {
		t.Fatalf("log %v", line)
	}
}

func TestOutcomeAndReporter(t *testing.T) {
	for flags, want := range map[string]string{FlagNone: "ok", FlagDeny: "denied", FlagAborted: "aborted", FlagConnect: "failed"} {
		if got := Outcome(flags); got != want {
			t.Errorf("Outcome(%s) = %s, want %s", flags, got, want)
		}
	}
	if l := (&Conn{Direction: Inbound, Reporter: "waypoint"}).Labels(FlagNone); l[0] != "waypoint" {
		t.Fatalf("reporter %s", l[0])
	}
	// The zero Tracker tracks without counting or logging.
	var tr Tracker
	c := &Conn{}
	tr.Begin(c)
	tr.Establish(c)
	c.Count(relay.AToB, 3)
	tr.End(c, FlagNone, "", nil)
	if c.Received() != 3 || tr.Len() != 0 {
		t.Fatal("zero Tracker")
	}
}
