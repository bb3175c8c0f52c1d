package waypoint

import (
	"bufio"
	"encoding/json"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	"github.com/prometheus/common/expfmt"
	prommodel "github.com/prometheus/common/model"

	"github.com/ambit-mesh/ambit/telemetry"
)

// TestRequestMetricsAndFlows: the request families' labels, parsed with
// Prometheus' text parser, are Istio's standard ones (the golden list in
// telemetry/testdata) with values derived as the ztunnel's are; each
// request is a flow event, a policy refusal with the verdict denied.
func TestRequestMetricsAndFlows(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, whoami("data"))
	cl := clusterName(svc)
	deny := &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[no-post]-rule[0]": {Permissions: []*rbacv3.Permission{methodIs("POST")},
			Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}}}}}
	md := map[string]any{"workload": "reviews-v1", "namespace": "shop", "canonical_service": "reviews", "canonical_revision": "v1"}
	e.apply(res(listener(httpFC(testVIP, 80, svc, deny))), res(routeConfig(chainName(80, svc), toCluster(prefixMatch("/"), cl))),
		res(edsCluster(cl)), res(cla(cl, ep{addr: b.addr, md: md})))

	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, e.admin+"/debug/flows?follow=true&type=request", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	if !sc.Scan() || !strings.Contains(sc.Text(), `"hello"`) {
		t.Fatalf("flows: %q", sc.Text())
	}
	var mu sync.Mutex
	var flows []telemetry.Flow
	go func() {
		for sc.Scan() {
			var fl telemetry.Flow
			if json.Unmarshal(sc.Bytes(), &fl) == nil {
				mu.Lock()
				flows = append(flows, fl)
				mu.Unlock()
			}
		}
	}()

	c := e.client(e.cliID, target, false)
	if code, _, _ := get(t, c, "http://"+svc+"/a"); code != 200 {
		t.Fatalf("GET: %d", code)
	}
	pr, err := c.Post("http://"+svc+"/b", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	pr.Body.Close()
	if pr.StatusCode != 403 {
		t.Fatalf("POST: %d", pr.StatusCode)
	}

	// Metrics: label names against Istio's lists, values as derived.
	golden := map[string]string{}
	gb, err := os.ReadFile("../telemetry/testdata/istio-labels.golden")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(gb), "\n") {
		if name, ls, ok := strings.Cut(line, " "); ok && !strings.HasPrefix(line, "#") {
			golden[name] = ls
		}
	}
	mresp, err := http.Get(e.metric + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(prommodel.UTF8Validation)
	fams, err := p.TextToMetricFamilies(mresp.Body)
	mresp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"istio_requests_total", "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"} {
		mf := fams[name]
		if mf == nil || len(mf.GetMetric()) != 2 {
			t.Fatalf("%s: %v", name, mf)
		}
		for _, m := range mf.GetMetric() {
			var ls []string
			vals := map[string]string{}
			for _, l := range m.GetLabel() {
				if l.GetName() == "le" {
					continue
				}
				ls = append(ls, l.GetName())
				vals[l.GetName()] = l.GetValue()
			}
			slices.Sort(ls)
			if got := strings.Join(ls, " "); got != golden[name] {
				t.Errorf("%s labels:\n got %s\nwant %s", name, got, golden[name])
			}
			for k, want := range map[string]string{
				"reporter": "waypoint", "source_workload": "client", "source_workload_namespace": "shop",
				"source_principal": e.cliID.String(), "source_canonical_service": "client", "source_canonical_revision": "v1",
				"source_app": "client", "source_version": "v1", "source_cluster": "unknown",
				"destination_workload": "reviews-v1", "destination_workload_namespace": "shop", "destination_canonical_service": "reviews",
				"destination_canonical_revision": "v1", "destination_app": "reviews", "destination_version": "v1",
				"destination_service": svc, "destination_service_name": "reviews", "destination_service_namespace": "shop",
				"request_protocol": "http", "connection_security_policy": "mutual_tls",
			} {
				if vals[k] != want && !(vals["response_code"] == "403" && strings.HasPrefix(k, "destination_") && !strings.HasPrefix(k, "destination_service")) {
					t.Errorf("%s{response_code=%s}: %s=%q, want %q", name, vals["response_code"], k, vals[k], want)
				}
			}
		}
	}

	eventually(t, 10e9, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(flows) >= 2
	}, "two request flows")
	mu.Lock()
	defer mu.Unlock()
	ok, denied := flows[0], flows[1]
	if ok.Type != telemetry.FlowRequest || ok.Verdict != telemetry.VerdictAllowed || ok.Method != "GET" || ok.Path != "/a" ||
		ok.ResponseCode != 200 || ok.Reporter != "waypoint" || ok.Source.Identity != e.cliID.String() || ok.Source.Workload != "client" ||
		ok.Destination.Workload != "reviews-v1" || ok.Service != svc || ok.Transport != "HTTP/1.1" {
		t.Errorf("allowed request flow %+v", ok)
	}
	if denied.Verdict != telemetry.VerdictDenied || denied.Method != "POST" || denied.ResponseCode != 403 {
		t.Errorf("denied request flow %+v", denied)
	}
}
