package waypoint

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/ambit-mesh/ambit/telemetry"
)

// TestFlowsNameDecidingPolicy: over real HBONE and HTTP, a request a DENY
// policy refuses, one an ALLOW policy lets through and one no ALLOW policy
// matches show, in the waypoint's /debug/flows, the AuthorizationPolicy that
// decided ("<ns>/<name>", from istiod-lite's Envoy policy names) or none;
// and the endpoint's cluster (EDS metadata) is the requests'
// destination_cluster.
func TestFlowsNameDecidingPolicy(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, whoami("data"))
	cl := clusterName(svc)
	anyone := []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}}
	deny := &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[no-post]-rule[0]": {Permissions: []*rbacv3.Permission{methodIs("POST")}, Principals: anyone}}}
	client := &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{
		PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: e.cliID.String()}}}}}
	allow := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[only-client]-rule[0]": {Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
			Principals: []*rbacv3.Principal{client}}}}
	md := map[string]any{"workload": "reviews-v1", "namespace": "shop", "canonical_service": "reviews", "canonical_revision": "v1",
		"cluster": "east-1"}
	e.apply(res(listener(httpFC(testVIP, 80, svc, deny, allow))), res(routeConfig(chainName(80, svc), toCluster(prefixMatch("/"), cl))),
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
		t.Fatalf("GET as the client: %d", code)
	}
	pr, err := c.Post("http://"+svc+"/b", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	pr.Body.Close()
	if pr.StatusCode != 403 {
		t.Fatalf("POST as the client: %d", pr.StatusCode)
	}
	intruder := e.client(wid(t, "shop", "intruder"), target, false)
	if code, _, _ := get(t, intruder, "http://"+svc+"/c"); code != 403 {
		t.Fatalf("GET as an intruder: %d", code)
	}

	eventually(t, 10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(flows) >= 3
	}, "three request flows")
	mu.Lock()
	got := append([]telemetry.Flow(nil), flows...)
	mu.Unlock()
	for i, want := range []struct {
		method, path, verdict, policy string
		code                          int
	}{
		{"GET", "/a", telemetry.VerdictAllowed, "shop/only-client", 200},
		{"POST", "/b", telemetry.VerdictDenied, "shop/no-post", 403},
		{"GET", "/c", telemetry.VerdictDenied, "", 403}, // no ALLOW policy matched: none decided alone
	} {
		fl := got[i]
		if fl.Method != want.method || fl.Path != want.path || fl.Verdict != want.verdict || fl.Policy != want.policy || fl.ResponseCode != want.code {
			t.Errorf("flow %d: %s %s verdict %q policy %q code %d; want %s %s %q %q %d",
				i, fl.Method, fl.Path, fl.Verdict, fl.Policy, fl.ResponseCode, want.method, want.path, want.verdict, want.policy, want.code)
		}
	}

	// destination_cluster from the endpoint's metadata; the refused
	// requests never picked an endpoint.
	if n := scrape(t, e.metric, "istio_requests_total", `response_code="200"`, `destination_cluster="east-1"`); n != 1 {
		t.Errorf("istio_requests_total{response_code=200,destination_cluster=east-1} = %v, want 1", n)
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_code="403"`, `destination_cluster="unknown"`); n != 2 {
		t.Errorf("istio_requests_total{response_code=403,destination_cluster=unknown} = %v, want 2", n)
	}
}

func TestPolicyKey(t *testing.T) {
	for in, want := range map[string]string{
		"ns[shop]-policy[only-client]-rule[0]":  "shop/only-client",
		"ns[shop]-policy[a]-rule[b]-rule[12]":   "shop/a]-rule[b",
		"ns[istio-system]-policy[mesh]-rule[3]": "istio-system/mesh",
		"some-envoy-policy":                     "some-envoy-policy",
		"ns[shop]-policy[x]":                    "ns[shop]-policy[x]",
		"ns[shop]-rule[0]":                      "ns[shop]-rule[0]",
	} {
		if got := policyKey(in); got != want {
			t.Errorf("policyKey(%q) = %q, want %q", in, got, want)
		}
	}
}
