package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// WriteReport writes latest.json, latest.md and the latency plots
// (latency-c<N>.png) into dir.
func (r *Results) WriteReport(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "latest.json"), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	var plots []string
	for _, c := range r.Config.Connections {
		name := fmt.Sprintf("latency-c%d.png", c)
		ok, err := r.writePlot(filepath.Join(dir, name), c)
		if err != nil {
			return err
		}
		if ok {
			plots = append(plots, name)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "latest.md"), []byte(r.Markdown(plots)), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// pathTitles are the report's column names.
var pathTitles = map[string]string{PathDirect: "direct", PathHAProxy: "HAProxy pair", PathAmbit: "ambit", PathQUIC: "ambit over QUIC",
	PathWaypoint: "ambit waypoint", PathNginx: "nginx", PathHAProxyHTTP: "HAProxy HTTP mode"}

// Markdown renders the report: the main table with ratios, the targets,
// the per-round spread, what was not measured, and the micro-benchmarks.
func (r *Results) Markdown(plots []string) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	c := r.Config
	w("# ambit benchmark: direct vs HAProxy mTLS pair vs ambit\n\n")
	w("Run %s → %s on %s (%s CPUs, kernel %s; load average %s at start, %s at end; every process of the benchmark at nice %d). ",
		r.Started.Format("2006-01-02 15:04:05Z"), r.Finished.Format("15:04:05Z"), r.Machine["cpu"], r.Machine["cpus"], r.Machine["kernel"],
		r.Machine["loadavgAtStart"], r.Machine["loadavgAtEnd"], c.Nice)
	w("%d rounds; in each, every workload runs on every path before the next workload (order rotating per round). ", c.Rounds)
	w("Latency: fortio, %d-byte POST echoed (HTTP/1.1, keep-alive), %d req/s uniform, %g s per run, histogram resolution %g µs, all rounds merged. ",
		c.PayloadBytes, c.QPS, c.LatencySeconds, c.FortioResolutionUs)
	w("Throughput: iperf3, one connection, %g s (+1 s omitted) per run, median of rounds. ", c.ThroughputSeconds)
	w("New connections: fortio without keep-alive, %d concurrent, as fast as possible, %g s, median of rounds. ", c.ConnRateConns, c.ConnRateSeconds)
	w("Proxy CPU and RSS from /proc (utime+stime, VmRSS sampled every 100 ms, VmHWM).")
	if len(c.ZtunnelEnv) > 0 {
		w(" ztunnels ran with `%s`.", strings.Join(c.ZtunnelEnv, " "))
	}
	w("\n\n")
	var maxLoad float64
	for _, run := range r.Runs {
		maxLoad = max(maxLoad, run.LoadAvg)
	}
	if cpus, _ := strconv.Atoi(r.Machine["cpus"]); cpus > 0 && maxLoad > float64(cpus) {
		w("**Shared machine:** the 1-minute load average reached %.1f on %d CPUs during the runs (other work than this benchmark). ", maxLoad, cpus)
		w("Medians and CPU-time figures hold up; tail latencies (p99, and p90 over 64 connections) then measure scheduling delays as much as the paths: compare them across paths within this report, and see the per-run load in Rounds.\n\n")
	}

	// The main table and the per-proxy table are the L4 paths'; the L7
	// paths have their own section.
	var cols []string
	for _, p := range c.Paths {
		if !isL7(p) {
			cols = append(cols, p)
		}
	}
	w("| figure |")
	for _, p := range cols {
		w(" %s |", pathTitles[p])
	}
	hasAmbit := r.Summary[PathAmbit] != nil
	if hasAmbit {
		w(" ambit/direct | ambit/HAProxy |")
	}
	w("\n|---|")
	for range cols {
		w("---:|")
	}
	if hasAmbit {
		w("---:|---:|")
	}
	w("\n")
	row := func(label string, unit string, get func(*PathSummary) (float64, bool), noProxy bool) {
		w("| %s |", label)
		vals := map[string]float64{}
		for _, p := range cols {
			s := r.Summary[p]
			switch {
			case s == nil:
				w(" not measured |")
			case noProxy && p == PathDirect:
				w(" — |")
			default:
				v, ok := get(s)
				if !ok || math.IsNaN(v) {
					w(" n/a |")
					continue
				}
				vals[p] = v
				w(" %s |", num(v, unit))
			}
		}
		if hasAmbit {
			for _, p := range []string{PathDirect, PathHAProxy} {
				a, okA := vals[PathAmbit]
				d, okD := vals[p]
				if okA && okD && d != 0 {
					w(" %.2f× |", a/d)
				} else {
					w(" — |")
				}
			}
		}
		w("\n")
	}
	row("throughput, 1 connection (Gbit/s)", "", func(s *PathSummary) (float64, bool) { return s.ThroughputGbps, len(s.ThroughputRuns) > 0 }, false)
	for _, conns := range c.Connections {
		key := fmt.Sprintf("c%d", conns)
		for _, q := range []struct {
			name string
			get  func(*LatencySummary) float64
		}{{"p50", func(l *LatencySummary) float64 { return l.P50Ms }}, {"p90", func(l *LatencySummary) float64 { return l.P90Ms }}, {"p99", func(l *LatencySummary) float64 { return l.P99Ms }}} {
			row(fmt.Sprintf("latency %s, %d conn @ %d req/s (ms)", q.name, conns, c.QPS), "ms", func(s *PathSummary) (float64, bool) {
				l := s.Latency[key]
				if l == nil {
					return 0, false
				}
				return q.get(l), true
			}, false)
		}
	}
	for _, conns := range c.Connections {
		key := fmt.Sprintf("c%d", conns)
		row(fmt.Sprintf("achieved req/s of the %d-conn latency runs (asked %d)", conns, c.QPS), "", func(s *PathSummary) (float64, bool) {
			l := s.Latency[key]
			if l == nil {
				return 0, false
			}
			return l.ActualQPS, true
		}, false)
	}
	row("new connections per second", "", func(s *PathSummary) (float64, bool) { return s.ConnsPerSec, len(s.ConnsPerSecRuns) > 0 }, false)
	row("proxy CPU-seconds per GB (both proxies)", "", func(s *PathSummary) (float64, bool) { return s.CPUSecondsPerGB, s.CPUSecondsPerGB > 0 }, true)
	for _, conns := range c.Connections {
		key := fmt.Sprintf("c%d", conns)
		row(fmt.Sprintf("proxy CPU-seconds per 1000 requests, %d conn (both proxies)", conns), "", func(s *PathSummary) (float64, bool) {
			v, ok := s.CPUSecondsPer1000Req[key]
			return v, ok
		}, true)
		row(fmt.Sprintf("proxy vCPU at %d req/s, %d conn (client-side + server-side)", c.QPS, conns), "", func(s *PathSummary) (float64, bool) {
			var sum float64
			for _, m := range s.VCPU {
				sum += m[key]
			}
			return sum, len(s.VCPU) > 0
		}, true)
	}
	row(fmt.Sprintf("proxy RSS at %d req/s, larger of the two (MB)", c.QPS), "MB", func(s *PathSummary) (float64, bool) {
		var m int64
		for _, v := range s.RSSAtRate {
			m = max(m, v)
		}
		return float64(m) / (1 << 20), len(s.RSSAtRate) > 0
	}, true)
	row("proxy peak RSS (VmHWM), larger of the two (MB)", "MB", func(s *PathSummary) (float64, bool) {
		var m int64
		for _, v := range s.PeakRSS {
			m = max(m, v)
		}
		return float64(m) / (1 << 20), len(s.PeakRSS) > 0
	}, true)
	row("failed requests and runs", "count", func(s *PathSummary) (float64, bool) { return float64(s.Errors), true }, false)
	w("\n")

	r.transportsMarkdown(w)

	if len(r.NotMeasured) > 0 {
		w("## Not measured\n\n")
		for _, p := range sortedKeys(r.NotMeasured) {
			w("- **%s**: %s\n", pathTitles[p], oneLine(r.NotMeasured[p]))
		}
		w("\n")
	}

	w("## Targets (issue 8)\n\n| target | goal | measured | met |\n|---|---|---|---|\n")
	for _, t := range r.Targets {
		met := "—"
		if t.Met != nil {
			met = map[bool]string{true: "yes", false: "**no**"}[*t.Met]
		}
		w("| %s | %s | %s | %s |\n", t.Name, t.Goal, oneLine(t.Measured), met)
	}
	w("\n")

	if len(plots) > 0 {
		w("## Latency distributions\n\n")
		for _, p := range plots {
			w("![%s](%s)\n\n", p, p)
		}
	}

	w("## Per proxy\n\n| path | proxy |")
	for _, conns := range c.Connections {
		w(" vCPU at %d req/s, %d conn |", c.QPS, conns)
	}
	w(" RSS at rate (MB) | peak RSS (MB) |\n|---|---|")
	for range c.Connections {
		w("---:|")
	}
	w("---:|---:|\n")
	for _, p := range cols {
		s := r.Summary[p]
		if s == nil {
			continue
		}
		for _, proc := range sortedKeys(s.VCPU) {
			w("| %s | %s |", pathTitles[p], proc)
			for _, conns := range c.Connections {
				w(" %.3f |", s.VCPU[proc][fmt.Sprintf("c%d", conns)])
			}
			w(" %.1f | %.1f |\n", float64(s.RSSAtRate[proc])/(1<<20), float64(s.PeakRSS[proc])/(1<<20))
		}
	}
	w("\n")

	r.l7Section(w)

	w("## Rounds\n\nEvery run, in the order it ran (latency columns are fortio's own per-run figures).\n\n")
	w("| round | workload | path | result | p50 ms | p99 ms | proxy CPU-s | connections counted by the ztunnels | load avg | error |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---|\n")
	for _, run := range r.Runs {
		var cpu float64
		for _, p := range run.Proxies {
			cpu += p.CPUSeconds
		}
		res := ""
		switch run.Workload {
		case WorkThroughput:
			res = fmt.Sprintf("%.2f Gbit/s", run.Gbps)
		case WorkLatency:
			res = fmt.Sprintf("%.0f req/s, %d conn", run.ActualQPS, run.Connections)
		case WorkConnRate:
			res = fmt.Sprintf("%.0f conn/s", run.ActualQPS)
		case WorkHTTPThroughput:
			res = fmt.Sprintf("%.0f req/s, %d conn", run.ActualQPS, run.Connections)
		}
		zc := ""
		if run.Path == PathAmbit {
			zc = fmt.Sprintf("%.0f", run.ZtunnelConnections)
		}
		if run.Path == PathQUIC {
			zc = fmt.Sprintf("%.0f over h3", run.ZtunnelConnections)
		}
		if run.Path == PathWaypoint {
			zc = fmt.Sprintf("%.0f requests (waypoint)", run.WaypointRequests)
		}
		p50, p99 := "", ""
		if v, ok := run.FortioPercentilesMs["p50"]; ok {
			p50, p99 = fmt.Sprintf("%.3f", v), fmt.Sprintf("%.3f", run.FortioPercentilesMs["p99"])
		}
		w("| %d | %s | %s | %s | %s | %s | %.2f | %s | %.1f | %s |\n", run.Round, run.Workload, run.Path, res, p50, p99, cpu, zc, run.LoadAvg, oneLine(run.Error))
	}
	w("\n")

	if len(r.Profiles) > 0 || r.ProfileError != "" {
		w("## Where ztunnel's time and memory go (pprof)\n\n")
		w("Taken during extra runs after the measured rounds, with ztunnel rebuilt with a net/http/pprof listener (`go build -overlay`, sources untouched). ")
		w("Open one with `go tool pprof -http=: bench/results/<file>`.\n\n")
		if r.ProfileError != "" {
			w("Profiling incomplete: %s\n\n", oneLine(r.ProfileError))
		}
		cats := []string{}
		for _, c := range profileCategories {
			cats = append(cats, c.name)
		}
		cats = append(cats, "other")
		w("CPU samples by leaf function (percent of each profile):\n\n| ztunnel | run |")
		for _, c := range cats {
			w(" %s |", c)
		}
		w("\n|---|---|")
		for range cats {
			w("---:|")
		}
		w("\n")
		for _, p := range r.Profiles {
			if p.Kind != "cpu" {
				continue
			}
			w("| %s | %s |", p.Node, p.Workload)
			for _, c := range cats {
				w(" %.0f |", p.Breakdown[c])
			}
			w("\n")
		}
		w("\n")
		for _, p := range r.Profiles {
			w("<details><summary>%s, %s, %s profile: <code>%s</code></summary>\n\n```\n%s\n```\n</details>\n\n", p.Node, p.Workload, p.Kind, p.File, p.Top)
		}
	}

	if len(r.LinkRSS) > 0 || r.LinkRSSError != "" {
		w("## The RSS floor: what linking ztunnel's imports costs\n\n")
		w("Idle programs that only import a set of packages (init functions run, nothing else), RSS after one second:\n\n")
		if r.LinkRSSError != "" {
			w("Not measured: %s\n\n", oneLine(r.LinkRSSError))
		}
		if len(r.LinkRSS) > 0 {
			w("| imports | binary (MB) | idle RSS (MB) |\n|---|---:|---:|\n")
			for _, l := range r.LinkRSS {
				w("| %s | %.1f | %.1f |\n", l.Name, float64(l.BinaryBytes)/(1<<20), float64(l.RSSBytes)/(1<<20))
			}
			w("\n")
		}
	}

	w("## Go micro-benchmarks and control-plane scale\n\n")
	mb := r.Microbench
	switch {
	case mb == nil:
		w("Not run (meshbench was started without -microbench).\n\n")
	default:
		w("From `%s` (make bench runs `go test -run '^$' -bench . -benchmem` on ./hbone/... ./bpf/... ./istiod-lite/... first).\n\n", mb.File)
		for _, part := range []struct {
			title string
			cp    bool
		}{{"Data path (hbone, bpf)", false}, {"Control-plane scale (istiod-lite)", true}} {
			var rows []MicroResult
			for _, m := range mb.Results {
				if strings.Contains(m.Package, "istiod-lite") == part.cp {
					rows = append(rows, m)
				}
			}
			if len(rows) == 0 {
				continue
			}
			w("### %s\n\n| package | benchmark | metrics |\n|---|---|---|\n", part.title)
			for _, m := range rows {
				var ms []string
				for _, u := range sortedKeys(m.Metrics) {
					ms = append(ms, fmt.Sprintf("%s %s", num(m.Metrics[u], "bench"), u))
				}
				w("| %s | %s | %s |\n", strings.TrimPrefix(m.Package, "github.com/ambit-mesh/ambit/"), m.Name, strings.Join(ms, ", "))
			}
			w("\n")
		}
		for _, f := range mb.Failed {
			w("- failed: `%s`\n", f)
		}
		for _, k := range sortedKeys(mb.Notes) {
			w("- %s: %s\n", k, mb.Notes[k])
		}
		w("\n")
	}

	w("## Tools\n\n")
	for _, k := range sortedKeys(r.Tools) {
		w("- %s: %s\n", k, r.Tools[k])
	}
	return b.String()
}

func num(v float64, unit string) string {
	switch {
	case unit == "ms":
		return fmt.Sprintf("%.3f", v)
	case unit == "count" || (unit == "bench" && v == math.Trunc(v)):
		return fmt.Sprintf("%.0f", v)
	case unit == "MB":
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 1000:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 0.1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.4f", v)
	}
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	s = strings.ReplaceAll(s, "|", "\\|")
	if len(s) > 400 {
		s = s[:400] + "…"
	}
	return s
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
