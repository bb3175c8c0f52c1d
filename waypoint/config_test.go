package waypoint

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestConfigRejected: unsupported behaviour-changing fields and invalid
// values are refused with the field's path; the last good config keeps
// serving; an incomplete set is ErrIncomplete.
func TestConfigRejected(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, whoami("good"))
	cl := clusterName(svc)
	good := simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})
	e.apply(good...)
	c := e.client(e.cliID, target, false)

	hashRoute := toCluster(prefixMatch("/"), cl, func(a *routev3.RouteAction) {
		a.HashPolicy = []*routev3.RouteAction_HashPolicy{{PolicySpecifier: &routev3.RouteAction_HashPolicy_Header_{
			Header: &routev3.RouteAction_HashPolicy_Header{HeaderName: "x"}}}}
	})
	badRegex := prefixMatch("/")
	badRegex.Headers = []*routev3.HeaderMatcher{{Name: "x", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{
		StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "("}}}}}}
	for _, tc := range []struct {
		name string
		rs   []Resource
		want string
	}{
		{"hash policy", simple(svc, []*routev3.Route{hashRoute}, map[string][]ep{cl: {{addr: b.addr}}}),
			`virtual_hosts[0].routes[0].route.hash_policy: field not supported`},
		{"ring hash", simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}},
			func(c *clusterv3.Cluster) { c.LbPolicy = clusterv3.Cluster_RING_HASH }), `lb_policy: RING_HASH not supported`},
		{"transport socket", simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}},
			func(c *clusterv3.Cluster) { c.TransportSocket = &corev3.TransportSocket{Name: "tls"} }), `cluster "outbound|80||` + svc + `": transport_socket: field not supported`},
		{"success rate", simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}},
			outlier(5, time.Second, time.Second, 10), func(c *clusterv3.Cluster) { c.OutlierDetection.EnforcingSuccessRate = wrapperspb.UInt32(100) }),
			`outlier_detection.enforcing_success_rate: must be 0`},
		{"bad regex", simple(svc, []*routev3.Route{toCluster(badRegex, cl)}, map[string][]ep{cl: {{addr: b.addr}}}),
			`routes[0].match.headers[0].string_match.safe_regex.regex`},
		{"retry_on", simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, retries("5xx,bogus", 1, 0))}, map[string][]ep{cl: {{addr: b.addr}}}),
			`retry_policy.retry_on: condition "bogus" not supported`},
		{"validate", simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), "")}, map[string][]ep{cl: {{addr: b.addr}}}),
			`Cluster: value length must be at least 1`},
	} {
		err := e.p.Apply(tc.rs)
		if err == nil || errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
		if code, body, _ := get(t, c, "http://"+svc+"/"); code != 200 || !strings.HasPrefix(body, "good") {
			t.Fatalf("%s: last good config not serving: %d %q", tc.name, code, body)
		}
	}
	// Incomplete: the route config is missing.
	err := e.p.Apply(good[:1])
	if !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), `route "`+chainName(80, svc)+`"`) {
		t.Errorf("incomplete: %v", err)
	}
	// The config dump shows the good set with versions and the last rejection.
	var dump struct {
		Resources    []dumpedResource `json:"resources"`
		LastRejected string           `json:"last_rejected"`
	}
	getJSON(t, e.admin+"/config_dump", &dump)
	if len(dump.Resources) != len(good) || dump.Resources[0].Version != "v1" || !strings.Contains(string(dump.Resources[0].Resource), "main_internal") {
		t.Errorf("config_dump: %d resources, first %+v", len(dump.Resources), dump.Resources[0])
	}
	if !strings.Contains(dump.LastRejected, "not supported") && !strings.Contains(dump.LastRejected, "length") {
		t.Errorf("last_rejected %q", dump.LastRejected)
	}
}

// TestConfigSwapUnderLoad: two configs alternate while clients send
// requests; each routes to its own backend and stamps its name on the
// response, so a half-applied snapshot would show a mismatch or an error.
func TestConfigSwapUnderLoad(t *testing.T) {
	e := newEnv(t, nil)
	ba, bb := newBackend(t, whoami("A")), newBackend(t, whoami("B"))
	cfg := func(name string, b *backend) []Resource {
		cl := clusterName(name + "." + svc)
		r := toCluster(prefixMatch("/"), cl)
		r.ResponseHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-config", Value: name}}}
		rs := simple(svc, []*routev3.Route{r}, map[string][]ep{cl: {{addr: b.addr}}})
		for i := range rs {
			rs[i].Version = name
		}
		return rs
	}
	a, b := cfg("A", ba), cfg("B", bb)
	e.apply(a...)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var n, bad atomic.Int64
	var firstBad atomic.Value
	for range 4 {
		c := e.client(e.cliID, target, false)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Get("http://" + svc + "/")
				n.Add(1)
				if err != nil {
					bad.Add(1)
					firstBad.CompareAndSwap(nil, err.Error())
					continue
				}
				body := new(strings.Builder)
				buf := make([]byte, 64)
				for {
					k, err := resp.Body.Read(buf)
					body.Write(buf[:k])
					if err != nil {
						break
					}
				}
				resp.Body.Close()
				if resp.StatusCode != 200 || !strings.HasPrefix(body.String(), resp.Header.Get("X-Config")+":") {
					bad.Add(1)
					firstBad.CompareAndSwap(nil, fmt.Sprintf("%d %q config %q", resp.StatusCode, body.String(), resp.Header.Get("X-Config")))
				}
			}
		}()
	}
	swaps := 0
	for i := 0; i < 200 || n.Load() < 1000; i++ {
		rs := a
		if i%2 == 0 {
			rs = b
		}
		e.apply(rs...)
		swaps++
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("config swap: %d swaps under %d requests, %d inconsistent", swaps, n.Load(), bad.Load())
	if bad.Load() != 0 {
		t.Errorf("%d bad answers; first: %v", bad.Load(), firstBad.Load())
	}
}

// TestClusterStateKept: an update that keeps a cluster and its endpoint
// keeps its connections (the pool) and circuit-breaker state.
func TestClusterStateKept(t *testing.T) {
	e := newEnv(t, nil)
	var conns atomic.Int64
	hs := httptest.NewUnstartedServer(whoami("x"))
	hs.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	hs.Start()
	t.Cleanup(hs.Close)
	b := &backend{Server: hs, addr: netip.MustParseAddrPort(strings.TrimPrefix(hs.URL, "http://"))}
	cl := clusterName(svc)
	rs := simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})
	e.apply(rs...)
	c := e.client(e.cliID, target, false)
	for i := range 10 {
		if i%2 == 0 {
			rs[1] = res(routeConfig(chainName(80, svc), toCluster(prefixMatch("/"), cl, timeout(time.Duration(i+1)*time.Second))))
			e.apply(rs...)
		}
		if code, _, _ := get(t, c, "http://"+svc+"/"); code != 200 {
			t.Fatal(code)
		}
	}
	if conns.Load() != 1 {
		t.Errorf("%d upstream connections over 5 config updates, want 1 (pool kept)", conns.Load())
	}
}

// TestMaxRequestsPerConnection: HttpProtocolOptions max_requests_per_connection
// 3 on HTTP/1.1: nine sequential requests use three upstream connections.
func TestMaxRequestsPerConnection(t *testing.T) {
	e := newEnv(t, nil)
	var conns atomic.Int64
	hs := httptest.NewUnstartedServer(whoami("x"))
	hs.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	hs.Start()
	t.Cleanup(hs.Close)
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)},
		map[string][]ep{cl: {{addr: netip.MustParseAddrPort(strings.TrimPrefix(hs.URL, "http://"))}}}, protocolOptions(false, 3))...)
	c := e.client(e.cliID, target, false)
	for range 9 {
		if code, _, _ := get(t, c, "http://"+svc+"/"); code != 200 {
			t.Fatal(code)
		}
	}
	if conns.Load() != 3 {
		t.Errorf("%d upstream connections for 9 requests at 3 per connection", conns.Load())
	}
}
