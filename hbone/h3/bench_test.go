package h3

import (
	"context"
	"io"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
)

// benchHandler: port 1 discards (throughput), anything else echoes.
func benchHandler(ctx context.Context, r *hbone.Request) {
	st, err := r.Accept()
	if err != nil {
		return
	}
	if r.Target.Port() == 1 {
		io.Copy(io.Discard, st)
		st.CloseWrite()
		return
	}
	io.Copy(st, st)
	st.CloseWrite()
}

// cpuTime is the process's user+system CPU time (both ends run here).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkThroughput: one stream, one way, 1 MiB per op; cpu-s/GB counts
// both ends (client and server are in this process).
func BenchmarkThroughput(b *testing.B) {
	e := newEnv(b, benchHandler, nil)
	for _, tr := range e.transports(e.certs) {
		b.Run(tr.name, func(b *testing.B) {
			r := e.request(tr)
			r.Target = netip.AddrPortFrom(r.Target.Addr(), 1)
			st, err := tr.dial(b.Context(), r)
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			cpu := cpuTime()
			b.ResetTimer()
			for b.Loop() {
				if _, err := st.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			st.CloseWrite()
			io.Copy(io.Discard, st) // the server read everything
			b.StopTimer()
			gb := float64(b.N) * float64(len(buf)) / 1e9
			b.ReportMetric((cpuTime()-cpu).Seconds()/gb, "cpu-s/GB")
			st.Close()
		})
	}
}

var benchKeys atomic.Int64 // pool keys of BenchmarkNewTunnel, never reused

// BenchmarkNewTunnel: a new connection's first stream, answered
// (handshake and CONNECT), then a 1-byte echo. The dialers live on (the
// QUIC one keeps its UDP socket); each op's request has its own pool key
// (one more allowed peer identity), so it gets a new connection. Every
// connection stays open: run it with a bounded -benchtime (200x).
func BenchmarkNewTunnel(b *testing.B) {
	e := newEnv(b, benchHandler, nil)
	for _, tr := range e.transports(e.certs) {
		b.Run(tr.name, func(b *testing.B) {
			one := []byte{1}
			for b.Loop() {
				r := e.request(tr)
				r.Peers = append(r.Peers, spiffeid.RequireFromPathf(e.srvID.TrustDomain(), "/bench/%d", benchKeys.Add(1)))
				st, err := tr.dial(b.Context(), r)
				if err != nil {
					b.Fatal(err)
				}
				st.Write(one)
				if _, err := io.ReadFull(st, one); err != nil {
					b.Fatal(err)
				}
				st.Close()
			}
		})
	}
}

// BenchmarkRequest: 1 KiB echoed on an open tunnel.
func BenchmarkRequest(b *testing.B) {
	e := newEnv(b, benchHandler, nil)
	for _, tr := range e.transports(e.certs) {
		b.Run(tr.name, func(b *testing.B) {
			st, err := tr.dial(b.Context(), e.request(tr))
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			buf := make([]byte, 1024)
			for b.Loop() {
				st.Write(buf)
				if _, err := io.ReadFull(st, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
