package hbone

import (
	"context"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The benchmarks compare HBONE with plain TCP over loopback in the same run:
//
//	go test -run '^$' -bench Tunnel -benchmem ./hbone/
//
// Throughput: one connection, 64 KiB writes, into a sink.
//	tcp        client -> sink
//	tcp-proxy  client -> Join (spliced TCP proxy) -> sink
//	hbone      client -> Stream -> TLS/HTTP2 -> Server -> Join -> sink
// RoundTrip: 1 KiB written and its echo read back on an open connection
// (the shape of the mesh benchmark's latency runs).
//	tcp        client <-> echo
//	hbone      client <-> Stream <-> TLS/HTTP2 <-> Server <-> Join <-> echo
//	hbone-x16  16 streams of one pooled HBONE connection in parallel
// Connect: open, one byte each way, close.
//	tcp            a new TCP connection
//	hbone-pooled   a new stream on a warm pooled HBONE connection
//	hbone-new-conn a new HBONE connection (TCP + TLS 1.3 mTLS + HTTP/2) and stream

const benchChunk = 64 << 10

// measureCPU starts measuring the process's CPU time (user + system, all
// threads: client, tunnel and server are in this process) and its read and
// write system calls; the function it returns reports them per operation as
// cpu-ns/op (the cost that wall-clock ns/op hides on a busy machine),
// reads/op and writes/op (read(2) and write(2) calls, from /proc/self/io:
// they move little with the machine's load).
func measureCPU(b *testing.B) (stop func()) {
	start := cpuTime()
	r0, w0 := syscallCounts()
	return func() {
		b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
		if r1, w1 := syscallCounts(); r1 > 0 {
			b.ReportMetric(float64(r1-r0)/float64(b.N), "reads/op")
			b.ReportMetric(float64(w1-w0)/float64(b.N), "writes/op")
		}
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// syscallCounts returns the process's read and write system calls so far
// (syscr and syscw of /proc/self/io); zero where there is no such file.
func syscallCounts() (reads, writes int64) {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ": ")
		n, _ := strconv.ParseInt(v, 10, 64)
		switch k {
		case "syscr":
			reads = n
		case "syscw":
			writes = n
		}
	}
	return reads, writes
}

// sink reads c to its end with large reads (io.Discard's ReadFrom reads
// 8 KiB at a time: its read(2)s would drown the proxies' in reads/op).
func sink(c net.Conn) {
	buf := make([]byte, 256<<10)
	for {
		if _, err := c.Read(buf); err != nil {
			return
		}
	}
}

func BenchmarkTunnelThroughput(b *testing.B) {
	buf := make([]byte, benchChunk)
	run := func(b *testing.B, c net.Conn) {
		b.SetBytes(benchChunk)
		b.ReportAllocs()
		stop := measureCPU(b)
		b.ResetTimer()
		for range b.N {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		c.(closeWriter).CloseWrite()
		io.Copy(io.Discard, c) // wait for the far end to finish
		b.StopTimer()
		stop()
		c.Close()
	}
	b.Run("tcp", func(b *testing.B) {
		up := listenPod(b, sink)
		c, err := net.Dial("tcp", up.String())
		if err != nil {
			b.Fatal(err)
		}
		run(b, c)
	})
	b.Run("tcp-proxy", func(b *testing.B) {
		up := listenPod(b, sink)
		proxy := listenPod(b, func(c net.Conn) {
			u, err := net.Dial("tcp", up.String())
			if err != nil {
				return
			}
			Join(context.Background(), c, u)
		})
		c, err := net.Dial("tcp", proxy.String())
		if err != nil {
			b.Fatal(err)
		}
		run(b, c)
	})
	b.Run("hbone", func(b *testing.B) {
		e := newEnv(b, func(c net.Conn) { sink(c); c.(*net.TCPConn).CloseWrite() }, nil)
		s, err := e.dialer().Dial(context.Background(), e.request())
		if err != nil {
			b.Fatal(err)
		}
		run(b, s)
	})
	// 16 streams of one connection writing at once: they share its send
	// window, and wait for it.
	b.Run("hbone-x16", func(b *testing.B) {
		const streams = 16
		e := newEnv(b, func(c net.Conn) { sink(c); c.(*net.TCPConn).CloseWrite() }, nil)
		d := e.dialer()
		conns := make([]net.Conn, streams)
		for i := range conns {
			s, err := d.Dial(context.Background(), e.request())
			if err != nil {
				b.Fatal(err)
			}
			conns[i] = s
		}
		b.SetBytes(benchChunk)
		b.ReportAllocs()
		stop := measureCPU(b)
		b.ResetTimer()
		var wg sync.WaitGroup
		for i, c := range conns {
			n := b.N / streams
			if i < b.N%streams {
				n++
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range n {
					if _, err := c.Write(buf); err != nil {
						b.Error(err)
						return
					}
				}
				c.(closeWriter).CloseWrite()
				io.Copy(io.Discard, c)
			}()
		}
		wg.Wait()
		b.StopTimer()
		stop()
		for _, c := range conns {
			c.Close()
		}
	})
}

func BenchmarkTunnelRoundTrip(b *testing.B) {
	const size = 1 << 10
	roundTrips := func(b *testing.B, c net.Conn, n int) {
		buf := make([]byte, size)
		for range n {
			if _, err := c.Write(buf); err != nil {
				b.Error(err)
				return
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				b.Error(err)
				return
			}
		}
	}
	b.Run("tcp", func(b *testing.B) {
		up := listenPod(b, echo)
		c, err := net.Dial("tcp", up.String())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		b.SetBytes(2 * size)
		b.ReportAllocs()
		stop := measureCPU(b)
		b.ResetTimer()
		roundTrips(b, c, b.N)
		stop()
	})
	b.Run("hbone", func(b *testing.B) {
		e := newEnv(b, echo, nil)
		s, err := e.dialer().Dial(context.Background(), e.request())
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		b.SetBytes(2 * size)
		b.ReportAllocs()
		stop := measureCPU(b)
		b.ResetTimer()
		roundTrips(b, s, b.N)
		stop()
	})
	b.Run("hbone-x16", func(b *testing.B) {
		const streams = 16
		e := newEnv(b, echo, nil)
		d := e.dialer()
		conns := make([]net.Conn, streams)
		for i := range conns {
			s, err := d.Dial(context.Background(), e.request())
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			conns[i] = s
		}
		b.SetBytes(2 * size)
		b.ReportAllocs()
		stop := measureCPU(b)
		b.ResetTimer()
		var wg sync.WaitGroup
		for i, c := range conns {
			n := b.N / streams
			if i < b.N%streams {
				n++
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				roundTrips(b, c, n)
			}()
		}
		wg.Wait()
		stop()
	})
}

func BenchmarkTunnelConnect(b *testing.B) {
	roundTrip := func(b *testing.B, c net.Conn) {
		var one [1]byte
		if _, err := c.Write(one[:]); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, one[:]); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.Run("tcp", func(b *testing.B) {
		up := listenPod(b, echo)
		b.ReportAllocs()
		defer measureCPU(b)()
		for range b.N {
			c, err := net.Dial("tcp", up.String())
			if err != nil {
				b.Fatal(err)
			}
			roundTrip(b, c)
		}
	})
	b.Run("hbone-pooled", func(b *testing.B) {
		e := newEnv(b, echo, nil)
		d := e.dialer()
		ctx := context.Background()
		b.ReportAllocs()
		defer measureCPU(b)()
		for range b.N {
			s, err := d.Dial(ctx, e.request())
			if err != nil {
				b.Fatal(err)
			}
			roundTrip(b, s)
		}
	})
	b.Run("hbone-new-conn", func(b *testing.B) {
		e := newEnv(b, echo, nil)
		ctx := context.Background()
		b.ReportAllocs()
		defer measureCPU(b)()
		for range b.N {
			d := &Dialer{Certs: e.certs}
			s, err := d.Dial(ctx, e.request())
			if err != nil {
				b.Fatal(err)
			}
			roundTrip(b, s)
			d.Close()
		}
	})
}

// listenPod serves pod on a loopback listener until the benchmark ends.
func listenPod(b *testing.B, pod func(net.Conn)) net.Addr {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				pod(c)
			}()
		}
	}()
	return ln.Addr()
}

// contextSwitches returns the process's context switches so far, voluntary
// (a thread blocked: futex, epoll_wait) and involuntary.
func contextSwitches() int64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Nvcsw + ru.Nivcsw
}
