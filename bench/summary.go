package bench

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"
)

// Results is everything one run of the harness measured, as written to
// latest.json. Summary and Targets are computed from Runs by Summarize.
type Results struct {
	Config      PublicConfig      `json:"config"`
	Started     time.Time         `json:"started"`
	Finished    time.Time         `json:"finished"`
	Machine     map[string]string `json:"machine"`
	Tools       map[string]string `json:"tools"`
	NotMeasured map[string]string `json:"notMeasured,omitempty"` // path -> reason
	// PeakRSS is each proxy's VmHWM at the end of all runs, in bytes.
	PeakRSS map[string]int64        `json:"peakRssBytes,omitempty"`
	Summary map[string]*PathSummary `json:"summary,omitempty"`
	Targets []Target                `json:"targets,omitempty"`
	// Profiles of the ztunnels, from extra runs after the measured ones.
	Profiles     []Profile `json:"profiles,omitempty"`
	ProfileError string    `json:"profileError,omitempty"`
	// LinkRSS is the idle RSS of programs linking ztunnel's imports.
	LinkRSS      []LinkRSS `json:"linkRss,omitempty"`
	LinkRSSError string    `json:"linkRssError,omitempty"`
	// Transports compares HBONE over HTTP/2 and HTTP/3 across the delay
	// line (the ambit and quic paths, quic.go).
	Transports      []TransportRun `json:"transports,omitempty"`
	TransportsError string         `json:"transportsError,omitempty"`
	// Microbench holds the Go benchmarks of the other packages.
	Microbench *Microbench `json:"microbench,omitempty"`
	Runs       []Run       `json:"runs"`
}

// PublicConfig is the part of Config that describes the measurement.
type PublicConfig struct {
	Paths              []string `json:"paths"`
	Rounds             int      `json:"rounds"`
	QPS                int      `json:"qps"`
	Connections        []int    `json:"connections"`
	PayloadBytes       int      `json:"payloadBytes"`
	LatencySeconds     float64  `json:"latencySeconds"`
	ThroughputSeconds  float64  `json:"throughputSeconds"`
	ConnRateSeconds    float64  `json:"connRateSeconds"`
	ConnRateConns      int      `json:"connRateConnections"`
	Nice               int      `json:"nice"`
	ZtunnelEnv         []string `json:"ztunnelEnv,omitempty"`
	FortioResolutionUs float64  `json:"fortioResolutionMicros"`
}

func (c Config) public() PublicConfig {
	return PublicConfig{
		Paths: c.Paths, Rounds: c.Rounds, QPS: c.QPS, Connections: c.Connections, PayloadBytes: c.Payload,
		LatencySeconds: c.LatencyTime.Seconds(), ThroughputSeconds: c.ThroughputTime.Seconds(),
		ConnRateSeconds: c.ConnRateTime.Seconds(), ConnRateConns: c.ConnRateConns, Nice: c.Nice, ZtunnelEnv: c.ZtunnelEnv, FortioResolutionUs: fortioResolution * 1e6,
	}
}

// PathSummary aggregates one path's runs over all rounds. Zero values mean
// "no such run" (a path without proxies has no proxy figures).
type PathSummary struct {
	// ThroughputGbps is the median of the rounds' iperf3 results.
	ThroughputGbps float64   `json:"throughputGbps"`
	ThroughputRuns []float64 `json:"throughputRunsGbps"`
	// Latency by connection count ("c1", "c64"), from the rounds' merged
	// histograms.
	Latency map[string]*LatencySummary `json:"latency"`
	// ConnsPerSec is the median of the rounds' new-connection rates.
	ConnsPerSec     float64   `json:"connsPerSec"`
	ConnsPerSecRuns []float64 `json:"connsPerSecRuns"`
	// Proxy figures: CPU of all the path's proxies together.
	CPUSecondsPerGB      float64            `json:"cpuSecondsPerGB,omitempty"`
	CPUSecondsPer1000Req map[string]float64 `json:"cpuSecondsPer1000Requests,omitempty"` // by "c1", "c64"
	// VCPU is each proxy's CPU seconds per second during the latency runs,
	// by proxy then "c1", "c64".
	VCPU map[string]map[string]float64 `json:"vcpuAtFixedRate,omitempty"`
	// RSSAtRate is each proxy's largest sampled RSS during the latency runs.
	RSSAtRate map[string]int64 `json:"rssAtFixedRateBytes,omitempty"`
	// PeakRSS is each proxy's VmHWM after all runs.
	PeakRSS map[string]int64 `json:"peakRssBytes,omitempty"`
	// HTTPReqPerSec is the median of the rounds' HTTP throughput runs
	// (fortio as fast as answered, WorkHTTPThroughput); L7 paths and direct.
	HTTPReqPerSec     float64   `json:"httpReqPerSec,omitempty"`
	HTTPReqPerSecRuns []float64 `json:"httpReqPerSecRuns,omitempty"`
	// HTTPCPUSecondsPer1000Req is the proxies' CPU per 1000 requests of the
	// HTTP throughput runs, by proxy.
	HTTPCPUSecondsPer1000Req map[string]float64 `json:"httpCpuSecondsPer1000Requests,omitempty"`
	// Errors counts failed requests and failed runs.
	Errors    int64    `json:"errors"`
	RunErrors []string `json:"runErrors,omitempty"`
}

// LatencySummary is the latency of the fixed-rate runs at one connection
// count, all rounds merged.
type LatencySummary struct {
	Connections int     `json:"connections"`
	Requests    int64   `json:"requests"`
	Errors      int64   `json:"errors"`
	ActualQPS   float64 `json:"actualQps"` // mean over rounds
	P50Ms       float64 `json:"p50Ms"`
	P90Ms       float64 `json:"p90Ms"`
	P99Ms       float64 `json:"p99Ms"`
	P999Ms      float64 `json:"p999Ms"`
	// Curve is the latency (ms) at percentiles, for plots.
	Curve [][2]float64 `json:"curve"` // [percentile, ms]
}

// Target is one of issue 8's goals, with what was measured against it.
type Target struct {
	Name     string  `json:"name"`
	Goal     string  `json:"goal"`
	Measured string  `json:"measured"`
	Value    float64 `json:"value"`
	Limit    float64 `json:"limit"`
	Met      *bool   `json:"met"` // nil: not measured
}

// Summarize computes Summary and Targets from Runs.
func (r *Results) Summarize() {
	r.Summary = map[string]*PathSummary{}
	for _, name := range r.Config.Paths {
		if _, skip := r.NotMeasured[name]; skip {
			continue
		}
		r.Summary[name] = summarizePath(r, name)
	}
	r.Targets = targets(r)
}

func summarizePath(r *Results, name string) *PathSummary {
	s := &PathSummary{Latency: map[string]*LatencySummary{}, CPUSecondsPer1000Req: map[string]float64{},
		VCPU: map[string]map[string]float64{}, RSSAtRate: map[string]int64{}, PeakRSS: map[string]int64{}}
	var tputCPU, tputBytes float64
	hists := map[string][]Bucket{}
	type acc struct{ cpu, reqs, qps, n float64 }
	lat := map[string]*acc{}
	httpCPU := map[string]float64{}
	var httpReqs float64
	vcpuCPU := map[string]map[string]float64{}
	vcpuSec := map[string]map[string]float64{}
	for _, run := range r.Runs {
		if run.Path != name {
			continue
		}
		if run.Error != "" {
			s.Errors++
			s.RunErrors = append(s.RunErrors, fmt.Sprintf("round %d %s c%d: %s", run.Round, run.Workload, run.Connections, run.Error))
			continue
		}
		s.Errors += run.Errors
		cpu := 0.0
		for _, p := range run.Proxies {
			cpu += p.CPUSeconds
		}
		key := fmt.Sprintf("c%d", run.Connections)
		switch run.Workload {
		case WorkThroughput:
			s.ThroughputRuns = append(s.ThroughputRuns, run.Gbps)
			tputCPU += cpu
			tputBytes += run.Bytes
		case WorkConnRate:
			s.ConnsPerSecRuns = append(s.ConnsPerSecRuns, run.ActualQPS)
		case WorkHTTPThroughput:
			s.HTTPReqPerSecRuns = append(s.HTTPReqPerSecRuns, run.ActualQPS)
			httpReqs += float64(run.Requests)
			for _, p := range run.Proxies {
				httpCPU[p.Name] += p.CPUSeconds
			}
		case WorkLatency:
			hists[key] = append(hists[key], run.Histogram...)
			a := lat[key]
			if a == nil {
				a = &acc{}
				lat[key] = a
				s.Latency[key] = &LatencySummary{Connections: run.Connections}
			}
			a.cpu += cpu
			a.reqs += float64(run.Requests)
			a.qps += run.ActualQPS
			a.n++
			s.Latency[key].Requests += run.Requests
			s.Latency[key].Errors += run.Errors
			for _, p := range run.Proxies {
				if vcpuCPU[p.Name] == nil {
					vcpuCPU[p.Name], vcpuSec[p.Name] = map[string]float64{}, map[string]float64{}
				}
				vcpuCPU[p.Name][key] += p.CPUSeconds
				vcpuSec[p.Name][key] += run.Seconds
				s.RSSAtRate[p.Name] = max(s.RSSAtRate[p.Name], p.MaxRSSBytes)
			}
		}
	}
	s.ThroughputGbps = median(s.ThroughputRuns)
	s.ConnsPerSec = median(s.ConnsPerSecRuns)
	if len(s.HTTPReqPerSecRuns) > 0 {
		s.HTTPReqPerSec = median(s.HTTPReqPerSecRuns)
	}
	if httpReqs > 0 && len(httpCPU) > 0 {
		s.HTTPCPUSecondsPer1000Req = map[string]float64{}
		for proc, c := range httpCPU {
			s.HTTPCPUSecondsPer1000Req[proc] = c / (httpReqs / 1000)
		}
	}
	if tputBytes > 0 && len(r.procNames(name)) > 0 {
		s.CPUSecondsPerGB = tputCPU / (tputBytes / 1e9)
	}
	for key, a := range lat {
		l := s.Latency[key]
		l.ActualQPS = a.qps / a.n
		h := hists[key]
		l.P50Ms, l.P90Ms, l.P99Ms, l.P999Ms = percentile(h, 50)*1e3, percentile(h, 90)*1e3, percentile(h, 99)*1e3, percentile(h, 99.9)*1e3
		for _, p := range curvePercentiles {
			l.Curve = append(l.Curve, [2]float64{p, percentile(h, p) * 1e3})
		}
		if a.reqs > 0 && len(r.procNames(name)) > 0 {
			s.CPUSecondsPer1000Req[key] = a.cpu / (a.reqs / 1000)
		}
	}
	for proc, m := range vcpuCPU {
		s.VCPU[proc] = map[string]float64{}
		for key, c := range m {
			s.VCPU[proc][key] = c / vcpuSec[proc][key]
		}
	}
	for _, proc := range r.procNames(name) {
		if v, ok := r.PeakRSS[proc]; ok {
			s.PeakRSS[proc] = v
		}
	}
	return s
}

// procNames are the names of the proxies measured on path name.
func (r *Results) procNames(name string) []string {
	var out []string
	for _, run := range r.Runs {
		if run.Path == name {
			for _, p := range run.Proxies {
				if !slices.Contains(out, p.Name) {
					out = append(out, p.Name)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// curvePercentiles are where the plotted latency curves are evaluated.
var curvePercentiles = func() []float64 {
	var ps []float64
	for p := 0.0; p < 90; p += 2 {
		ps = append(ps, p)
	}
	for p := 90.0; p < 99; p += 0.25 {
		ps = append(ps, p)
	}
	for p := 99.0; p < 99.9; p += 0.025 {
		ps = append(ps, p)
	}
	for p := 99.9; p <= 99.99; p += 0.005 {
		ps = append(ps, p)
	}
	return ps
}()

// percentile returns the duration below which pct percent of the requests
// in buckets fall, counting each bucket's requests as spread evenly over it
// (fortio's own interpolation; for one run's histogram the result equals
// fortio's). Buckets of several runs may overlap; they are simply summed.
func percentile(buckets []Bucket, pct float64) float64 {
	var total float64
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, b := range buckets {
		total += float64(b.Count)
		lo, hi = min(lo, b.Start), max(hi, b.End)
	}
	if total == 0 {
		return math.NaN()
	}
	want := total * pct / 100
	below := func(x float64) float64 {
		var n float64
		for _, b := range buckets {
			switch {
			case x >= b.End:
				n += float64(b.Count)
			case x > b.Start:
				n += float64(b.Count) * (x - b.Start) / (b.End - b.Start)
			}
		}
		return n
	}
	for range 100 {
		mid := (lo + hi) / 2
		if below(mid) < want {
			lo = mid
		} else {
			hi = mid
		}
	}
	return hi
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Istio's published ztunnel figures, the targets of issue 8.
const (
	targetAddedP90Ms = 0.17
	targetAddedP99Ms = 0.20
	targetVCPU       = 0.06
	targetRSSBytes   = 12 << 20
)

func targets(r *Results) []Target {
	amb, dir, ha := r.Summary[PathAmbit], r.Summary[PathDirect], r.Summary[PathHAProxy]
	var out []Target
	met := func(ok bool) *bool { return &ok }
	why := func(paths ...string) string {
		var rs []string
		for _, p := range paths {
			if reason, ok := r.NotMeasured[p]; ok {
				rs = append(rs, p+": "+reason)
			} else if r.Summary[p] == nil {
				rs = append(rs, p+": not run")
			}
		}
		return "not measured (" + strings.Join(rs, "; ") + ")"
	}
	for _, c := range r.Config.Connections {
		key := fmt.Sprintf("c%d", c)
		for _, q := range []struct {
			name  string
			limit float64
			get   func(*LatencySummary) float64
		}{{"p90", targetAddedP90Ms, func(l *LatencySummary) float64 { return l.P90Ms }},
			{"p99", targetAddedP99Ms, func(l *LatencySummary) float64 { return l.P99Ms }}} {
			t := Target{Name: fmt.Sprintf("added latency %s, %d conn at %d req/s", q.name, c, r.Config.QPS),
				Goal: fmt.Sprintf("≤ %.2f ms over direct (Istio ztunnel: +0.17 ms p90, +0.20 ms p99)", q.limit), Limit: q.limit}
			if amb != nil && dir != nil && amb.Latency[key] != nil && dir.Latency[key] != nil {
				t.Value = q.get(amb.Latency[key]) - q.get(dir.Latency[key])
				t.Measured = fmt.Sprintf("%+.3f ms", t.Value)
				t.Met = met(t.Value <= q.limit)
			} else {
				t.Measured = why(PathAmbit, PathDirect)
			}
			out = append(out, t)
		}
	}
	t := Target{Name: "single-connection throughput", Goal: "ambit ≥ HAProxy pair"}
	if amb != nil && ha != nil && len(amb.ThroughputRuns) > 0 && len(ha.ThroughputRuns) > 0 {
		t.Value, t.Limit = amb.ThroughputGbps, ha.ThroughputGbps
		t.Measured = fmt.Sprintf("%.2f vs %.2f Gbit/s", t.Value, t.Limit)
		t.Met = met(t.Value >= t.Limit)
	} else {
		t.Measured = why(PathAmbit, PathHAProxy)
	}
	out = append(out, t)
	for _, c := range r.Config.Connections {
		key := fmt.Sprintf("c%d", c)
		t := Target{Name: fmt.Sprintf("ztunnel CPU at %d req/s, %d conn (busier ztunnel)", r.Config.QPS, c),
			Goal: "≤ 0.06 vCPU (Istio ztunnel)", Limit: targetVCPU}
		if amb != nil && len(amb.VCPU) > 0 {
			for _, m := range amb.VCPU {
				t.Value = max(t.Value, m[key])
			}
			t.Measured = fmt.Sprintf("%.3f vCPU", t.Value)
			t.Met = met(t.Value <= targetVCPU)
		} else {
			t.Measured = why(PathAmbit)
		}
		out = append(out, t)
	}
	t = Target{Name: fmt.Sprintf("ztunnel RSS at %d req/s (larger ztunnel)", r.Config.QPS), Goal: "≤ 12 MB (Istio ztunnel)", Limit: targetRSSBytes}
	if amb != nil && len(amb.RSSAtRate) > 0 {
		for _, v := range amb.RSSAtRate {
			t.Value = max(t.Value, float64(v))
		}
		t.Measured = fmt.Sprintf("%.1f MB", t.Value/(1<<20))
		t.Met = met(t.Value <= targetRSSBytes)
	} else {
		t.Measured = why(PathAmbit)
	}
	out = append(out, t)
	return out
}
