package waypoint

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/durationpb"
)

// TestCanarySplit: weighted_clusters 90/10 over 1000 requests lands within
// 3 points of 90%; re-weighted to 50/50, the next 1000 land within 3
// points of 50%.
func TestCanarySplit(t *testing.T) {
	e := newEnv(t, nil)
	v1, v2 := newBackend(t, whoami("v1")), newBackend(t, whoami("v2"))
	c1, c2 := clusterName("v1."+svc), clusterName("v2."+svc)
	cfg := func(w1, w2 uint32) []Resource {
		return simple(svc, []*routev3.Route{weighted(prefixMatch("/"), map[string]uint32{c1: w1, c2: w2})},
			map[string][]ep{c1: {{addr: v1.addr}}, c2: {{addr: v2.addr}}})
	}
	c := e.client(e.cliID, target, false)
	measure := func() float64 {
		n := 0
		for range 1000 {
			code, body, _ := get(t, c, "http://"+svc+"/")
			if code != 200 {
				t.Fatalf("status %d", code)
			}
			if strings.HasPrefix(body, "v1") {
				n++
			}
		}
		return float64(n) / 10
	}
	e.apply(cfg(90, 10)...)
	p := measure()
	t.Logf("90/10: measured %.1f%% to v1", p)
	if p < 87 || p > 93 {
		t.Errorf("90/10 split: %.1f%% to v1", p)
	}
	start := time.Now()
	e.apply(cfg(50, 50)...)
	took := time.Since(start) // Apply is synchronous: the next request uses the new split
	p = measure()
	t.Logf("50/50: measured %.1f%% to v1 over the 1000 requests right after Apply (which took %v)", p, took)
	if p < 47 || p > 53 {
		t.Errorf("50/50 split: %.1f%% to v1", p)
	}
}

// TestRetries: retry_on 5xx with 2 retries (3 attempts), previous_hosts.
//   - a backend failing every other request with 503 (50%): >= 99% succeed;
//   - two replicas, one always 503 (50% of answers): >= 99% succeed (the
//     retry avoids the host that failed);
//   - a backend failing each request independently with p=0.5: 87.5%
//     expected (1 - 0.5^3); exhausted retries are flagged URX.
func TestRetries(t *testing.T) {
	var alt atomic.Int64
	alternating := func(w http.ResponseWriter, r *http.Request) {
		if alt.Add(1)%2 == 0 {
			w.WriteHeader(503)
			return
		}
		fmt.Fprint(w, "ok")
	}
	broken := func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) }
	coin := func(w http.ResponseWriter, r *http.Request) {
		if rand.IntN(2) == 0 {
			w.WriteHeader(503)
			return
		}
		fmt.Fprint(w, "ok")
	}
	for _, tc := range []struct {
		name     string
		backends []http.HandlerFunc
		min, max float64
	}{
		{"alternating", []http.HandlerFunc{alternating}, 99, 100},
		{"one replica broken", []http.HandlerFunc{broken, whoami("ok")}, 99, 100},
		{"independent coin", []http.HandlerFunc{coin, coin}, 84, 91},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			var calls atomic.Int64
			var eps []ep
			for _, h := range tc.backends {
				b := newBackend(t, func(w http.ResponseWriter, r *http.Request) { calls.Add(1); h(w, r) })
				eps = append(eps, ep{addr: b.addr})
			}
			cl := clusterName(svc)
			e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, retries("5xx", 2, 0))},
				map[string][]ep{cl: eps})...)
			c := e.client(e.cliID, target, false)
			ok := 0
			const n = 1000
			for range n {
				if code, _, _ := get(t, c, "http://"+svc+"/"); code == 200 {
					ok++
				}
			}
			urx := int(scrape(t, e.metric, "istio_requests_total", `response_flags="URX"`))
			rate := float64(ok) / n * 100
			t.Logf("retries (%s): %.1f%% success over %d requests, %d upstream attempts, %d exhausted (URX)", tc.name, rate, n, calls.Load(), urx)
			if rate < tc.min || rate > tc.max {
				t.Errorf("success %.1f%%, want [%v, %v]", rate, tc.min, tc.max)
			}
			if urx != n-ok {
				t.Errorf("URX count %d, want %d (the failures)", urx, n-ok)
			}
			if calls.Load() < n*14/10 {
				t.Errorf("only %d attempts for %d requests: retries not happening", calls.Load(), n)
			}
		})
	}
}

// TestRetryBodyBuffered: a POST body is replayed on retry; a body over the
// buffer bound is sent once and not retried.
func TestRetryBodyBuffered(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.RetryBufferBytes = 1024 })
	var calls atomic.Int64
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		body := make([]byte, 0)
		tmp := make([]byte, 4096)
		for {
			k, err := r.Body.Read(tmp)
			body = append(body, tmp[:k]...)
			if err != nil {
				break
			}
		}
		if calls.Add(1)%2 == 1 {
			w.WriteHeader(503)
			return
		}
		fmt.Fprintf(w, "%d", len(body))
	})
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, retries("5xx", 1, 0))},
		map[string][]ep{cl: {{addr: b.addr}}})...)
	c := e.client(e.cliID, target, false)
	post := func(size int) (int, string) {
		resp, err := c.Post("http://"+svc+"/", "text/plain", strings.NewReader(strings.Repeat("x", size)))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		sb := new(strings.Builder)
		buf := make([]byte, 512)
		for {
			n, err := resp.Body.Read(buf)
			sb.Write(buf[:n])
			if err != nil {
				break
			}
		}
		return resp.StatusCode, sb.String()
	}
	calls.Store(0)
	if code, body := post(600); code != 200 || body != "600" || calls.Load() != 2 {
		t.Errorf("small body: %d %q after %d calls; want 200 \"600\" after a retry", code, body, calls.Load())
	}
	calls.Store(0)
	if code, _ := post(5000); code != 503 || calls.Load() != 1 {
		t.Errorf("large body: %d after %d calls; want the 503, not retried", code, calls.Load())
	}
}

// TestPerTryTimeout: one replica hangs; a 100 ms per-try timeout with a
// retry to another host (previous_hosts) answers fast.
func TestPerTryTimeout(t *testing.T) {
	e := newEnv(t, nil)
	slow := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
		fmt.Fprint(w, "slow")
	})
	fast := newBackend(t, whoami("fast"))
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, retries("5xx", 2, 100*time.Millisecond))},
		map[string][]ep{cl: {{addr: slow.addr}, {addr: fast.addr}}})...)
	c := e.client(e.cliID, target, false)
	var worst time.Duration
	for range 20 {
		start := time.Now()
		code, body, _ := get(t, c, "http://"+svc+"/")
		d := time.Since(start)
		worst = max(worst, d)
		if code != 200 || !strings.HasPrefix(body, "fast") {
			t.Fatalf("%d %q", code, body)
		}
	}
	t.Logf("per-try timeout: worst latency %v over 20 requests (one replica hangs 2s)", worst)
	if worst > 500*time.Millisecond {
		t.Errorf("worst latency %v: the per-try timeout did not cut the slow try", worst)
	}
	// No retries: the per-try timeout alone answers 504 UT.
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, retries("5xx", 0, 100*time.Millisecond))},
		map[string][]ep{cl: {{addr: slow.addr}}})...)
	code, _, _ := get(t, c, "http://"+svc+"/")
	if code != 504 {
		t.Errorf("per-try timeout without retries: %d, want 504", code)
	}
}

// TestRouteTimeout: a 2 s backend with a 500 ms route timeout answers 504
// with flag UT in under 600 ms.
func TestRouteTimeout(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	})
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, timeout(500*time.Millisecond))},
		map[string][]ep{cl: {{addr: b.addr}}})...)
	c := e.client(e.cliID, target, false)
	start := time.Now()
	code, body, _ := get(t, c, "http://"+svc+"/")
	d := time.Since(start)
	t.Logf("route timeout: %d %q in %v", code, body, d)
	if code != 504 || d >= 600*time.Millisecond || d < 500*time.Millisecond {
		t.Errorf("got %d in %v; want 504 in [500ms, 600ms)", code, d)
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_code="504"`, `response_flags="UT"`); n != 1 {
		t.Errorf("504 UT counted %v times, want 1", n)
	}
}

// TestCircuitBreaker is Istio's oracle: maxConnections 1,
// http1MaxPendingRequests 1, maxRequestsPerConnection 1; 3 concurrent
// clients see some 503 UO, counted in metrics and /clusters.
func TestCircuitBreaker(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(20 * time.Millisecond)
		fmt.Fprint(w, "ok")
	})
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)},
		map[string][]ep{cl: {{addr: b.addr}}}, circuitBreakers(1, 1, 1024, 3), protocolOptions(false, 1))...)
	for _, conc := range []int{2, 3} {
		var ok, uo, other atomic.Int64
		var wg sync.WaitGroup
		for range conc {
			c := e.client(e.cliID, target, false)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 10 {
					resp, err := c.Get("http://" + svc + "/")
					if err != nil {
						other.Add(1)
						continue
					}
					resp.Body.Close()
					switch {
					case resp.StatusCode == 200:
						ok.Add(1)
					case resp.StatusCode == 503:
						uo.Add(1)
					default:
						other.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		t.Logf("circuit breaker -c %d -n %d: %d ok, %d 503, %d other", conc, conc*10, ok.Load(), uo.Load(), other.Load())
		if conc == 3 && uo.Load() == 0 {
			t.Errorf("-c 3: no 503 overflow")
		}
		if ok.Load() == 0 || other.Load() != 0 {
			t.Errorf("-c %d: %d ok, %d other", conc, ok.Load(), other.Load())
		}
	}
	m := scrape(t, e.metric, "istio_requests_total", `response_code="503"`, `response_flags="UO"`)
	if m == 0 {
		t.Errorf("no 503 UO in istio_requests_total")
	}
	var dump []clusterDump
	getJSON(t, e.admin+"/clusters", &dump)
	if len(dump) != 1 || dump[0].OverflowRq == 0 || float64(dump[0].OverflowRq+dump[0].OverflowMaxRq) != m {
		t.Errorf("/clusters overflow %+v, metrics %v", dump, m)
	}
}

// TestOutlierEjection: one of three replicas answers 500; after 5
// consecutive errors it is ejected, then the others serve >= 99%; it comes
// back after the ejection time.
func TestOutlierEjection(t *testing.T) {
	e := newEnv(t, nil)
	var badCalls atomic.Int64
	bad := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		badCalls.Add(1)
		w.WriteHeader(500)
	})
	g1, g2 := newBackend(t, whoami("g1")), newBackend(t, whoami("g2"))
	cl := clusterName(svc)
	const ejection = 2 * time.Second
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)},
		map[string][]ep{cl: {{addr: bad.addr}, {addr: g1.addr}, {addr: g2.addr}}}, outlier(5, 50*time.Millisecond, ejection, 100))...)
	c := e.client(e.cliID, target, false)
	errs := 0
	for range 15 { // round robin: the bad host sees 5 of these
		if code, _, _ := get(t, c, "http://"+svc+"/"); code != 200 {
			errs++
		}
	}
	ejectedAt := time.Now()
	if errs != 5 || badCalls.Load() != 5 {
		t.Fatalf("%d errors, %d calls to the bad host before ejection; want 5", errs, badCalls.Load())
	}
	ok := 0
	for range 100 {
		if code, _, _ := get(t, c, "http://"+svc+"/"); code == 200 {
			ok++
		}
	}
	if time.Since(ejectedAt) >= ejection {
		t.Fatalf("too slow to measure inside the ejection")
	}
	t.Logf("outlier: after ejection %d/100 ok, bad host called %d times in all", ok, badCalls.Load())
	if ok < 99 {
		t.Errorf("after ejection %d%% success", ok)
	}
	var dump []clusterDump
	getJSON(t, e.admin+"/clusters", &dump)
	if dump[0].Ejections != 1 {
		t.Errorf("/clusters ejections %d, want 1", dump[0].Ejections)
	}
	before := badCalls.Load()
	eventually(t, 6*time.Second, func() bool {
		get(t, c, "http://"+svc+"/")
		return badCalls.Load() > before
	}, "the ejected host never came back")
	back := time.Since(ejectedAt)
	t.Logf("outlier: host back after %v (ejection time %v)", back, ejection)
	if back < ejection {
		t.Errorf("back after %v, before the ejection time %v", back, ejection)
	}
}

// TestNoHealthyUpstream: no endpoints answers 503 UH.
func TestNoHealthyUpstream(t *testing.T) {
	e := newEnv(t, nil)
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: nil})...)
	c := e.client(e.cliID, target, false)
	if code, body, _ := get(t, c, "http://"+svc+"/"); code != 503 || body != "no healthy upstream" {
		t.Errorf("%d %q", code, body)
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_flags="UH"`); n != 1 {
		t.Errorf("UH counted %v", n)
	}
}

// TestMirror: 50% of requests are copied to the shadow cluster with
// "-shadow" appended to the host; the client only sees the primary.
func TestMirror(t *testing.T) {
	e := newEnv(t, nil)
	var shadowed atomic.Int64
	var badHost atomic.Value
	primary := newBackend(t, whoami("primary"))
	shadow := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Host != svc+"-shadow" {
			badHost.Store(r.Host)
		}
		shadowed.Add(1)
	})
	cp, cs := clusterName(svc), clusterName("shadow."+svc)
	mirror := func(a *routev3.RouteAction) {
		a.RequestMirrorPolicies = []*routev3.RouteAction_RequestMirrorPolicy{{Cluster: cs,
			RuntimeFraction: &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{Numerator: 50, Denominator: typev3.FractionalPercent_HUNDRED}}}}
	}
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cp, mirror)},
		map[string][]ep{cp: {{addr: primary.addr}}, cs: {{addr: shadow.addr}}})...)
	c := e.client(e.cliID, target, false)
	const n = 400
	for range n {
		if code, body, _ := get(t, c, "http://"+svc+"/"); code != 200 || !strings.HasPrefix(body, "primary") {
			t.Fatalf("%d %q", code, body)
		}
	}
	eventually(t, 5*time.Second, func() bool {
		return scrape(t, e.metric, "ambit_waypoint_mirrored_requests_total") == float64(shadowed.Load()) && shadowed.Load() > 0
	}, "mirrors still in flight")
	pct := float64(shadowed.Load()) / n * 100
	t.Logf("mirror: %.1f%% of %d requests shadowed", pct, n)
	if pct < 40 || pct > 60 {
		t.Errorf("mirrored %.1f%%, want about 50%%", pct)
	}
	if h := badHost.Load(); h != nil {
		t.Errorf("shadow saw host %q", h)
	}
}

// TestHeaderMatchRouting: header, query and method matches pick routes;
// unmatched is 404 NR.
func TestHeaderMatchRouting(t *testing.T) {
	e := newEnv(t, nil)
	v1, v2, v3 := newBackend(t, whoami("v1")), newBackend(t, whoami("v2")), newBackend(t, whoami("v3"))
	c1, c2, c3 := clusterName("v1."+svc), clusterName("v2."+svc), clusterName("v3."+svc)
	m2 := prefixMatch("/")
	m2.Headers = []*routev3.HeaderMatcher{{Name: "x-user", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: exact("jason")}}}
	m3 := prefixMatch("/api")
	m3.QueryParameters = []*routev3.QueryParameterMatcher{{Name: "v", QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_StringMatch{StringMatch: exact("3")}}}
	m3.Headers = []*routev3.HeaderMatcher{{Name: ":method", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: exact("GET")}}}
	m1 := &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: "/api"}}
	e.apply(simple(svc, []*routev3.Route{toCluster(m2, c2), toCluster(m3, c3), toCluster(m1, c1)},
		map[string][]ep{c1: {{addr: v1.addr}}, c2: {{addr: v2.addr}}, c3: {{addr: v3.addr}}})...)
	c := e.client(e.cliID, target, false)
	for _, tc := range []struct {
		path, user string
		code       int
		want       string
	}{
		{"/api/x", "jason", 200, "v2"},
		{"/api/x?v=3", "", 200, "v3"},
		{"/api/x?v=2", "", 200, "v1"},
		{"/api", "", 200, "v1"},
		{"/apix", "", 404, ""},
	} {
		var hdr []string
		if tc.user != "" {
			hdr = []string{"X-User", tc.user}
		}
		code, body, _ := get(t, c, "http://"+svc+tc.path, hdr...)
		if code != tc.code || !strings.HasPrefix(body, tc.want) {
			t.Errorf("%s user=%q: %d %q, want %d %q", tc.path, tc.user, code, body, tc.code, tc.want)
		}
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_code="404"`, `response_flags="NR"`); n != 1 {
		t.Errorf("404 NR counted %v", n)
	}
}

// TestRedirectRewriteDirect: redirect, prefix/regex/host rewrites, header
// mutations and direct responses.
func TestRedirectRewriteDirect(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Path", r.URL.RequestURI())
		w.Header().Set("X-Seen-Host", r.Host)
		w.Header().Set("X-Seen-Added", r.Header.Get("X-Added"))
		w.Header().Set("X-Seen-Removed", r.Header.Get("X-Remove-Me"))
		w.Header().Set("X-Upstream-Only", "secret")
	})
	cl := clusterName(svc)
	redirect := &routev3.Route{Name: "redir", Match: prefixMatch("/old"), Action: &routev3.Route_Redirect{Redirect: &routev3.RedirectAction{
		HostRedirect: "new.example", PathRewriteSpecifier: &routev3.RedirectAction_PrefixRewrite{PrefixRewrite: "/new"},
		ResponseCode: routev3.RedirectAction_PERMANENT_REDIRECT}}}
	direct := &routev3.Route{Name: "direct", Match: prefixMatch("/teapot"), Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{
		Status: 418, Body: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: "short and stout"}}}}}
	rw := toCluster(prefixMatch("/v1/"), cl, func(a *routev3.RouteAction) {
		a.PrefixRewrite = "/internal/"
		a.HostRewriteSpecifier = &routev3.RouteAction_HostRewriteLiteral{HostRewriteLiteral: "backend.internal"}
	})
	rw.RequestHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-added", Value: "yes"}}}
	rw.RequestHeadersToRemove = []string{"x-remove-me"}
	rw.ResponseHeadersToRemove = []string{"x-upstream-only"}
	rw.ResponseHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-route", Value: "v1"}}}
	rx := toCluster(prefixMatch("/users/"), cl, func(a *routev3.RouteAction) {
		a.RegexRewrite = &matcherv3.RegexMatchAndSubstitute{Pattern: &matcherv3.RegexMatcher{Regex: "^/users/([0-9]+)/profile$"}, Substitution: `/profiles/\1`}
	})
	e.apply(simple(svc, []*routev3.Route{redirect, direct, rw, rx}, map[string][]ep{cl: {{addr: b.addr}}})...)
	c := e.client(e.cliID, target, false)
	code, _, hdr := get(t, c, "http://"+svc+"/old/page?a=1")
	if code != 308 || hdr.Get("Location") != "http://new.example/new/page?a=1" {
		t.Errorf("redirect: %d %q", code, hdr.Get("Location"))
	}
	code, body, _ := get(t, c, "http://"+svc+"/teapot")
	if code != 418 || body != "short and stout" {
		t.Errorf("direct: %d %q", code, body)
	}
	code, _, hdr = get(t, c, "http://"+svc+"/v1/a/b?q=z", "X-Remove-Me", "1")
	if code != 200 || hdr.Get("X-Seen-Path") != "/internal/a/b?q=z" || hdr.Get("X-Seen-Host") != "backend.internal" ||
		hdr.Get("X-Seen-Added") != "yes" || hdr.Get("X-Seen-Removed") != "" || hdr.Get("X-Upstream-Only") != "" || hdr.Get("X-Route") != "v1" {
		t.Errorf("rewrite: %d %v", code, hdr)
	}
	code, _, hdr = get(t, c, "http://"+svc+"/users/42/profile")
	if code != 200 || hdr.Get("X-Seen-Path") != "/profiles/42" {
		t.Errorf("regex rewrite: %d %q", code, hdr.Get("X-Seen-Path"))
	}
}

// TestClusterNotFound: a weighted share naming an undefined cluster gets
// cluster_not_found_response_code (500, as GAMMA asks).
func TestClusterNotFound(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, whoami("ok"))
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{weighted(prefixMatch("/"), map[string]uint32{cl: 50, "outbound|80||missing": 50},
		func(a *routev3.RouteAction) {
			a.ClusterNotFoundResponseCode = routev3.RouteAction_INTERNAL_SERVER_ERROR
		})},
		map[string][]ep{cl: {{addr: b.addr}}})...)
	c := e.client(e.cliID, target, false)
	codes := map[int]int{}
	for range 100 {
		code, _, _ := get(t, c, "http://"+svc+"/")
		codes[code]++
	}
	if codes[500] < 45 || codes[500] > 55 || codes[200]+codes[500] != 100 {
		t.Errorf("codes %v", codes)
	}
}

// TestStreamIdleTimeout: HCM stream_idle_timeout 400 ms: a backend silent
// before its headers gets 408 SI; one that stalls mid-body has the stream
// reset (flag SI); a slow but steady body is not cut.
func TestStreamIdleTimeout(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/silent":
			time.Sleep(2 * time.Second)
		case "/stall":
			w.Write([]byte("first"))
			w.(http.Flusher).Flush()
			time.Sleep(2 * time.Second)
			w.Write([]byte("late"))
		case "/steady":
			for range 10 {
				w.Write([]byte("tick"))
				w.(http.Flusher).Flush()
				time.Sleep(50 * time.Millisecond)
			}
		}
	})
	cl := clusterName(svc)
	e.apply(res(listener(httpFCWith(testVIP, 80, svc, func(h *hcmv3.HttpConnectionManager) {
		h.StreamIdleTimeout = durationpb.New(400 * time.Millisecond)
	}))), res(routeConfig(chainName(80, svc), toCluster(prefixMatch("/"), cl))), res(edsCluster(cl)), res(cla(cl, ep{addr: b.addr})))
	c := e.client(e.cliID, target, false)
	start := time.Now()
	if code, body, _ := get(t, c, "http://"+svc+"/silent"); code != 408 || body != "stream timeout" {
		t.Errorf("silent: %d %q", code, body)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("silent answered after %v", d)
	}
	resp, err := c.Get("http://" + svc + "/stall")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil || string(got) != "first" {
		t.Errorf("stall: %q %v; want the first chunk then an error", got, err)
	}
	if code, body, _ := get(t, c, "http://"+svc+"/steady"); code != 200 || body != strings.Repeat("tick", 10) {
		t.Errorf("steady: %d %q", code, body)
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_flags="SI"`); n != 2 {
		t.Errorf("SI counted %v, want 2", n)
	}
}

// TestPreviousHosts: RANDOM load balancing over two replicas, one always
// 503, one retry: with previous_hosts the retry always goes to the other
// replica (100%); without, it picks the broken one again half the time
// (about 75%).
func TestPreviousHosts(t *testing.T) {
	for _, avoid := range []bool{true, false} {
		e := newEnv(t, nil)
		bad := newBackend(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) })
		good := newBackend(t, whoami("good"))
		cl := clusterName(svc)
		rt := toCluster(prefixMatch("/"), cl, retries("5xx", 1, 0))
		if !avoid {
			rt.GetRoute().RetryPolicy.RetryHostPredicate = nil
		}
		e.apply(simple(svc, []*routev3.Route{rt}, map[string][]ep{cl: {{addr: bad.addr}, {addr: good.addr}}},
			func(c *clusterv3.Cluster) { c.LbPolicy = clusterv3.Cluster_RANDOM })...)
		c := e.client(e.cliID, target, false)
		ok := 0
		for range 400 {
			if code, _, _ := get(t, c, "http://"+svc+"/"); code == 200 {
				ok++
			}
		}
		pct := float64(ok) / 4
		t.Logf("previous_hosts=%v: %.1f%% success", avoid, pct)
		if avoid && pct < 100 || !avoid && (pct < 65 || pct > 85) {
			t.Errorf("previous_hosts=%v: %.1f%% success", avoid, pct)
		}
	}
}
