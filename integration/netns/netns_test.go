package netns

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestTopology(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	topo, err := Build(Config{Nodes: []NodeConfig{
		{Name: "n1", Pods: []string{"a1", "a2"}},
		{Name: "n2", Pods: []string{"b1"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := topo.Close(); err != nil {
			t.Error(err)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	b1 := topo.Pod("b1")
	ln, err := b1.NS.Listen(ctx, nil, "tcp", ":8080")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, c.RemoteAddr().String())
			c.Close()
		}
	}()
	capture, err := topo.Node("n1").NS.StartCapture(Uplink, filepath.Join(t.TempDir(), "u.pcap"), "tcp")
	if err != nil {
		t.Fatal(err)
	}
	// Cross-node pod to pod, same-node pod to pod, and node to pod.
	for _, from := range []*NS{topo.Pod("a1").NS, topo.Pod("a2").NS, topo.Node("n2").NS} {
		c, err := from.Dial(ctx, nil, "tcp", net.JoinHostPort(b1.IP.String(), "8080"))
		if err != nil {
			t.Fatalf("dial from %s: %v", from.Name, err)
		}
		got, _ := io.ReadAll(c)
		c.Close()
		t.Logf("%s -> b1 seen as %s", from.Name, got)
	}
	if got := string(must(io.ReadAll(mustDial(t, ctx, topo.Node("n2").NS, b1)))); !strings.HasPrefix(got, topo.Node("n2").IP.String()) {
		t.Errorf("node n2 reaches its pod from %s, want its own IP", got)
	}
	pkts, err := capture.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if len(pkts) == 0 {
		t.Fatal("capture on n1's uplink saw no packets")
	}
	if pkts[0].Flags&SYN == 0 || pkts[0].Dst.Port() != 8080 {
		t.Errorf("first packet %v, want a SYN to 8080", pkts[0])
	}

	// A pod added later is reachable too, and removal cleans up.
	a3, err := topo.Node("n1").AddPod("a3")
	if err != nil {
		t.Fatal(err)
	}
	mustDial(t, ctx, a3.NS, b1).Close()
	if err := topo.Node("n1").RemovePod(a3); err != nil {
		t.Fatal(err)
	}
}

func mustDial(t *testing.T, ctx context.Context, from *NS, to *Pod) net.Conn {
	t.Helper()
	c, err := from.Dial(ctx, nil, "tcp", net.JoinHostPort(to.IP.String(), "8080"))
	if err != nil {
		t.Fatalf("dial from %s: %v", from.Name, err)
	}
	return c
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
