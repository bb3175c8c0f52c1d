package ztunnel

import (
	"context"
	"fmt"
	"net"
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

// TestNetnsHardening runs the real ztunnel binary with its eBPF capture on
// two node namespaces and checks three data-plane hardenings of issue 19:
//
//   - an enrolled pod's plain TCP (passthrough to a host outside the mesh,
//     direct to a pod outside the mesh, on this node or another) leaves
//     from the pod's own address, not the node's (item 5);
//   - a host process of the node reaches an enrolled pod only through
//     inbound capture (15006; STRICT resets it), and only kubelet's probes
//     (its cgroup, --probe-cgroups) go directly (item 7);
//   - a destination in --pod-cidrs that the config does not know is
//     reset after the wait, never passed through in clear (item 13).
//
// The topology:
//
//	n1: a1 (enrolled client), a2 (not enrolled), a3 (enrolled); host :9001
//	n2: b2 (not enrolled), b3 (not in the config at all); host :9000
func TestNetnsHardening(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, eBPF, cgroups")
	}
	cgRoot := cgroup2Root()
	if cgRoot == "" {
		t.Fatal("no cgroup v2 hierarchy mounted: the probe exemption needs one")
	}
	bin := buildZtunnel(t)
	prefix := fmt.Sprintf("zh%d", os.Getpid()%100000)
	topo, err := netns.Build(netns.Config{Prefix: prefix, Nodes: []netns.NodeConfig{
		{Name: "n1", Pods: []string{"a1", "a2", "a3"}},
		{Name: "n2", Pods: []string{"b2", "b3"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	pod := topo.Pod
	a1, a2, a3, b2, b3 := pod("a1"), pod("a2"), pod("a3"), pod("b2"), pod("b3")
	n1, n2 := topo.Node("n1"), topo.Node("n2")

	servers := map[string]*server{}
	listen := func(name string, ns *netns.NS, addr string) {
		ln, err := ns.Listen(t.Context(), nil, "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		servers[name] = serveOn(t, ln)
	}
	for _, p := range []*netns.Pod{a2, a3, b2, b3} {
		listen(p.Name, p.NS, "0.0.0.0:8080")
	}
	listen("n1-host", n1.NS, "0.0.0.0:9001")
	listen("n2-host", n2.NS, "0.0.0.0:9000")

	// kubelet's cgroup, for n1's probes.
	kubelet := filepath.Join(cgRoot, fmt.Sprintf("ambit-%s-kubelet", prefix))
	if err := os.Mkdir(kubelet, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(kubelet) })

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "mesh.yaml")
	writeConfig := func(extra string) {
		t.Helper()
		wl := func(p *netns.Pod, enrolled bool) string {
			return fmt.Sprintf("- {uid: k/Pod/shop/%[1]s, name: %[1]s, namespace: shop, serviceAccount: %[1]s, node: %[2]s, addresses: [%[3]s], enrolled: %[4]v, ready: true, labels: {app: %[1]s}}\n",
				p.Name, p.Node.Name, p.IP, enrolled)
		}
		// b3 is missing on purpose: a pod the config has not learned.
		y := "workloads:\n" + wl(a1, true) + wl(a2, false) + wl(a3, true) + wl(b2, false) + extra
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
		zts[n.Name] = startZtunnelNsenter(t, n, fmt.Sprintf("/sys/fs/bpf/ambit-%s-%s", prefix, n.Name),
			bin, "--node", n.Name, "--config", cfgPath, "--ca-dir", filepath.Join(dir, "ca"),
			"--capture", "--bpf-pin-path", fmt.Sprintf("/sys/fs/bpf/ambit-%s-%s", prefix, n.Name), "--uplinks", netns.Uplink,
			"--drain-timeout", "2s", "--probe-cgroups", kubelet,
			"--pod-cidrs", "10.0.0.0/8", "--unknown-destination-wait", "1s")
	}

	seed := uint64(300)
	// talk runs one exchange from ns to dst and returns what the server
	// recorded for it.
	talk := func(ns *netns.NS, dst string) (serverResult, error) {
		t.Helper()
		seed++
		ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
		defer cancel()
		c, err := ns.Dial(ctx, &net.Dialer{Timeout: 5 * time.Second}, "tcp", dst)
		if err != nil {
			return serverResult{}, err
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		const up, down = 256 << 10, 128 << 10
		sum, err := exchange(c, up, down, seed)
		if err != nil {
			return serverResult{}, err
		}
		var r serverResult
		waitFor(t, "the server's result", func() bool {
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

	// Item 5: plain TCP of an enrolled pod keeps the pod's address.
	for _, tc := range []struct {
		name string
		dst  netip.AddrPort
		want netip.Addr
	}{
		{"passthrough to a host on another node", netip.AddrPortFrom(n2.IP, 9000), a1.IP},
		{"direct to a pod outside the mesh on another node", netip.AddrPortFrom(b2.IP, 8080), a1.IP},
		{"direct to a pod outside the mesh on the same node", netip.AddrPortFrom(a2.IP, 8080), a1.IP},
		// The node itself: replies to the pod's address would go to the
		// pod, so this one leaves from the node's.
		{"passthrough to the pod's own node", netip.AddrPortFrom(n1.IP, 9001), n1.IP},
	} {
		t.Run("pod source: "+tc.name, func(t *testing.T) {
			r, err := talk(a1.NS, tc.dst.String())
			if err != nil {
				t.Fatal(err)
			}
			if r.peer.Addr() != tc.want {
				t.Errorf("the server saw %s, want %s", r.peer, tc.want)
			}
		})
	}

	// Item 13: a pod the config does not know, inside the pod CIDRs.
	t.Run("unknown pod in the pod CIDRs: reset, nothing in clear", func(t *testing.T) {
		pcap, err := n1.NS.StartCapture(netns.Uplink, filepath.Join(t.TempDir(), "uplink.pcap"), "tcp")
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, err = talk(a1.NS, netip.AddrPortFrom(b3.IP, 8080).String())
		took := time.Since(start)
		pkts, perr := pcap.Stop()
		if perr != nil {
			t.Fatal(perr)
		}
		if err == nil {
			t.Fatal("a1 reached b3, which the config does not know, in clear")
		}
		if took < time.Second {
			t.Errorf("refused after %v, before the 1s wait", took)
		}
		for _, p := range pkts {
			if p.Dst.Addr() == b3.IP || p.Src.Addr() == b3.IP {
				t.Errorf("a packet to or from b3 on n1's uplink: %v", p)
			}
		}
		if n := len(servers["b3"].all()); n != 0 {
			t.Errorf("b3 got %d connections", n)
		}
	})

	// Item 7: host processes of the node.
	t.Run("host process to an enrolled pod: through 15006", func(t *testing.T) {
		r, err := talk(n1.NS, netip.AddrPortFrom(a3.IP, 8080).String())
		if err != nil {
			t.Fatal(err)
		}
		if r.peer.Addr() != n1.IP {
			t.Errorf("a3 saw %s, want the node's address %s", r.peer, n1.IP)
		}
		want := []string{`"via":"inbound"`, `"` + n1.IP.String() + `:`, netip.AddrPortFrom(a3.IP, 8080).String()}
		waitFor(t, fmt.Sprintf("n1's access log: a line with %q", want), func() bool {
			for _, line := range strings.Split(zts["n1"].logs.String(), "\n") {
				if strings.Contains(line, want[0]) && strings.Contains(line, want[1]) && strings.Contains(line, want[2]) {
					return true
				}
			}
			return false
		})
	})

	writeConfig("peerAuthentications:\n- {name: default, namespace: ambit-system, mode: STRICT}\n")
	t.Run("STRICT: host process reset, kubelet's probe and the mesh still through", func(t *testing.T) {
		waitFor(t, "STRICT to reset the host's connection", func() bool {
			_, err := talk(n1.NS, netip.AddrPortFrom(a3.IP, 8080).String())
			return err != nil
		})
		before := len(servers["a3"].all())
		got, err := probeIn(t.Context(), kubelet, n1.NS, netip.AddrPortFrom(a3.IP, 8080))
		if err != nil {
			t.Fatalf("kubelet's probe under STRICT: %v", err)
		}
		waitFor(t, "a3 to record the probe", func() bool { return len(servers["a3"].all()) > before })
		if r := servers["a3"].all()[before]; r.peer.Addr() != n1.IP {
			t.Errorf("a3 saw the probe from %s, want the node's address %s", r.peer, n1.IP)
		}
		t.Logf("probe: %d bytes answered", len(got))
		if _, err := talk(a1.NS, netip.AddrPortFrom(a3.IP, 8080).String()); err != nil {
			t.Errorf("a1 -> a3 (mesh, delivered by ztunnel) under STRICT: %v", err)
		}
	})

	for name, z := range zts {
		if err := z.stop(); err != nil {
			t.Errorf("ztunnel %s: %v\n%s", name, err, z.logs.String())
		}
	}
}

// startZtunnelNsenter runs the ztunnel command line args in node n's
// network namespace with nsenter (the host's mounts stay visible: the
// cgroup hierarchy, and bpffs for the pins under pinPath, which cleanup
// uninstalls) and waits for readiness, like startZtunnelIn.
func startZtunnelNsenter(t *testing.T, n *netns.Node, pinPath string, args ...string) *ztProcess {
	t.Helper()
	z := &ztProcess{logs: &logBuffer{}, done: make(chan error, 1)}
	z.cmd = exec.Command("nsenter", append([]string{"--net=" + n.NS.Path()}, args...)...)
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
	waitFor(t, "ztunnel "+n.Name+" ready", func() bool {
		select {
		case err := <-z.done:
			z.done <- err
			t.Fatalf("ztunnel %s exited: %v\n%s", n.Name, err, z.logs.String())
		default:
		}
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		c, err := n.NS.Dial(ctx, nil, "tcp", "127.0.0.1:15021")
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		fmt.Fprintf(c, "GET /healthz/ready HTTP/1.0\r\n\r\n")
		b := make([]byte, 12)
		k, _ := c.Read(b)
		return string(b[:k]) == "HTTP/1.0 200"
	})
	return z
}

// cgroup2Root is where the cgroup v2 hierarchy is mounted ("" if nowhere).
func cgroup2Root() string {
	b, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "cgroup2" {
			return f[1]
		}
	}
	return ""
}

// probeIn connects to dst like kubelet's TCP probe would, from a new
// process in the cgroup v2 directory cgroup (joined before its socket
// exists) and the network namespace ns: it sends the server's 8-byte
// request for 16 bytes and returns what it read (to the server's FIN).
func probeIn(ctx context.Context, cgroup string, ns *netns.NS, dst netip.AddrPort) ([]byte, error) {
	script := fmt.Sprintf(`echo $$ > %s && exec nsenter --net=%s bash -c 'exec 3<>/dev/tcp/%s/%d && printf "\0\0\0\0\0\0\0\020" >&3 && cat <&3'`,
		filepath.Join(cgroup, "cgroup.procs"), ns.Path(), dst.Addr(), dst.Port())
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var stderr strings.Builder
	cmd := exec.CommandContext(ctx, "bash", "-c", script)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("probe %s: %w: %s", dst, err, stderr.String())
	}
	if len(out) != 16 {
		return out, fmt.Errorf("probe %s: read %d bytes, want 16", dst, len(out))
	}
	return out, nil
}
