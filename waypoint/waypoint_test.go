package waypoint

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
)

const svc = "reviews.shop.svc.cluster.local"

var target = testVIP + ":80"

func whoami(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", name)
		w.Header().Set("X-Seen-Proto", r.Proto)
		w.Header().Set("X-Seen-Path", r.URL.RequestURI())
		w.Header().Set("X-Seen-Host", r.Host)
		w.Header().Set("X-Seen-Request-Id", r.Header.Get("X-Request-Id"))
		w.Header().Set("X-Seen-Traceparent", r.Header.Get("Traceparent"))
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s:%d", name, len(b))
	}
}

// TestHTTP1AndH2C: both tunnelled protocols are detected and routed, the
// upstream speaks what the cluster says, x-request-id and traceparent are
// propagated (generated when absent, continued when present).
func TestHTTP1AndH2C(t *testing.T) {
	e := newEnv(t, nil)
	b1 := newBackend(t, whoami("h1"))
	b2 := newH2CBackend(t, whoami("h2"))
	c1, c2 := clusterName("v1."+svc), clusterName("v2."+svc)
	rs := []Resource{
		res(listener(httpFC(testVIP, 80, svc))),
		res(routeConfig(chainName(80, svc),
			toCluster(prefixMatch("/h2"), c2),
			toCluster(prefixMatch("/"), c1))),
		res(edsCluster(c1)), res(cla(c1, ep{addr: b1.addr})),
		res(edsCluster(c2, protocolOptions(true, 0))), res(cla(c2, ep{addr: b2.addr})),
	}
	e.apply(rs...)
	for _, h2 := range []bool{false, true} {
		c := e.client(e.cliID, target, h2)
		code, body, hdr := get(t, c, "http://"+svc+"/x?q=1")
		if code != 200 || body != "h1:0" || hdr.Get("X-Seen-Proto") != "HTTP/1.1" || hdr.Get("X-Seen-Path") != "/x?q=1" {
			t.Fatalf("h2=%v: %d %q %v", h2, code, body, hdr)
		}
		if hdr.Get("X-Seen-Request-Id") == "" || !strings.HasPrefix(hdr.Get("X-Seen-Traceparent"), "00-") {
			t.Errorf("h2=%v: request id %q traceparent %q not generated", h2, hdr.Get("X-Seen-Request-Id"), hdr.Get("X-Seen-Traceparent"))
		}
		tp := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
		code, body, hdr = get(t, c, "http://"+svc+"/h2/y", "X-Request-Id", "abc", "Traceparent", tp)
		if code != 200 || body != "h2:0" || hdr.Get("X-Seen-Proto") != "HTTP/2.0" {
			t.Fatalf("h2=%v: %d %q %v", h2, code, body, hdr)
		}
		got := hdr.Get("X-Seen-Traceparent")
		if hdr.Get("X-Seen-Request-Id") != "abc" || !strings.HasPrefix(got, "00-0af7651916cd43dd8448eb211c80319c-") || got == tp {
			t.Errorf("h2=%v: request id %q traceparent %q: want abc and the same trace, a new span", h2, hdr.Get("X-Seen-Request-Id"), got)
		}
	}
}
