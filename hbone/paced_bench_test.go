package hbone

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/relay"
)

// peerEnv makes the test binary a benchmark's peer process (see
// BenchmarkTunnelPaced) instead of running tests.
const peerEnv = "AMBIT_HBONE_BENCH_PEER"

func init() {
	if os.Getenv(peerEnv) != "" {
		runPeer()
		os.Exit(0)
	}
}

// runPeer is the client and the echoing pod of BenchmarkTunnelPaced, in a
// process of their own: it prints its echo listener's address, then for
// each line "<addr> <n>" on stdin dials addr, echoes 1 KiB n times, one
// round trip per millisecond, and prints "ok" (or the error).
func runPeer() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println("error", err)
		return
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	fmt.Println(ln.Addr())
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		addr, ns, _ := strings.Cut(sc.Text(), " ")
		n, _ := strconv.Atoi(ns)
		if err := pacedRoundTrips(addr, n); err != nil {
			fmt.Println("error", err)
			continue
		}
		fmt.Println("ok")
	}
}

func pacedRoundTrips(addr string, n int) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 1<<10)
	next := time.Now()
	for range n {
		next = next.Add(time.Millisecond)
		if _, err := c.Write(buf); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		time.Sleep(time.Until(next))
	}
	return nil
}

// BenchmarkTunnelPaced is TunnelPath's round trip as the mesh benchmark's
// latency runs make it: 1 KiB echoed once a millisecond (1000 req/s, one
// connection), with the client and the pod in another process, so that
// the figures are the two proxies' alone (outbound relay, HBONE client and
// server, inbound relay): CPU time, context switches, read(2)s and
// write(2)s per round trip. Every round trip finds the proxies idle, so it
// counts what waking up costs: the Go runtime's, which back-to-back round
// trips in one process hide.
//
//	go test -run '^$' -bench TunnelPaced -benchtime 2000x ./hbone/
func BenchmarkTunnelPaced(b *testing.B) {
	peer := exec.Command(os.Args[0])
	peer.Env = append(os.Environ(), peerEnv+"=1")
	peer.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // dies with a timed-out benchmark
	stdin, err := peer.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := peer.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := peer.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { stdin.Close(); peer.Wait() }()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() {
		b.Fatal("peer: no address")
	}
	podAddr, err := netip.ParseAddrPort(lines.Text())
	if err != nil {
		b.Fatalf("peer: %q: %v", lines.Text(), err)
	}

	e := newEnv(b, echo, nil)
	e.target = podAddr
	d := e.dialer()
	out := listenPod(b, func(c net.Conn) {
		s, err := d.Dial(context.Background(), e.request())
		if err != nil {
			return
		}
		relay.Join(context.Background(), c, s, nil)
	})
	b.SetBytes(2 << 10)
	b.ReportAllocs()
	stop := measureCPU(b)
	csw0 := contextSwitches()
	b.ResetTimer()
	fmt.Fprintf(stdin, "%s %d\n", out, b.N)
	if !lines.Scan() || lines.Text() != "ok" {
		b.Fatalf("peer: %q", lines.Text())
	}
	b.StopTimer()
	b.ReportMetric(float64(contextSwitches()-csw0)/float64(b.N), "csw/op")
	stop()
}
