package hbone

import (
	"context"
	"io"
	"net"
	"testing"

	"github.com/ambit-mesh/ambit/relay"
)

// BenchmarkTunnelPath measures the whole node-proxy path in one process, as
// the mesh benchmark's ambit path crosses it:
//
//	client -TCP-> outbound (relay.Join: socket <-> Stream) =HBONE=> Server (Join: Stream <-> socket) -TCP-> pod
//
// throughput: 64 KiB writes into a sink; round-trip: 1 KiB echoed.
//
//	go test -run '^$' -bench TunnelPath -benchmem ./hbone/
func BenchmarkTunnelPath(b *testing.B) {
	outbound := func(b *testing.B, e *env) net.Addr {
		d := e.dialer()
		return listenPod(b, func(c net.Conn) {
			s, err := d.Dial(context.Background(), e.request())
			if err != nil {
				return
			}
			relay.Join(context.Background(), c, s, nil)
		})
	}
	b.Run("throughput", func(b *testing.B) {
		e := newEnv(b, func(c net.Conn) { sink(c); c.(*net.TCPConn).CloseWrite() }, nil)
		c, err := net.Dial("tcp", outbound(b, e).String())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, benchChunk)
		b.SetBytes(benchChunk)
		b.ReportAllocs()
		stop := measureCPU(b)
		b.ResetTimer()
		for range b.N {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
		b.StopTimer()
		stop()
	})
	b.Run("round-trip", func(b *testing.B) {
		const size = 1 << 10
		e := newEnv(b, echo, nil)
		c, err := net.Dial("tcp", outbound(b, e).String())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, size)
		b.SetBytes(2 * size)
		b.ReportAllocs()
		stop := measureCPU(b)
		b.ResetTimer()
		for range b.N {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		stop()
	})
}
