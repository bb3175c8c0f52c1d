package bench

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// One fortio histogram (from a real run at 1 µs resolution) and fortio's own
// percentiles for it: the merged-percentile code must agree on one run.
func TestPercentileMatchesFortio(t *testing.T) {
	h := []Bucket{
		{Start: 5.2147e-05, End: 6e-05, Count: 3},
		{Start: 6e-05, End: 7e-05, Count: 8},
		{Start: 7e-05, End: 8e-05, Count: 21},
		{Start: 8e-05, End: 9e-05, Count: 468},
		{Start: 9e-05, End: 0.0001, Count: 500},
		{Start: 0.0001, End: 0.00012, Count: 900},
		{Start: 0.00012, End: 0.00014, Count: 80},
		{Start: 0.00014, End: 0.0083, Count: 20},
	}
	// 2000 requests: the 1000th (p50) ends the 90-100 µs bucket
	// (3+8+21+468+500), the 1980th (p99) the 120-140 µs one.
	for _, tc := range []struct{ pct, want float64 }{
		{50, 0.0001},
		{99, 0.00014},
	} {
		got := percentile(h, tc.pct)
		if math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("p%v = %v, want %v", tc.pct, got, tc.want)
		}
	}
	// Interpolation inside a bucket: p75 = 1500th request, 500 of the 900 in [100,120) µs.
	if got, want := percentile(h, 75), 0.0001+0.00002*500/900; math.Abs(got-want) > 1e-9 {
		t.Errorf("p75 = %v, want %v", got, want)
	}
	// Merging two identical runs changes nothing.
	if a, b := percentile(h, 90), percentile(append(append([]Bucket{}, h...), h...), 90); math.Abs(a-b) > 1e-12 {
		t.Errorf("merged p90 %v != single p90 %v", b, a)
	}
	if !math.IsNaN(percentile(nil, 50)) {
		t.Error("percentile of no data is not NaN")
	}
}

// A path that could not be measured is reported with its reason, and no
// figure or target is invented for it.
func TestReportNeverInventsNumbers(t *testing.T) {
	r := &Results{
		Config:      Config{Rounds: 1, QPS: 1000, Connections: []int{1}, Payload: 1024}.public(),
		Machine:     map[string]string{"cpus": "2"},
		NotMeasured: map[string]string{PathAmbit: "ztunnel did not start: boom"},
		Runs: []Run{
			{Round: 1, Path: PathDirect, Workload: WorkThroughput, Connections: 1, Gbps: 9, Bytes: 5e9},
			{Round: 1, Path: PathDirect, Workload: WorkLatency, Connections: 1, Requests: 2000, ActualQPS: 1000, Seconds: 2,
				Histogram: []Bucket{{Start: 0.0001, End: 0.0002, Count: 2000}}},
			{Round: 1, Path: PathHAProxy, Workload: WorkThroughput, Connections: 1, Gbps: 2, Bytes: 1e9,
				Proxies: []ProxyUsage{{Name: "haproxy-node1", CPUSeconds: 1}, {Name: "haproxy-node2", CPUSeconds: 2}}},
		},
	}
	r.Config.Paths = []string{PathDirect, PathHAProxy, PathAmbit}
	r.Summarize()
	if r.Summary[PathAmbit] != nil {
		t.Fatal("summary for a path that was not measured")
	}
	if got := r.Summary[PathHAProxy].CPUSecondsPerGB; got != 3 {
		t.Errorf("HAProxy CPU-s per GB = %v, want 3", got)
	}
	if got := r.Summary[PathDirect].Latency["c1"].P50Ms; math.Abs(got-0.15) > 1e-9 {
		t.Errorf("direct p50 = %v ms, want 0.15", got)
	}
	for _, tg := range r.Targets {
		if tg.Met != nil || !strings.Contains(tg.Measured, "not measured") {
			t.Errorf("target %q: met=%v measured=%q, want not measured", tg.Name, tg.Met, tg.Measured)
		}
	}
	md := r.Markdown(nil)
	for _, want := range []string{"ztunnel did not start: boom", "| not measured |", "| 9.00 |"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
}

func TestReadMicrobench(t *testing.T) {
	out := `goos: linux
pkg: github.com/ambit-mesh/ambit/bpf
BenchmarkConnect/direct-2         	    2640	    465395 ns/op	      2149 conns/s	   11039 B/op	      59 allocs/op
ok  	github.com/ambit-mesh/ambit/bpf	8.250s
FAIL	github.com/ambit-mesh/ambit/hbone [build failed]
`
	f := filepath.Join(t.TempDir(), "mb.txt")
	if err := os.WriteFile(f, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	mb, err := ReadMicrobench(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(mb.Results) != 1 || mb.Results[0].Metrics["conns/s"] != 2149 || mb.Results[0].Package != "github.com/ambit-mesh/ambit/bpf" {
		t.Errorf("results %+v", mb.Results)
	}
	if len(mb.Failed) != 1 {
		t.Errorf("failed %v", mb.Failed)
	}
	NoteControlPlane(mb)
	if !strings.Contains(mb.Notes["control-plane scale"], "not measured") {
		t.Errorf("notes %v", mb.Notes)
	}
}

func TestBreakdown(t *testing.T) {
	top := `Type: cpu
      flat  flat%   sum%        cum   cum%
     440ms 54.32% 54.32%      440ms 54.32%  internal/runtime/syscall/linux.Syscall6
     140ms 17.28% 71.60%      140ms 17.28%  runtime.futex
      10ms  1.23% 72.83%       10ms  1.23%  internal/runtime/syscall/linux.EpollWait
      10ms  1.23% 74.06%       10ms  1.23%  crypto/internal/fips140/aes/gcm.gcmAesEnc
      10ms  1.23% 75.29%       10ms  1.23%  github.com/ambit-mesh/ambit/hbone.(*Stream).Read
      10ms  1.23% 76.52%       10ms  1.23%  strings.Index
         0     0%   100%      400ms 49.38%  github.com/ambit-mesh/ambit/ztunnel.pipe
`
	b := breakdown(top)
	for cat, want := range map[string]float64{"syscalls": 54.32, "scheduler and wake-ups": 18.51, "crypto": 1.23, "ambit (hbone, ztunnel)": 1.23, "other": 1.23} {
		if math.Abs(b[cat]-want) > 1e-9 {
			t.Errorf("%s = %v, want %v", cat, b[cat], want)
		}
	}
}
