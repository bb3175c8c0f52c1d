package relay

import (
	"bytes"
	"context"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"
)

// BenchmarkJoinIdle measures the memory an idle joined connection holds
// (heap in use plus goroutine stacks, per Join, over idleJoins joins of
// two TCP pairs through the buffered copy, as a tunnel stream and a socket
// are): the cost of each of the 10,000 idle tunnelled connections a node
// proxy may hold. Reported as idle-B/conn.
//
//	go test -run '^$' -bench JoinIdle -benchmem ./relay/
func BenchmarkJoinIdle(b *testing.B) {
	const idleJoins = 200
	b.ReportAllocs()
	var perConn float64
	for range b.N {
		type pair struct{ client, a, up, server *net.TCPConn }
		pairs := make([]pair, idleJoins)
		for i := range pairs {
			client, a := tcpPair(b)
			up, server := tcpPair(b)
			pairs[i] = pair{client, a, up, server}
		}
		base := inUse()
		var wg sync.WaitGroup
		for _, p := range pairs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				Join(context.Background(), hidden{p.a}, hidden{p.up}, nil)
			}()
		}
		// Both directions of every join parked in Read.
		waitIOWait(b, 2*idleJoins)
		perConn += float64(inUse()-base) / idleJoins
		for _, p := range pairs {
			p.client.Close()
			p.server.Close()
		}
		wg.Wait()
		for _, p := range pairs {
			p.a.Close()
			p.up.Close()
		}
	}
	b.ReportMetric(perConn/float64(b.N), "idle-B/conn")
}

// inUse is the heap in use plus goroutine stacks, after two GCs (the
// second empties the pools' victim caches: pooled buffers count as
// allocated only while something holds them).
func inUse() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse + ms.StackInuse)
}

// waitIOWait waits until at least n goroutines are parked on the network
// poller.
func waitIOWait(b *testing.B, n int) {
	deadline := time.Now().Add(10 * time.Second)
	buf := make([]byte, 1<<20)
	for {
		k := runtime.Stack(buf, true)
		for k == len(buf) {
			buf = make([]byte, 2*len(buf))
			k = runtime.Stack(buf, true)
		}
		if bytes.Count(buf[:k], []byte("[IO wait")) >= n {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("fewer than %d goroutines in IO wait", n)
		}
		runtime.Gosched()
	}
}
