package bpf

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// The benchmarks compare a pod's TCP through capture with the direct path,
// on the world of newEnv (a1 and b1 enrolled):
//
//	direct               a2 -> b2, nothing captured
//	captured-passthrough a1 -> b2: capture to ztunnel's 15001, then a plain
//	                     TCP relay from the node (the capture's own cost plus
//	                     one user-space hop)
//	captured-tunnel      a1 -> b1: capture, TLS to 15008 on the other node,
//	                     transparent delivery (the stand-in's, not HBONE's,
//	                     cost: the real numbers come from ztunnel)
//
// Run them as root: go test -run '^$' -bench . ./bpf/
var benchPaths = []struct{ name, from, to string }{
	{"direct", "a2", "b2"},
	{"captured-passthrough", "a1", "b2"},
	{"captured-tunnel", "a1", "b1"},
}

// BenchmarkConnect measures connection set-up: connect, one request line,
// its answer, close.
func BenchmarkConnect(b *testing.B) {
	e := newEnv(b, "a1", "b1")
	for _, p := range benchPaths {
		b.Run(p.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := e.talk(p.from, p.to, "ping"); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
		})
	}
}

// BenchmarkThroughput measures one connection's bulk transfer, pod to pod.
func BenchmarkThroughput(b *testing.B) {
	e := newEnv(b, "a1", "b1")
	chunk := make([]byte, 64<<10)
	for _, p := range benchPaths {
		b.Run(p.name, func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			c, err := e.pod(p.from).NS.Dial(ctx, nil, "tcp", net.JoinHostPort(e.pod(p.to).IP.String(), echoPort))
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			if _, err := io.WriteString(c, "stream\n"); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(chunk)))
			for b.Loop() {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestBenchPathsWork keeps the benchmarks' paths honest in the ordinary test
// run: every path answers, and only the captured ones reach ztunnel.
func TestBenchPathsWork(t *testing.T) {
	e := newEnv(t, "a1", "b1")
	for _, p := range benchPaths {
		before := len(e.zt["n1"].records())
		got, err := e.talk(p.from, p.to, "ping")
		if err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
		captured := len(e.zt["n1"].records()) > before
		if captured != (p.name != "direct") {
			t.Errorf("%s: captured = %v (answer %q)", p.name, captured, got)
		}
	}
}
