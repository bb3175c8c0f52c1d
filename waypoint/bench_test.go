package waypoint

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
)

// usage is what the process has used so far: CPU time, context switches
// (voluntary: a thread that parked, as when a goroutine hand-off finds no
// other work) and read/write syscalls (/proc/self/io; zero without it).
type usage struct {
	cpu                time.Duration
	csw, reads, writes int64
}

func usageNow() usage {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	u := usage{cpu: time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), csw: ru.Nvcsw}
	b, _ := os.ReadFile("/proc/self/io")
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ": ")
		n, _ := strconv.ParseInt(v, 10, 64)
		switch k {
		case "syscr":
			u.reads = n
		case "syscw":
			u.writes = n
		}
	}
	return u
}

// BenchmarkWaypoint: sequential requests, client -> HBONE -> waypoint ->
// backend; reports p50/p99 per request and the process's CPU time per
// request, with its voluntary context switches and read/write syscalls
// (client, waypoint and backend: less sensitive than ns/op to other work
// on a shared machine).
//   - http1, h2c: 1 KiB GETs, the backend in plain TCP (HTTP/1.1 or h2c
//     in the tunnel);
//   - http1-hbone: 1 KiB POSTs echoed, the backend behind an HBONE server
//     (a ztunnel's inbound): the bench's waypoint path.
func BenchmarkWaypoint(b *testing.B) {
	for _, name := range []string{"http1", "h2c", "http1-hbone"} {
		b.Run(name, func(b *testing.B) {
			e := newEnv(b, nil)
			body := strings.Repeat("x", 1024)
			cl := clusterName(svc)
			post := name == "http1-hbone"
			if post {
				be := newBackend(b, func(w http.ResponseWriter, r *http.Request) { p, _ := io.ReadAll(r.Body); w.Write(p) })
				port := benchHBONEFront(b, e)
				md := map[string]any{"identity": wid(b, "shop", "reviews").String(), "hbone_port": float64(port),
					"workload": "reviews-v1", "namespace": "shop", "canonical_service": "reviews", "canonical_revision": "v1"}
				e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: be.addr, md: md}}})...)
			} else {
				be := newBackend(b, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })
				e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: be.addr}}})...)
			}
			c := e.client(e.cliID, target, name == "h2c")
			lat := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			u0 := usageNow()
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				var resp *http.Response
				var err error
				if post {
					resp, err = c.Post("http://"+svc+"/", "text/plain", bytes.NewReader([]byte(body)))
				} else {
					resp, err = c.Get("http://" + svc + "/")
				}
				if err != nil {
					b.Fatal(err)
				}
				n, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || n != 1024 {
					b.Fatalf("%d, %d bytes", resp.StatusCode, n)
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			u := usageNow()
			n := float64(b.N)
			b.ReportMetric(float64((u.cpu-u0.cpu).Nanoseconds())/1000/n, "cpu-µs/op")
			b.ReportMetric(float64(u.csw-u0.csw)/n, "csw/op")
			b.ReportMetric(float64(u.reads-u0.reads)/n, "reads/op")
			b.ReportMetric(float64(u.writes-u0.writes)/n, "writes/op")
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}

// benchHBONEFront is a destination's HBONE inbound (as a ztunnel's): it
// accepts tunnels to any target and joins them to the target over TCP. It
// returns its port.
func benchHBONEFront(b testing.TB, e *env) int {
	front := &hbone.Server{Certs: e.certs,
		LocalIdentity: func(netip.Addr) (spiffeid.ID, bool) { return wid(b, "shop", "reviews"), true },
		Handler: hbone.HandlerFunc(func(ctx context.Context, r *hbone.Request) {
			var nd net.Dialer
			up, err := nd.DialContext(ctx, "tcp", r.Target.String())
			if err != nil {
				r.Reject(503)
				return
			}
			s, err := r.Accept()
			if err != nil {
				up.Close()
				return
			}
			hbone.Join(ctx, s, up)
		})}
	ln := listen(b)
	done := make(chan error, 1)
	go func() { done <- front.Serve(ln) }()
	b.Cleanup(func() {
		front.Close()
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			b.Error(err)
		}
	})
	return ln.Addr().(*net.TCPAddr).Port
}
