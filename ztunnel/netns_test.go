package ztunnel

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/bpf"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// TestNetns runs the real thing: two node network namespaces joined by an
// underlay, pods on veths, the ztunnel binary in each node with its eBPF
// capture, and local-mode config from a file. Capture gives the proxies the
// original destinations, tunnels go to <pod IP>:15008, and delivery keeps
// the client's address, all in the kernel.
//
//	n1: a1 (enrolled, client), a2 (not enrolled), a3 (enrolled)
//	n2: b1 (enrolled, behind service b: 10.96.0.10:80 -> 8080), b2 (not enrolled)
func TestNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and eBPF")
	}
	bin := buildZtunnel(t)
	prefix := fmt.Sprintf("zt%d", os.Getpid()%100000)
	topo, err := netns.Build(netns.Config{Prefix: prefix, Nodes: []netns.NodeConfig{
		{Name: "n1", Pods: []string{"a1", "a2", "a3"}},
		{Name: "n2", Pods: []string{"b1", "b2"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	pod := topo.Pod
	a1, a2, a3, b1, b2 := pod("a1"), pod("a2"), pod("a3"), pod("b1"), pod("b2")

	servers := map[string]*server{}
	for _, p := range []*netns.Pod{a3, b1, b2} {
		ln, err := p.NS.Listen(t.Context(), nil, "tcp", "0.0.0.0:8080")
		if err != nil {
			t.Fatal(err)
		}
		servers[p.Name] = serveOn(t, ln)
	}

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "mesh.yaml")
	writeConfig := func(extra string) {
		t.Helper()
		wl := func(p *netns.Pod, enrolled bool) string {
			return fmt.Sprintf("- {uid: k/Pod/shop/%[1]s, name: %[1]s, namespace: shop, serviceAccount: %[1]s, node: %[2]s, addresses: [%[3]s], enrolled: %[4]v, ready: true, labels: {app: %[1]s}}\n",
				p.Name, p.Node.Name, p.IP, enrolled)
		}
		y := "workloads:\n" + wl(a1, true) + wl(a2, false) + wl(a3, true) + wl(b1, true) + wl(b2, false) +
			"services:\n- {name: b, namespace: shop, hostname: b.shop.svc.cluster.local, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], endpoints: [{workloadUid: k/Pod/shop/b1}]}\n" +
			extra
		if err := os.WriteFile(cfgPath+".tmp", []byte(y), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(cfgPath+".tmp", cfgPath); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig("")

	zts := map[string]*ztProcess{}
	for _, n := range topo.Nodes {
		zts[n.Name] = startZtunnelIn(t, bin, n, cfgPath, filepath.Join(dir, "ca"), fmt.Sprintf("/sys/fs/bpf/ambit-%s-%s", prefix, n.Name))
	}

	seed := uint64(100)
	talk := func(from *netns.Pod, to string, up, down int64) (serverResult, error) {
		t.Helper()
		seed++ // a distinct payload, to find this exchange among the servers' results
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		c, err := from.NS.Dial(ctx, &net.Dialer{Timeout: 5 * time.Second}, "tcp", to)
		if err != nil {
			return serverResult{}, err
		}
		c.SetDeadline(time.Now().Add(20 * time.Second))
		sum, err := exchange(c, up, down, seed)
		if err != nil {
			return serverResult{}, err
		}
		var r serverResult
		waitFor(t, "server result", func() bool {
			for _, s := range servers {
				for _, x := range s.all() {
					if x.sum == sum && x.n == up {
						r = x
						return true
					}
				}
			}
			return false
		})
		return r, nil
	}
	const up, down = 4 << 20, 3 << 20
	for _, tc := range []struct {
		name     string
		from     *netns.Pod
		to       string
		wantPeer netip.Addr // zero: the source is not kept (plain TCP from the node)
		logs     map[string]string
	}{
		{"service VIP across nodes", a1, "10.96.0.10:80", a1.IP,
			map[string]string{"n1": `"route":"hbone"`, "n2": `"dst.workload":"b1","dst.namespace":"shop"`}},
		{"pod IP across nodes", a1, netip.AddrPortFrom(b1.IP, 8080).String(), a1.IP, nil},
		{"same node, tunnelled through the node's own 15008", a1, netip.AddrPortFrom(a3.IP, 8080).String(), a1.IP,
			map[string]string{"n1": `"dst.identity":"spiffe://cluster.local/ns/shop/sa/a3","direction":"inbound"`}},
		{"plaintext from a pod outside the mesh, via 15006", a2, netip.AddrPortFrom(b1.IP, 8080).String(), a2.IP,
			map[string]string{"n2": `"src.addr":"` + a2.IP.String()}},
		{"enrolled client to a pod outside the mesh: plain TCP", a1, netip.AddrPortFrom(b2.IP, 8080).String(), netip.Addr{},
			map[string]string{"n1": `"route":"direct"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := talk(tc.from, tc.to, up, down)
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantPeer.IsValid() && r.peer.Addr() != tc.wantPeer {
				t.Errorf("server saw %s, want the client's own address %s", r.peer, tc.wantPeer)
			}
			for node, want := range tc.logs {
				waitFor(t, node+" access log "+want, func() bool { return strings.Contains(zts[node].logs.String(), want) })
			}
		})
	}

	// The admin API says what capture does: a1 captured on its veth, the
	// connections above counted, the guard on.
	t.Run("admin /debug/capture", func(t *testing.T) {
		n1 := topo.Node("n1")
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return n1.NS.Dial(ctx, nil, network, addr)
			}}}
		resp, err := hc.Get("http://127.0.0.1:15000/debug/capture")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var got struct {
			Enabled bool
			Status  bpf.Status
		}
		if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
			t.Fatal(err)
		}
		if !got.Enabled || !strings.HasPrefix(got.Status.Guard, "on") || got.Status.Pods[a1.IP.String()] != a1.HostIfname ||
			got.Status.Pods[a2.IP.String()] != "" || got.Status.Stats.Outbound == 0 {
			t.Errorf("/debug/capture = %+v; want enabled, guard on, a1 on %s and not a2, outbound connections counted", got, a1.HostIfname)
		}
	})

	// Policy: STRICT mesh-wide, and b1 admits only a1.
	writeConfig(`policies:
- {name: only-a1, namespace: shop, action: ALLOW, selector: {app: b1}, rules: [{from: [{principals: [cluster.local/ns/shop/sa/a1]}]}]}
peerAuthentications:
- {name: default, namespace: ambit-system, mode: STRICT}
`)
	refused := func(from *netns.Pod) bool {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		c, err := from.NS.Dial(ctx, &net.Dialer{Timeout: 3 * time.Second}, "tcp", netip.AddrPortFrom(b1.IP, 8080).String())
		if err != nil {
			return true
		}
		defer c.Close()
		_, err = exchange(c, 100, 100, 1)
		return err != nil
	}
	waitFor(t, "STRICT refuses a2's plaintext", func() bool { return refused(a2) })
	if refused(a3) != true {
		t.Error("a3 (not admitted by the ALLOW policy) got through")
	}
	if _, err := talk(a1, netip.AddrPortFrom(b1.IP, 8080).String(), 1<<20, 1<<20); err != nil {
		t.Errorf("a1 (admitted) refused: %v", err)
	}
	waitFor(t, "denials in n2's log", func() bool {
		l := zts["n2"].logs.String()
		return strings.Contains(l, "PeerAuthentication STRICT") && strings.Contains(l, `"src.identity":"spiffe://cluster.local/ns/shop/sa/a3"`) &&
			strings.Contains(l, `"outcome":"denied"`)
	})

	// Graceful stop: SIGTERM, exit 0.
	for name, z := range zts {
		if err := z.stop(); err != nil {
			t.Errorf("ztunnel %s: %v\n%s", name, err, z.logs.String())
		}
	}
}

// buildZtunnel builds cmd/ztunnel once per test binary.
func buildZtunnel(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "ztunnel")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/ambit-mesh/ambit/cmd/ztunnel").CombinedOutput()
	if err != nil {
		t.Fatalf("build ztunnel: %v\n%s", err, out)
	}
	return bin
}

type ztProcess struct {
	cmd  *exec.Cmd
	logs *logBuffer
	done chan error
}

// startZtunnelIn runs the ztunnel binary in node n's network namespace with
// its eBPF capture, and waits for readiness (config loaded, capture
// reconciled, listeners up).
func startZtunnelIn(t *testing.T, bin string, n *netns.Node, cfg, caDir, pinPath string) *ztProcess {
	t.Helper()
	z := &ztProcess{logs: &logBuffer{}, done: make(chan error, 1)}
	z.cmd = exec.Command("ip", "netns", "exec", n.NS.Name, bin,
		"--node", n.Name, "--config", cfg, "--ca-dir", caDir,
		"--capture", "--bpf-pin-path", pinPath, "--uplinks", netns.Uplink,
		"--drain-timeout", "2s")
	z.cmd.Stdout, z.cmd.Stderr = z.logs, z.logs
	z.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // dies with a timed-out test
	if err := z.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { z.done <- z.cmd.Wait() }()
	t.Cleanup(func() {
		z.stop()
		bpf.Uninstall(bpf.Options{PinPath: pinPath, Netns: n.NS.Path()})
		if t.Failed() {
			t.Logf("ztunnel %s log:\n%s", n.Name, z.logs.String())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		c, err := n.NS.Dial(ctx, nil, "tcp", "127.0.0.1:15021")
		cancel()
		if err == nil {
			c.SetDeadline(time.Now().Add(time.Second))
			fmt.Fprintf(c, "GET /healthz/ready HTTP/1.0\r\n\r\n")
			b := make([]byte, 12)
			n, _ := c.Read(b)
			c.Close()
			if string(b[:n]) == "HTTP/1.0 200" {
				return z
			}
		}
		select {
		case err := <-z.done:
			t.Fatalf("ztunnel %s exited: %v\n%s", n.Name, err, z.logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("ztunnel %s not ready:\n%s", n.Name, z.logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits; it is idempotent.
func (z *ztProcess) stop() error {
	if z.cmd.ProcessState != nil {
		return nil
	}
	z.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-z.done:
		z.done <- err
		return err
	case <-time.After(10 * time.Second):
		z.cmd.Process.Kill()
		return fmt.Errorf("did not stop on SIGTERM")
	}
}
