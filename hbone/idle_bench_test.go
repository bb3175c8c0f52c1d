package hbone

import (
	"bytes"
	"context"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/relay"
)

// BenchmarkTunnelIdle measures the memory idle tunnelled connections hold:
// heap in use plus goroutine stacks per connection, over idleConns
// connections that moved one byte and went quiet, through
//
//	tcp    client -> pod
//	hbone  client -> outbound (relay.Join: socket <-> Stream) =HBONE=> Server (Join) -> pod
//
// (one pooled HBONE connection). Both sides of the tunnel are in this
// process: hbone's idle-B/conn minus tcp's is what the two node proxies
// hold per connection.
//
//	go test -run '^$' -bench TunnelIdle -benchmem ./hbone/
func BenchmarkTunnelIdle(b *testing.B) {
	const idleConns = 200
	pod := func(c net.Conn) {
		var one [1]byte
		c.Read(one[:])
		c.Write(one[:])
		c.Read(one[:]) // parked until the client closes
	}
	run := func(b *testing.B, addr net.Addr, parked func(stacks []byte) bool) {
		var perConn float64
		for range b.N {
			base := heapAndStacks()
			conns := make([]net.Conn, idleConns)
			for i := range conns {
				c, err := net.Dial("tcp", addr.String())
				if err != nil {
					b.Fatal(err)
				}
				var one [1]byte
				if _, err := c.Write(one[:]); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Read(one[:]); err != nil {
					b.Fatal(err)
				}
				conns[i] = c
			}
			waitStacks(b, parked)
			perConn += float64(heapAndStacks()-base) / idleConns
			for _, c := range conns {
				c.Close()
			}
		}
		b.ReportMetric(perConn/float64(b.N), "idle-B/conn")
	}
	b.Run("tcp", func(b *testing.B) {
		addr := listenPod(b, pod)
		run(b, addr, func(s []byte) bool { return bytes.Count(s, []byte("[IO wait")) >= idleConns })
	})
	b.Run("hbone", func(b *testing.B) {
		e := newEnv(b, pod, nil)
		d := e.dialer()
		addr := listenPod(b, func(c net.Conn) {
			s, err := d.Dial(context.Background(), e.request())
			if err != nil {
				return
			}
			relay.Join(context.Background(), c, s, nil)
		})
		// Per connection: the pod and each proxy's socket reader in IO
		// wait; each proxy's stream direction waiting for frames, or (with
		// DeliverAsync) no goroutine at all, not even one finishing.
		run(b, addr, func(s []byte) bool {
			return bytes.Count(s, []byte("[IO wait")) >= 3*idleConns &&
				(bytes.Count(s, []byte("[sync.Cond.Wait")) >= 2*idleConns || !bytes.Contains(s, []byte("hbone.(*Stream).deliverSome(")))
		})
	})
}

// heapAndStacks is the heap in use plus goroutine stacks, after two GCs
// (the second empties the pools' victim caches).
func heapAndStacks() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse + ms.StackInuse)
}

// waitStacks waits until every goroutine's stack, dumped, satisfies done.
func waitStacks(b *testing.B, done func(stacks []byte) bool) {
	deadline := time.Now().Add(20 * time.Second)
	buf := make([]byte, 4<<20)
	for {
		n := runtime.Stack(buf, true)
		for n == len(buf) {
			buf = make([]byte, 2*len(buf))
			n = runtime.Stack(buf, true)
		}
		if done(buf[:n]) {
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("idle connections never all parked")
		}
		time.Sleep(time.Millisecond)
	}
}
