package server

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	prommodel "github.com/prometheus/common/model"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	capb "github.com/ambit-mesh/ambit/api/ca/v1"
	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// scrape reads addr's /metrics with Prometheus' text parser.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(prommodel.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// value is the sample of family name whose labels include want (a histogram:
// its count); -1 if there is none.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		for k, v := range want {
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		case m.GetHistogram() != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	return -1
}

// Real xDS and certificate calls move istiod-lite's metrics, served on the
// monitoring listener (and the admin's): a connected ztunnel, the responses
// it was sent, a NACK, CSRs (issued, unparsable) and the gate's refusal of
// a call without a token.
func TestMetrics(t *testing.T) {
	mon := make(chan string, 1)
	admin := make(chan string, 1)
	ls := startLocal(t, func(c *Config) {
		c.Admin, c.Monitoring = "127.0.0.1:0", "127.0.0.1:0"
		c.MonitoringListening = func(a string) { mon <- a }
		started := c.Listening
		c.Listening = func(g, a string) { admin <- a; started(g, a) }
	})
	monAddr := <-mon
	ctx := t.Context()

	// waitFor polls the monitoring listener until cond holds.
	waitFor := func(what string, cond func(map[string]*dto.MetricFamily) bool) map[string]*dto.MetricFamily {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			fams := scrape(t, monAddr)
			if cond(fams) {
				return fams
			}
			if time.Now().After(deadline) {
				var b strings.Builder
				for _, f := range fams {
					if strings.HasPrefix(f.GetName(), "pilot_") || strings.HasPrefix(f.GetName(), "citadel_") || strings.HasPrefix(f.GetName(), "ambit_") {
						_, _ = expfmt.MetricFamilyToText(&b, f)
					}
				}
				t.Fatalf("%s: not within 20s; metrics:\n%s", what, b.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	fams := scrape(t, monAddr)
	for _, name := range []string{"pilot_xds_pushes", "pilot_total_xds_rejects", "citadel_server_csr_count", "citadel_server_success_cert_issue_count", "citadel_server_csr_parsing_err_count"} {
		if v := value(fams, name, nil); v > 0 {
			t.Fatalf("%s is %v before any call", name, v)
		}
	}

	// A ztunnel connects and syncs.
	tlsConf := caclient.TLSConfig(ls.roots, identity.DefaultTrustDomain, identity.ControlPlane(identity.DefaultTrustDomain))
	zt := &xdsclient.Client{Addr: ls.addr, TLS: tlsConf, Node: "node-1", Token: node1Secret, Store: &model.Store{}}
	zctx, stopZt := context.WithCancel(ctx)
	ztDone := make(chan struct{})
	go func() { _ = zt.Start(zctx); close(ztDone) }()
	select {
	case <-zt.SyncedCh():
	case <-time.After(20 * time.Second):
		t.Fatal("ztunnel did not sync")
	}
	fams = waitFor("one connected node proxy, workloads pushed", func(f map[string]*dto.MetricFamily) bool {
		return value(f, "pilot_xds", map[string]string{"kind": "node-proxy"}) == 1 &&
			value(f, "pilot_xds_pushes", map[string]string{"type": "wds"}) >= 1 &&
			value(f, "pilot_xds_send_time", map[string]string{"type": "wds"}) >= 1
	})
	t.Logf("pushes of workloads: %v", value(fams, "pilot_xds_pushes", map[string]string{"type": "wds"}))

	// A NACK of the workloads.
	st, closeStream, err := openADS(ctx, ls.addr, tlsConf, node1Secret)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: "node-1"}, TypeUrl: workload.WorkloadType, ResourceNamesSubscribe: []string{"*"}}); err != nil {
		t.Fatal(err)
	}
	first, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: workload.WorkloadType, ResponseNonce: first.GetNonce(),
		ErrorDetail: &statuspb.Status{Code: int32(codes.InvalidArgument), Message: "test: rejected"}}); err != nil {
		t.Fatal(err)
	}
	waitFor("a NACK, two node proxies", func(f map[string]*dto.MetricFamily) bool {
		return value(f, "pilot_total_xds_rejects", map[string]string{"type": "wds"}) == 1 &&
			value(f, "pilot_xds", map[string]string{"kind": "node-proxy"}) == 2
	})
	closeStream()
	stopZt()
	<-ztDone
	waitFor("no connected node proxy once both streams ended", func(f map[string]*dto.MetricFamily) bool {
		return value(f, "pilot_xds", map[string]string{"kind": "node-proxy"}) == 0
	})

	// CSRs: one issued, one unparsable, one without a token (refused by
	// the gate before the service).
	clientID := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/client")
	if _, err := ls.caClientFrom(t, "127.0.0.1").Issue(ctx, clientID, issueCSR(t, clientID)); err != nil {
		t.Fatal(err)
	}
	cc := ls.dialFrom(t, "127.0.0.1")
	bad := &capb.CreateCertificateRequest{Identity: clientID.String(), Csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}
	if _, err := capb.NewCertificateServiceClient(cc).CreateCertificate(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+node1Secret), bad); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("unparsable CSR: %v, want InvalidArgument", err)
	}
	if _, err := capb.NewCertificateServiceClient(cc).CreateCertificate(ctx, bad); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("CSR without a token: %v, want Unauthenticated", err)
	}
	fams = waitFor("CSR counts", func(f map[string]*dto.MetricFamily) bool {
		return value(f, "citadel_server_csr_count", nil) == 2 &&
			value(f, "citadel_server_success_cert_issue_count", nil) == 1 &&
			value(f, "citadel_server_csr_parsing_err_count", nil) == 1 &&
			value(f, "ambit_gate_refusals_total", map[string]string{"reason": "unauthenticated"}) == 1
	})
	if v := value(fams, "ambit_gate_refusals_total", map[string]string{"reason": "call_rate"}); v != 0 {
		t.Errorf("call_rate refusals: %v, want 0", v)
	}

	// The admin listener serves the same metrics.
	adminAddr := <-admin
	if v := value(scrape(t, adminAddr), "citadel_server_success_cert_issue_count", nil); v != 1 {
		t.Errorf("admin's /metrics: %v certificates issued, want 1", v)
	}
	// The monitoring listener serves nothing but the metrics.
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/proxy-status", monAddr))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("monitoring listener's /debug/proxy-status: %s, want 404", resp.Status)
	}
}
