package waypoint

import (
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// BenchmarkWaypoint: sequential 1 KiB GETs, client -> HBONE -> waypoint ->
// backend, HTTP/1.1 both sides; reports p50/p99 per request.
func BenchmarkWaypoint(b *testing.B) {
	for _, h2 := range []bool{false, true} {
		name := "http1"
		if h2 {
			name = "h2c"
		}
		b.Run(name, func(b *testing.B) {
			e := newEnv(b, nil)
			body := strings.Repeat("x", 1024)
			be := newBackend(b, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })
			cl := clusterName(svc)
			e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: be.addr}}})...)
			c := e.client(e.cliID, target, h2)
			lat := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				resp, err := c.Get("http://" + svc + "/")
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}
