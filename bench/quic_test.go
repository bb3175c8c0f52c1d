package bench

import (
	"strings"
	"testing"
)

// The report has the quic path as a column of the main table and the
// transports' table, one row per condition and transport, with the
// errors of a run that had some and no invented figure for one it lacks.
func TestReportTransports(t *testing.T) {
	r := &Results{
		Config:  Config{Paths: []string{PathDirect, PathAmbit, PathQUIC}, Rounds: 1, QPS: 1000, Connections: []int{1}, Payload: 1024}.public(),
		Machine: map[string]string{"cpus": "2"},
		Runs: []Run{
			{Round: 1, Path: PathAmbit, Workload: WorkThroughput, Connections: 1, Gbps: 3, Bytes: 2e9,
				Proxies: []ProxyUsage{{Name: "ztunnel-node1", CPUSeconds: 1}, {Name: "ztunnel-node2", CPUSeconds: 1}}},
			{Round: 1, Path: PathQUIC, Workload: WorkThroughput, Connections: 1, Gbps: 0.9, Bytes: 1e9, ZtunnelConnections: 4,
				Proxies: []ProxyUsage{{Name: "ztunnel-node1", CPUSeconds: 2}, {Name: "ztunnel-node2", CPUSeconds: 2}}},
		},
		Transports: []TransportRun{
			{Condition: "10 ms", DelayMs: 10, Path: PathAmbit, Transport: "h2", Gbps: 0.25, CPUSecondsPerGB: 4.5,
				RequestP50Ms: 21.5, RequestP99Ms: 30, NewTunnelP50Ms: 88, NewTunnelMaxMs: 101},
			{Condition: "10 ms", DelayMs: 10, Path: PathQUIC, Transport: "h3", Gbps: 0.125, CPUSecondsPerGB: 20,
				RequestP50Ms: 21.25, RequestP99Ms: 25, NewTunnelP50Ms: 48, NewTunnelMaxMs: 60},
			{Condition: "1 ms + 1% loss", DelayMs: 1, Loss: 0.01, Path: PathQUIC, Transport: "h3",
				Errors: []string{"new tunnel: timeout"}},
		},
	}
	r.Summarize()
	md := r.Markdown(nil)
	for _, want := range []string{
		"| ambit over QUIC |",
		"4 over h3",
		"| 10 ms | h2 | 0.25 | 4.5 | 21.5 | 30 | 88 | 101 | — |",
		"| 10 ms | h3 | 0.125 | 20 | 21.2 | 25 | 48 | 60 | — |",
		"| 1 ms + 1% loss | h3 | — | — | — | — | — | — | 1: new tunnel: timeout |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	if s := r.Summary[PathQUIC]; s == nil || s.ThroughputGbps != 0.9 || s.CPUSecondsPerGB != 4 {
		t.Errorf("quic summary %+v", s)
	}
}
