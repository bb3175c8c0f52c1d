package waypoint

import (
	"runtime"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
)

// proxyGoroutines counts goroutines running the waypoint's own code
// (tests excluded).
func proxyGoroutines() (int, string) {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "ambit/waypoint.(*Proxy)") || strings.Contains(g, "ambit/waypoint.(*oneConnListener)") {
			n++
			out = append(out, g)
		}
	}
	return n, strings.Join(out, "\n\n")
}

// TestCloseLeavesNothing: after traffic of every kind (HTTP/1.1, HTTP/2,
// retries, mirrors, TCP), shutting down leaves no goroutine of the proxy
// and Close is idempotent.
func TestCloseLeavesNothing(t *testing.T) {
	e := newEnv(t, nil)
	b, shadow := newBackend(t, whoami("b")), newBackend(t, whoami("shadow"))
	cl, cs := clusterName(svc), clusterName("shadow."+svc)
	mirror := func(a *routev3.RouteAction) {
		a.RequestMirrorPolicies = []*routev3.RouteAction_RequestMirrorPolicy{{Cluster: cs,
			RuntimeFraction: &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{Numerator: 100}}}}
	}
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, mirror, retries("5xx", 2, time.Second))},
		map[string][]ep{cl: {{addr: b.addr}}, cs: {{addr: shadow.addr}}})...)
	for _, h2 := range []bool{false, true} {
		c := e.client(e.cliID, target, h2)
		for range 5 {
			if code, _, _ := get(t, c, "http://"+svc+"/"); code != 200 {
				t.Fatal(code)
			}
		}
		c.CloseIdleConnections()
	}
	e.cancel()
	if err := <-e.done; err != nil {
		t.Fatal(err)
	}
	e.done <- nil
	e.p.Close()
	e.p.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, stacks := proxyGoroutines()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d proxy goroutines left after Close:\n%s", n, stacks)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
