package telemetry

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/relay"
)

// refConn counts c the way Tracker did before its children cache: one
// WithLabelValues per family per use, so the same series (and no other)
// must come out of the cache.
func refConn(m *Metrics, c *Conn, established bool, flags string, rx, tx int64) {
	hbone := func(vec *prometheus.CounterVec) prometheus.Counter {
		r, tp, _ := c.hboneLabels()
		return vec.WithLabelValues(r, tp)
	}
	opened := false
	if established {
		l := c.Labels(FlagNone)
		m.Received.WithLabelValues(l...).Add(float64(rx))
		m.Sent.WithLabelValues(l...).Add(float64(tx))
		if c.Transport != "" {
			hbone(m.HBONEReceived).Add(float64(rx))
			hbone(m.HBONESent).Add(float64(tx))
			hbone(m.HBONEOpened).Inc()
		}
		m.Opened.WithLabelValues(l...).Inc()
		opened = true
	}
	l := c.Labels(flags)
	if !opened {
		m.Opened.WithLabelValues(l...).Inc()
	}
	m.Closed.WithLabelValues(l...).Inc()
	if !established && flags != FlagNone && flags != FlagAborted {
		m.Failed.WithLabelValues(l...).Inc()
	}
	if c.Transport != "" && established {
		hbone(m.HBONEClosed).Inc()
	}
}

func exposition(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&b, mf); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

// The cached children count exactly the series WithLabelValues per use
// did: connections of different pods of one workload share a label set,
// refused ones get no byte series, established ones no failed series, and
// the cache stays bounded.
func TestChildrenSameSeries(t *testing.T) {
	reg, refReg := prometheus.NewRegistry(), prometheus.NewRegistry()
	tr := &Tracker{Metrics: NewMetrics(reg)}
	ref := NewMetrics(refReg)
	client := func(pod string) Peer {
		return Peer{UID: "uid-" + pod, Pod: pod, Workload: "client", Namespace: "shop",
			Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client")}
	}
	server := Peer{UID: "u2", Pod: "server-0", Workload: "server", Namespace: "shop",
		Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/server")}
	svc := Service{Hostname: "server.shop.svc.cluster.local", Name: "server", Namespace: "shop"}
	run := func(c *Conn, establish bool, flags string, rx, tx int64) {
		t.Helper()
		tr.Begin(c)
		if establish {
			tr.Establish(c)
			c.Count(relay.AToB, rx)
			c.Count(relay.BToA, tx)
		}
		tr.End(c, flags, "", nil)
		refConn(ref, c, establish, flags, rx, tx)
	}
	for i, tc := range []struct {
		establish bool
		flags     string
		transport string
		mtls      bool
	}{
		{true, FlagNone, "", true},
		{true, FlagNone, "", true}, // another pod, same label set
		{true, FlagNone, "h2", true},
		{true, FlagNone, "h3", true},
		{true, FlagNone, "h9", true}, // transport label "unknown"
		{true, FlagAborted, "h2", true},
		{true, FlagConnect, "", false},
		{false, FlagDeny, "h2", true},
		{false, FlagNoRoute, "", false},
		{false, FlagAborted, "", false},
		{false, FlagNone, "", true},
	} {
		c := &Conn{Direction: Inbound, Via: "hbone", Source: client(fmt.Sprintf("client-%d", i)), Destination: server,
			Service: svc, MTLS: tc.mtls, Transport: tc.transport}
		run(c, tc.establish, tc.flags, int64(10+i), int64(100+i))
	}
	// Beyond MaxChildren label sets the cache is cleared, not grown; the
	// counts go on.
	for i := 0; i < MaxChildren+10; i++ {
		c := &Conn{Direction: Outbound, Source: Peer{Workload: fmt.Sprintf("w%d", i%(MaxChildren+5)), Namespace: "load"},
			Destination: server, Service: svc}
		run(c, true, FlagNone, 1, 2)
	}
	n := tr.Metrics.children.Len()
	if n == 0 || n > MaxChildren {
		t.Errorf("%d cached label sets, want 1..%d", n, MaxChildren)
	}
	if got, want := exposition(t, reg), exposition(t, refReg); got != want {
		t.Errorf("cached series differ:\n got %s\nwant %s", got, want)
	}
	want := labels("reporter", "destination", "source_workload", "client", "source_canonical_service", "client",
		"source_canonical_revision", "latest", "source_workload_namespace", "shop",
		"source_principal", "spiffe://cluster.local/ns/shop/sa/client", "source_app", "client", "source_version", "latest",
		"source_cluster", "unknown", "destination_service", "server.shop.svc.cluster.local",
		"destination_service_namespace", "shop", "destination_service_name", "server",
		"destination_workload", "server", "destination_canonical_service", "server", "destination_canonical_revision", "latest",
		"destination_workload_namespace", "shop", "destination_principal", "spiffe://cluster.local/ns/shop/sa/server",
		"destination_app", "server", "destination_version", "latest", "destination_cluster", "unknown",
		"request_protocol", "tcp", "response_flags", "-", "connection_security_policy", "mutual_tls")
	// Five served mutual-TLS connections (two plain, h2, h3, h9), the
	// established h2 one aborted and the one ended "-" unestablished share
	// the opened series; the aborted one is closed with its own flags.
	if got := sample(t, reg, "istio_tcp_connections_opened_total", want); got != 7 {
		t.Errorf("opened = %v, want 7", got)
	}
	if got := sample(t, reg, "istio_tcp_connections_closed_total", want); got != 6 {
		t.Errorf("closed = %v, want 6", got)
	}
	if got := sample(t, reg, "istio_tcp_connections_failed_total", want); got != -1 {
		t.Errorf("failed series for served connections: %v", got)
	}
	want["response_flags"] = FlagDeny
	if got := sample(t, reg, "istio_tcp_sent_bytes_total", want); got != -1 {
		t.Errorf("sent bytes series for a refused connection: %v", got)
	}
	if got := sample(t, reg, "istio_tcp_connections_failed_total", want); got != 1 {
		t.Errorf("failed (DENY) = %v, want 1", got)
	}
}

// With the logger's info level off, End writes nothing (and builds no
// line); with it on, one line.
func TestAccessLogLevel(t *testing.T) {
	for _, tc := range []struct {
		level slog.Level
		lines int
	}{{slog.LevelWarn, 0}, {slog.LevelInfo, 1}} {
		var logs bytes.Buffer
		tr := &Tracker{Logger: slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: tc.level}))}
		c := &Conn{Direction: Outbound, Src: netip.MustParseAddrPort("10.0.0.1:1"), Dst: netip.MustParseAddrPort("10.0.0.2:2")}
		tr.Begin(c)
		tr.Establish(c)
		tr.End(c, FlagNone, "", nil)
		if got := bytes.Count(logs.Bytes(), []byte("\n")); got != tc.lines {
			t.Errorf("level %v: %d lines, want %d: %s", tc.level, got, tc.lines, logs.String())
		}
		if tc.lines == 1 && !bytes.Contains(logs.Bytes(), []byte(`"msg":"connection complete","src.addr":"10.0.0.1:1"`)) {
			t.Errorf("line %s", logs.String())
		}
	}
}

// Connections on many goroutines share the cached children (run with
// -race): every one is counted once, its bytes on its label set.
func TestChildrenConcurrent(t *testing.T) {
	reg := prometheus.NewRegistry()
	tr := &Tracker{Metrics: NewMetrics(reg)}
	const goroutines, conns = 8, 200
	done := make(chan struct{})
	for g := 0; g < goroutines; g++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := 0; i < conns; i++ {
				c := &Conn{Direction: Outbound, Source: Peer{Workload: fmt.Sprintf("w%d", i%4), Namespace: "ns"}, Transport: "h2"}
				tr.Begin(c)
				tr.Establish(c)
				c.Count(relay.AToB, 1)
				tr.End(c, FlagNone, "", nil)
			}
		}()
	}
	for g := 0; g < goroutines; g++ {
		<-done
	}
	if got := sample(t, reg, "ambit_hbone_connections_closed_total", labels("reporter", "source", "transport", "h2")); got != goroutines*conns {
		t.Errorf("hbone closed = %v, want %d", got, goroutines*conns)
	}
	if got := sample(t, reg, "ambit_hbone_received_bytes_total", labels("reporter", "source", "transport", "h2")); got != goroutines*conns {
		t.Errorf("hbone received = %v, want %d", got, goroutines*conns)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "istio_tcp_received_bytes_total" {
			continue
		}
		if len(mf.GetMetric()) != 4 {
			t.Errorf("%d received series, want 4", len(mf.GetMetric()))
		}
		for _, m := range mf.GetMetric() {
			if v := m.GetCounter().GetValue(); v != goroutines*conns/4 {
				t.Errorf("received %v, want %d", v, goroutines*conns/4)
			}
		}
	}
}
