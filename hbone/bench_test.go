package hbone

import (
	"context"
	"io"
	"net"
	"testing"
)

// The benchmarks compare HBONE with plain TCP over loopback in the same run:
//
//	go test -run '^$' -bench Tunnel -benchmem ./hbone/
//
// Throughput: one connection, 64 KiB writes, into a sink.
//	tcp        client -> sink
//	tcp-proxy  client -> Join (spliced TCP proxy) -> sink
//	hbone      client -> Stream -> TLS/HTTP2 -> Server -> Join -> sink
// Connect: open, one byte each way, close.
//	tcp            a new TCP connection
//	hbone-pooled   a new stream on a warm pooled HBONE connection
//	hbone-new-conn a new HBONE connection (TCP + TLS 1.3 mTLS + HTTP/2) and stream

const benchChunk = 64 << 10

func sink(c net.Conn) { io.Copy(io.Discard, c) }

func BenchmarkTunnelThroughput(b *testing.B) {
	buf := make([]byte, benchChunk)
	run := func(b *testing.B, c net.Conn) {
		b.SetBytes(benchChunk)
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		c.(closeWriter).CloseWrite()
		io.Copy(io.Discard, c) // wait for the far end to finish
		b.StopTimer()
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
