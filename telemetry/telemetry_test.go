package telemetry

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
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
// way, one access-log line with Istio's ztunnel's fields.
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
	c.Source = Peer{UID: "u1", Pod: "client-7d9f-x2", Workload: "client", Namespace: "shop", Cluster: "east",
		Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client")}
	c.Destination = Peer{UID: "u2", Pod: "server-0", Workload: "server", Namespace: "shop", CanonicalService: "srv",
		CanonicalRevision: "v2", Cluster: "east", Principal: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/server")}
	c.Service = Service{Hostname: "server.shop.svc.cluster.local", Name: "server", Namespace: "shop"}
	c.Route, c.MTLS, c.Policy = "hbone", true, "shop/allow-client"
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
		"source_workload", "client", "source_canonical_service", "client", "source_canonical_revision", "latest",
		"source_workload_namespace", "shop", "source_principal", "spiffe://cluster.local/ns/shop/sa/client",
		"source_app", "client", "source_version", "latest", "source_cluster", "east",
		"destination_service", "server.shop.svc.cluster.local", "destination_service_namespace", "shop", "destination_service_name", "server",
		"destination_workload", "server", "destination_canonical_service", "srv", "destination_canonical_revision", "v2",
		"destination_workload_namespace", "shop", "destination_principal", "spiffe://cluster.local/ns/shop/sa/server",
		"destination_app", "srv", "destination_version", "v2", "destination_cluster", "east",
		"request_protocol", "tcp", "response_flags", "-", "connection_security_policy", "mutual_tls")
	for name, v := range map[string]float64{
		"istio_tcp_connections_opened_total": 1, "istio_tcp_connections_closed_total": 1,
		"istio_tcp_received_bytes_total": 101, "istio_tcp_sent_bytes_total": 7, "istio_tcp_connections_failed_total": -1,
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
	wantKeys := []string{"bytes_recv", "bytes_sent", "direction", "dst.addr", "dst.identity", "dst.namespace", "dst.service", "dst.workload",
		"duration", "id", "level", "msg", "outcome", "policy", "response_flags", "route",
		"src.addr", "src.identity", "src.namespace", "src.workload", "time", "upstream", "via"}
	if !slices.Equal(keys, wantKeys) {
		t.Fatalf("log keys %v, want %v", keys, wantKeys)
	}
	for k, v := range map[string]any{"msg": "connection complete", "outcome": "ok", "src.workload": "client-7d9f-x2", "dst.workload": "server-0",
		"src.namespace": "shop", "src.identity": "spiffe://cluster.local/ns/shop/sa/client", "dst.service": "server.shop.svc.cluster.local",
		"bytes_recv": 101.0, "bytes_sent": 7.0, "src.addr": "10.0.0.1:40000", "upstream": "10.0.0.2:8080", "via": "hbone",
		"direction": "inbound", "policy": "shop/allow-client"} {
		if line[k] != v {
			t.Errorf("log %s = %v, want %v", k, line[k], v)
		}
	}
	if d, _ := line["duration"].(string); !strings.HasSuffix(d, "ms") {
		t.Errorf("duration %q, want <n>ms", line["duration"])
	}
}

// A refused connection is counted opened, closed and failed (never
// established) with its flags; unknown peers are "unknown"; plaintext
// hides identities in the log, which has reason and error.
func TestRefusedConnection(t *testing.T) {
	reg := prometheus.NewRegistry()
	var logs bytes.Buffer
	tr := &Tracker{Metrics: NewMetrics(reg), Logger: slog.New(slog.NewJSONHandler(&logs, nil))}
	c := &Conn{Direction: Outbound, Via: "outbound"}
	tr.Begin(c)
	tr.End(c, FlagNoRoute, "no route", errors.New("no endpoint"))
	want := labels("reporter", "source", "request_protocol", "tcp", "response_flags", "NR", "connection_security_policy", "none")
	for _, l := range TCPLabels {
		if _, ok := want[l]; !ok {
			want[l] = "unknown"
		}
	}
	for _, name := range []string{"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total", "istio_tcp_connections_failed_total"} {
		if got := sample(t, reg, name, want); got != 1 {
			t.Errorf("%s = %v, want 1", name, got)
		}
	}
	var line map[string]any
	if err := json.Unmarshal(logs.Bytes(), &line); err != nil {
		t.Fatal(err)
	}
	if line["outcome"] != "failed" || line["reason"] != "no route" || line["error"] != "no endpoint" || line["upstream"] != nil ||
		line["src.identity"] != nil || line["response_flags"] != "NR" {
		t.Fatalf("log %v", line)
	}
	// Aborted (drain) is not a failure.
	c = &Conn{Direction: Outbound}
	tr.Begin(c)
	tr.End(c, FlagAborted, "", nil)
	want["response_flags"] = FlagAborted
	if got := sample(t, reg, "istio_tcp_connections_failed_total", want); got != -1 {
		t.Errorf("aborted counted failed: %v", got)
	}
}

func TestOutcomeAndReporter(t *testing.T) {
	for flags, want := range map[string]string{FlagNone: "ok", FlagDeny: "denied", FlagAborted: "aborted", FlagConnect: "failed"} {
		if got := Outcome(flags); got != want {
			t.Errorf("Outcome(%s) = %s, want %s", flags, got, want)
		}
	}
	for flags, want := range map[string]string{FlagNone: VerdictAllowed, FlagDeny: VerdictDenied, FlagAborted: VerdictAllowed, FlagConnect: VerdictFailed, FlagNoRoute: VerdictFailed} {
		if got := Verdict(flags); got != want {
			t.Errorf("Verdict(%s) = %s, want %s", flags, got, want)
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

// Istio's derivations of canonical service and revision from pod labels.
func TestCanonicalNames(t *testing.T) {
	for _, tc := range []struct {
		labels        map[string]string
		svc, revision string
	}{
		{nil, "reviews-v1", "latest"},
		{map[string]string{"app": "reviews", "version": "v1"}, "reviews", "v1"},
		{map[string]string{"app": "reviews", "app.kubernetes.io/name": "rv", "version": "v1", "app.kubernetes.io/version": "1.2"}, "rv", "1.2"},
		{map[string]string{"app": "reviews", "app.kubernetes.io/name": "rv", "service.istio.io/canonical-name": "canon",
			"version": "v1", "app.kubernetes.io/version": "1.2", "service.istio.io/canonical-revision": "r3"}, "canon", "r3"},
		{map[string]string{"app": "", "version": ""}, "reviews-v1", "latest"},
	} {
		if got := CanonicalService(tc.labels, "reviews-v1"); got != tc.svc {
			t.Errorf("CanonicalService(%v) = %q, want %q", tc.labels, got, tc.svc)
		}
		if got := CanonicalRevision(tc.labels); got != tc.revision {
			t.Errorf("CanonicalRevision(%v) = %q, want %q", tc.labels, got, tc.revision)
		}
	}
	if s := ServiceFromHost("reviews.shop.svc.cluster.local"); s != (Service{"reviews.shop.svc.cluster.local", "reviews", "shop"}) {
		t.Errorf("ServiceFromHost: %+v", s)
	}
	if s := ServiceFromHost("example.com"); s.Name != "" || s.Namespace != "" {
		t.Errorf("ServiceFromHost(example.com): %+v", s)
	}
}

// Label values stay bounded: valid UTF-8, cut at MaxLabelLen; gRPC
// statuses are gRPC's codes; response codes are HTTP's.
func TestBound(t *testing.T) {
	if got := Bound("ok\xff"); got != Unknown {
		t.Errorf("invalid UTF-8: %q", got)
	}
	long := strings.Repeat("é", 200) // 400 bytes
	if got := Bound(long); len(got) > MaxLabelLen || !utf8.ValidString(got) || !strings.HasPrefix(long, got) {
		t.Errorf("long value cut to %d bytes (valid %v)", len(got), utf8.ValidString(got))
	}
	for in, want := range map[string]string{"": "", "0": "0", "16": "16", "17": Unknown, "x": Unknown, "123": Unknown} {
		if got := grpcStatus(in); got != want {
			t.Errorf("grpcStatus(%q) = %q, want %q", in, got, want)
		}
	}
	tr := Traffic{ResponseCode: 999}
	if v := tr.RequestValues(); v[slices.Index(RequestLabels, "response_code")] != "0" {
		t.Errorf("response_code of 999: %v", v)
	}
}

// A principal may name only a few peers, in its own namespace.
func TestClaims(t *testing.T) {
	c := &Claims{PerPrincipal: 2, Principals: 2}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client")
	claim := func(id spiffeid.ID, ns, w string) Peer {
		return c.Peer(id, Peer{Workload: w, Namespace: ns, CanonicalService: w})
	}
	if p := claim(id, "shop", "a"); p.Workload != "a" || p.Principal != id {
		t.Errorf("first claim: %+v", p)
	}
	if p := claim(id, "shop", "b"); p.Workload != "b" {
		t.Errorf("second claim: %+v", p)
	}
	if p := claim(id, "shop", "a"); p.Workload != "a" {
		t.Errorf("a known claim again: %+v", p)
	}
	if p := claim(id, "shop", "c"); p.Workload != "" || p.Namespace != "shop" || p.Principal != id {
		t.Errorf("third distinct claim kept: %+v", p)
	}
	if p := claim(id, "other", "a"); p.Workload != "" || p.Namespace != "shop" {
		t.Errorf("claim in another namespace kept: %+v", p)
	}
	id2 := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/two")
	id3 := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/three")
	claim(id2, "shop", "x")
	if p := claim(id3, "shop", "y"); p.Workload != "" {
		t.Errorf("principal beyond the bound kept its claim: %+v", p)
	}
}

// TestExposition parses the metrics' text exposition with Prometheus' own
// parser and compares every family's label names with Istio's lists
// (testdata/istio-labels.golden); every sample's values are bounded.
func TestExposition(t *testing.T) {
	reg := prometheus.NewRegistry()
	tr := &Tracker{Metrics: NewMetrics(reg)}
	// The waypoint's request families are made the same way (waypoint/metrics.go).
	reqs := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_requests_total", Help: "x"}, RequestLabels)
	reg.MustRegister(reqs)
	c := &Conn{Direction: Outbound, Source: Peer{Workload: "client\xff", Namespace: "shop"}}
	tr.Begin(c)
	tr.End(c, FlagConnect, "", nil)
	c = &Conn{Direction: Outbound}
	tr.Begin(c)
	tr.Establish(c)
	c.Count(relay.AToB, 1)
	c.Count(relay.BToA, 1)
	tr.End(c, FlagNone, "", nil)
	tf := Traffic{Reporter: "waypoint", Protocol: "http", ResponseCode: 200, Flags: "-", MTLS: true}
	reqs.WithLabelValues(tf.RequestValues()...).Inc()

	text := expose(t, reg)
	fams, err := parseText(text)
	if err != nil {
		t.Fatalf("%v\n%s", err, text)
	}
	got := map[string]string{}
	for name, mf := range fams {
		if !strings.HasPrefix(name, "istio_") {
			continue
		}
		names := map[string]bool{}
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName())
				if !utf8.ValidString(l.GetValue()) || len(l.GetValue()) > MaxLabelLen || l.GetValue() == "" && l.GetName() != "grpc_response_status" {
					t.Errorf("%s: label %s=%q", name, l.GetName(), l.GetValue())
				}
				if l.GetName() == "request_protocol" && name != "istio_requests_total" && l.GetValue() != "tcp" {
					t.Errorf("%s: request_protocol %q", name, l.GetValue())
				}
			}
			slices.Sort(ls)
			names[strings.Join(ls, " ")] = true
		}
		if len(names) != 1 {
			t.Errorf("%s: label sets differ between samples: %v", name, names)
		}
		for n := range names {
			got[name] = n
		}
	}
	golden := readGolden(t)
	for name, ls := range got {
		if golden[name] == "" {
			t.Errorf("family %s is not in Istio's lists", name)
		} else if golden[name] != ls {
			t.Errorf("%s labels:\n got %s\nwant %s", name, ls, golden[name])
		}
	}
	for _, name := range []string{"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total", "istio_tcp_connections_failed_total",
		"istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total", "istio_requests_total"} {
		if got[name] == "" {
			t.Errorf("family %s missing", name)
		}
	}
}

func expose(t *testing.T, g prometheus.Gatherer) string {
	t.Helper()
	mfs, err := g.Gather()
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

func parseText(text string) (map[string]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(strings.NewReader(text))
}

// readGolden reads testdata/istio-labels.golden: family -> sorted label names.
func readGolden(t *testing.T) map[string]string {
	t.Helper()
	f, err := os.Open("testdata/istio-labels.golden")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, ls, _ := strings.Cut(line, " ")
		out[name] = ls
	}
	return out
}

// TestHBONETransport: a tunnelled connection's transport is the access
// log's transport field, the flows' hboneTransport and the transport label
// of the ambit_hbone_* families (bounded: an unexpected value is
// "unknown"); Istio's families keep their label sets, and a connection
// that is not tunnelled is not counted in ambit_hbone_*.
func TestHBONETransport(t *testing.T) {
	reg := prometheus.NewRegistry()
	var logs bytes.Buffer
	flows := &Flows{}
	sub := flows.Subscribe(FlowFilter{}, 16)
	defer sub.Close()
	tr := &Tracker{Metrics: NewMetrics(reg), Logger: slog.New(slog.NewJSONHandler(&logs, nil)), Flows: flows}
	for _, tc := range []struct {
		dir, transport string
		n              int64
	}{{Outbound, "h3", 10}, {Inbound, "h3", 20}, {Outbound, "h2", 40}, {Outbound, "", 80}, {Outbound, "h9\xff", 160}} {
		c := &Conn{Direction: tc.dir, Via: "test", MTLS: tc.transport != "", Transport: tc.transport}
		tr.Begin(c)
		tr.Establish(c)
		c.Count(relay.AToB, tc.n)
		c.Count(relay.BToA, 2*tc.n)
		tr.End(c, FlagNone, "", nil)
	}
	for _, tc := range []struct {
		name, reporter, transport string
		want                      float64
	}{
		{"ambit_hbone_connections_opened_total", "source", "h3", 1},
		{"ambit_hbone_connections_closed_total", "destination", "h3", 1},
		{"ambit_hbone_received_bytes_total", "source", "h3", 10},
		{"ambit_hbone_sent_bytes_total", "destination", "h3", 40},
		{"ambit_hbone_received_bytes_total", "source", "h2", 40},
		{"ambit_hbone_sent_bytes_total", "source", "h2", 80},
		{"ambit_hbone_received_bytes_total", "source", Unknown, 160},
		{"ambit_hbone_connections_opened_total", "source", "", -1},
	} {
		if got := sample(t, reg, tc.name, labels("reporter", tc.reporter, "transport", tc.transport)); got != tc.want {
			t.Errorf("%s{reporter=%s,transport=%s} = %v, want %v", tc.name, tc.reporter, tc.transport, got, tc.want)
		}
	}
	// Every sample of the ambit_hbone_* families has exactly their labels;
	// the plaintext connection is counted in Istio's families only.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var hboneOpened float64
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "ambit_hbone_") {
			continue
		}
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName())
			}
			if strings.Join(ls, " ") != "reporter transport" {
				t.Errorf("%s labels %v", mf.GetName(), ls)
			}
			if mf.GetName() == "ambit_hbone_connections_opened_total" {
				hboneOpened += m.GetCounter().GetValue()
			}
		}
	}
	if hboneOpened != 4 {
		t.Errorf("ambit_hbone_connections_opened_total sums to %v, want 4 (the plaintext connection is not tunnelled)", hboneOpened)
	}
	// Access log: transport on tunnelled lines only.
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var line map[string]any
		if err := json.Unmarshal([]byte(l), &line); err != nil {
			t.Fatal(err)
		}
		tp, ok := line["transport"].(string)
		if !ok {
			tp = "-"
		}
		got = append(got, tp)
	}
	if want := []string{"h3", "h3", "h2", "-", "h9\ufffd"}; !slices.Equal(got, want) {
		t.Errorf("access-log transports %q, want %q", got, want)
	}
	// Flows: hboneTransport on both events of each tunnelled connection.
	var fl []string
	for range 10 {
		select {
		case f := <-sub.C():
			fl = append(fl, f.Type+":"+f.HBONETransport)
		default: // Publish is synchronous: all are buffered
			t.Fatalf("%d flows, want 10", len(fl))
		}
	}
	if want := "open:h3 close:h3 open:h3 close:h3 open:h2 close:h2 open: close: open:h9\xff close:h9\xff"; strings.Join(fl, " ") != want {
		t.Errorf("flows %q, want %q", strings.Join(fl, " "), want)
	}
}
