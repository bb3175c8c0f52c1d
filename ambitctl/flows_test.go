package ambitctl_test

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/ambitctl"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/telemetry"
	"github.com/ambit-mesh/ambit/ztunnel"
)

// startZtunnel runs a real ztunnel for node (every workload local) and
// returns its admin and SOCKS5 addresses.
func startZtunnel(t *testing.T, node string, store *model.Store, mgr *certs.Manager) (admin, socks string) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	p, err := ztunnel.New(ctx, ztunnel.Config{Store: store, Certs: mgr, AdminAddr: "127.0.0.1:0", SOCKS5Addr: "127.0.0.1:0",
		DrainTimeout: time.Second, Node: node})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		p.Close()
		<-done
	})
	return p.Addr(ztunnel.ListenerAdmin).String(), p.Addr(ztunnel.ListenerSOCKS5).String()
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestFlows follows two real ztunnels' flows: merged, filtered on the
// proxies' side, as a table or JSON lines, recent or followed.
func TestFlows(t *testing.T) {
	ca, err := certs.NewSelfSignedCA(spiffeid.RequireTrustDomainFromString("cluster.local"), certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mgr := &certs.Manager{Issuer: ca}
	t.Cleanup(func() { mgr.Close() })
	store := &model.Store{}
	snap := meshSnapshot(t)
	// Each node serves its own workloads: the client pod lives on node-a.
	for _, w := range snap.Workloads {
		w.Node = "node-b"
		if w.Addresses[0] == netip.MustParseAddr("127.83.41.11") {
			w.Node = "node-a"
		}
	}
	store.Replace(snap)
	adminA, socksA := startZtunnel(t, "node-a", store, mgr)
	adminB, socksB := startZtunnel(t, "node-b", store, mgr)

	ln, err := net.Listen("tcp", "127.83.41.60:0")
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
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	served := func(socks string) {
		conn := socks5(t, socks, netip.MustParseAddr("127.83.41.11"), ln.Addr().(*net.TCPAddr).AddrPort())
		conn.Write([]byte("hello"))
		io.ReadFull(conn, make([]byte, 5))
		conn.Close()
	}
	// A source that is no workload of node-b: refused (UNKNOWN_SOURCE, failed).
	refused := func(socks string) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.83.41.11")}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", socks)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		dst := ln.Addr().(*net.TCPAddr).AddrPort()
		ip := dst.Addr().As4()
		req := append([]byte{5, 1, 0, 5, 1, 0, 1}, ip[:]...)
		c.Write(append(req, byte(dst.Port()>>8), byte(dst.Port())))
		io.ReadAll(c)
	}

	// Follow both proxies, failed flows only, as JSON lines.
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var out, errOut lockedBuffer
	done := make(chan int, 1)
	go func() {
		done <- ambitctl.Run(ctx, []string{"flows", "-f", "--address", adminA, "--address", adminB, "--verdict", "failed", "-o", "json"}, &out, &errOut)
	}()
	waitFollowing := func() {
		deadline := time.Now().Add(20 * time.Second)
		for !strings.Contains(out.String(), "node-b") {
			if time.Now().After(deadline) {
				t.Fatalf("no failed flow followed from node-b:\n%s\n%s", out.String(), errOut.String())
			}
			// until the follower is subscribed, flows before it are not streamed
			refused(socksB)
			time.Sleep(50 * time.Millisecond)
		}
	}
	served(socksA)
	waitFollowing()
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("flows -f: exit %d: %s", code, errOut.String())
	}
	sc := bufio.NewScanner(strings.NewReader(out.String()))
	for sc.Scan() {
		var fl telemetry.Flow
		if err := json.Unmarshal(sc.Bytes(), &fl); err != nil {
			t.Fatalf("not a JSON line: %q", sc.Text())
		}
		if fl.Verdict != telemetry.VerdictFailed || fl.Node != "node-b" || fl.ResponseFlags != "UNKNOWN_SOURCE" || fl.Source.Address == "" {
			t.Errorf("followed %+v", fl)
		}
	}

	// Recent flows of both nodes, merged by time, as a table; filtered by pod.
	served(socksA)
	table := mustCLI(t, "flows", "--address", adminA, "--address", adminB, "--last", "100")
	for _, want := range []string{"node-a", "node-b", "shop/client-0 (127.83.41.11:", "allowed", "failed", "UNKNOWN_SOURCE", "open", "close"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if !strings.HasPrefix(lines[0], "TIME") {
		t.Errorf("header %q", lines[0])
	}
	var last string
	for _, l := range lines[1:] {
		if ts := strings.Fields(l)[0]; ts < last {
			t.Errorf("not merged by time: %s after %s", ts, last)
		} else {
			last = ts
		}
	}
	podOnly := mustCLI(t, "flows", "--address", adminA, "--address", adminB, "--pod", "shop/client-0", "--verdict", "allowed", "-o", "json")
	n := 0
	for _, l := range strings.Split(strings.TrimSpace(podOnly), "\n") {
		var fl telemetry.Flow
		if err := json.Unmarshal([]byte(l), &fl); err != nil || fl.Source.Pod != "client-0" || fl.Verdict != "allowed" || fl.Node != "node-a" {
			t.Errorf("--pod shop/client-0 --verdict allowed: %q (%v)", l, err)
		}
		n++
	}
	if n < 3 { // two connections opened, one closed at least
		t.Errorf("%d flows of the client pod:\n%s", n, podOnly)
	}

	if _, errs, code := runCLI(t, "flows", "--address", adminA, "--verdict", "maybe"); code == 0 || !strings.Contains(errs, "verdict") {
		t.Errorf("bad verdict: exit %d: %s", code, errs)
	}
}
