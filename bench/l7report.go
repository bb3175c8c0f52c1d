package bench

import (
	"fmt"
	"math"
)

// Istio's published figures for its Envoy waypoint at 1000 req/s: the
// anchor of the L7 section.
const (
	anchorWaypointVCPU  = 0.25
	anchorWaypointRSSMB = 60
)

// l7Proxy is the process name of an L7 path's proxy: the waypoint (not the
// ztunnels around it), nginx (master and workers), HAProxy.
func l7Proxy(path string) string { return l7Pods[path] }

// l7Paths are the L7 paths of the run, in the configured order.
func (r *Results) l7Paths() []string {
	var out []string
	for _, p := range r.Config.Paths {
		if isL7(p) {
			out = append(out, p)
		}
	}
	return out
}

// l7Section writes the L7 paths' section: latency added over direct, HTTP
// throughput, and each L7 proxy's vCPU and RSS, against Istio's Envoy
// waypoint figures. Nothing when no L7 path was asked for.
func (r *Results) l7Section(w func(string, ...any)) {
	paths := r.l7Paths()
	if len(paths) == 0 {
		return
	}
	c := r.Config
	w("## The waypoint path (L7): ambit's waypoint vs nginx vs HAProxy in HTTP mode\n\n")
	w("An HTTP proxy in its own pod on node2, between a client pod on node1 and a server pod on node2:\n\n")
	w("```\nwaypoint      client-mesh ─[capture]─► ztunnel node1 ══HBONE══► waypoint pod ══HBONE══► ztunnel node2 ─► server-waypoint:8080\n")
	w("nginx         client-plain ─► nginx pod :8080 (proxy_pass, keepalive upstream) ─► server-plain:8080\n")
	w("haproxy-http  client-plain ─► haproxy pod :8080 (mode http) ─► server-plain:8080\n```\n\n")
	w("The client of the waypoint path dials the service VIP %s:8080 (bound to the waypoint); the waypoint is `cmd/waypoint` with a local `--config` built by istiod-lite's `envoy.ForWaypoint` from the bench's model (default route, Istio's default retries), access logs off. ", serverVIP)
	w("nginx and HAProxy are plain TCP on both sides (no TLS), two workers / threads each; nginx's CPU and RSS are its master's plus its workers' (RSS summed: an upper bound). ")
	w("Added latency is over the direct path in the same run. HTTP throughput: fortio as fast as answered, %d connections, %d-byte POST echoed, median of rounds. ", httpThroughputConns, c.PayloadBytes)
	w("Anchor: Istio's Envoy waypoint uses %.2f vCPU and %d MB at 1000 req/s.\n\n", anchorWaypointVCPU, anchorWaypointRSSMB)

	dir := r.Summary[PathDirect]
	cols := append([]string{PathDirect}, paths...)
	w("| figure |")
	for _, p := range cols {
		w(" %s |", pathTitles[p])
	}
	w("\n|---|")
	for range cols {
		w("---:|")
	}
	w("\n")
	row := func(label string, get func(p string, s *PathSummary) (string, bool)) {
		w("| %s |", label)
		for _, p := range cols {
			s := r.Summary[p]
			if s == nil {
				w(" not measured |")
				continue
			}
			v, ok := get(p, s)
			if !ok {
				v = "—"
			}
			w(" %s |", v)
		}
		w("\n")
	}
	lat := func(s *PathSummary, key string) *LatencySummary {
		if s == nil {
			return nil
		}
		return s.Latency[key]
	}
	for _, conns := range c.Connections {
		key := fmt.Sprintf("c%d", conns)
		row(fmt.Sprintf("p50 / p90 / p99, %d conn @ %d req/s (ms)", conns, c.QPS), func(_ string, s *PathSummary) (string, bool) {
			l := lat(s, key)
			if l == nil {
				return "", false
			}
			return fmt.Sprintf("%.3f / %.3f / %.3f", l.P50Ms, l.P90Ms, l.P99Ms), true
		})
		row(fmt.Sprintf("added p50 / p90 / p99 over direct, %d conn (ms)", conns), func(p string, s *PathSummary) (string, bool) {
			l, d := lat(s, key), lat(dir, key)
			if p == PathDirect || l == nil || d == nil {
				return "", false
			}
			return fmt.Sprintf("%+.3f / %+.3f / %+.3f", l.P50Ms-d.P50Ms, l.P90Ms-d.P90Ms, l.P99Ms-d.P99Ms), true
		})
	}
	row(fmt.Sprintf("HTTP throughput, %d conn (req/s)", httpThroughputConns), func(_ string, s *PathSummary) (string, bool) {
		return fmt.Sprintf("%.0f", s.HTTPReqPerSec), len(s.HTTPReqPerSecRuns) > 0
	})
	for _, conns := range c.Connections {
		key := fmt.Sprintf("c%d", conns)
		row(fmt.Sprintf("L7 proxy vCPU @ %d req/s, %d conn", c.QPS, conns), func(p string, s *PathSummary) (string, bool) {
			m, ok := s.VCPU[l7Proxy(p)]
			if !ok || p == PathDirect {
				return "", false
			}
			v, ok := m[key]
			return fmt.Sprintf("%.3f", v), ok
		})
	}
	row(fmt.Sprintf("L7 proxy RSS @ %d req/s / peak (MB)", c.QPS), func(p string, s *PathSummary) (string, bool) {
		v, ok := s.RSSAtRate[l7Proxy(p)]
		if !ok || p == PathDirect {
			return "", false
		}
		return fmt.Sprintf("%.1f / %.1f", mb(v), mb(s.PeakRSS[l7Proxy(p)])), true
	})
	row("L7 proxy CPU-seconds per 1000 requests, HTTP throughput", func(p string, s *PathSummary) (string, bool) {
		v, ok := s.HTTPCPUSecondsPer1000Req[l7Proxy(p)]
		return fmt.Sprintf("%.3f", v), ok && p != PathDirect
	})
	for _, conns := range c.Connections {
		key := fmt.Sprintf("c%d", conns)
		row(fmt.Sprintf("its ztunnels' vCPU (both) @ %d req/s, %d conn", c.QPS, conns), func(p string, s *PathSummary) (string, bool) {
			if p != PathWaypoint {
				return "", false
			}
			var sum float64
			n := 0
			for proc, m := range s.VCPU {
				if proc != l7Proxy(p) {
					sum += m[key]
					n++
				}
			}
			return fmt.Sprintf("%.3f", sum), n > 0
		})
	}
	row("failed requests and runs", func(_ string, s *PathSummary) (string, bool) {
		return fmt.Sprintf("%d", s.Errors), true
	})
	w("\n")

	// The anchor: the waypoint process against Istio's Envoy waypoint.
	w("| waypoint at %d req/s | Istio's Envoy waypoint | ambit's waypoint | below it |\n|---|---:|---:|---|\n", c.QPS)
	wp := r.Summary[PathWaypoint]
	for _, conns := range c.Connections {
		key := fmt.Sprintf("c%d", conns)
		v := math.NaN()
		if wp != nil {
			if m, ok := wp.VCPU[l7Proxy(PathWaypoint)]; ok {
				if x, ok := m[key]; ok {
					v = x
				}
			}
		}
		w("| vCPU, %d conn | %.2f | %s | %s |\n", conns, anchorWaypointVCPU, fmtOr(v, "%.3f"), below(v, anchorWaypointVCPU))
	}
	v := math.NaN()
	if wp != nil {
		if x, ok := wp.RSSAtRate[l7Proxy(PathWaypoint)]; ok {
			v = mb(x)
		}
	}
	w("| RSS (MB) | %d | %s | %s |\n\n", anchorWaypointRSSMB, fmtOr(v, "%.1f"), below(v, anchorWaypointRSSMB))
}

func mb(b int64) float64 { return float64(b) / (1 << 20) }

// fmtOr formats v, or "not measured" when it is NaN.
func fmtOr(v float64, format string) string {
	if math.IsNaN(v) {
		return "not measured"
	}
	return fmt.Sprintf(format, v)
}

// below says whether v is below limit ("—" when not measured).
func below(v, limit float64) string {
	switch {
	case math.IsNaN(v):
		return "—"
	case v < limit:
		return fmt.Sprintf("yes (%.0f%%)", 100*v/limit)
	default:
		return fmt.Sprintf("**no** (%.0f%%)", 100*v/limit)
	}
}
