package bpf

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// TestCapture runs the capture scenarios in order on one two-node world
// (building it once keeps the test fast).
func TestCapture(t *testing.T) {
	e := newEnv(t, "a1", "b1")
	a1, a2, b1 := e.pod("a1"), e.pod("a2"), e.pod("b1")
	z1, z2 := e.zt["n1"], e.zt["n2"]
	ctx := context.Background()

	t.Run("outbound reaches ztunnel with the original destination", func(t *testing.T) {
		got, err := e.talk("a1", "b1", "hello")
		if err != nil {
			t.Fatal(err)
		}
		// b1 sees a1's own address: ztunnel delivered transparently.
		if want := "b1 from " + a1.IP.String() + ":"; !strings.HasPrefix(got, want) {
			t.Errorf("answer %q, want prefix %q", got, want)
		}
		r := last(z1.records())
		if r.Port != 15001 || r.Src.Addr() != a1.IP || r.OrigDst != netip.AddrPortFrom(b1.IP, 8080) {
			t.Errorf("ztunnel n1 saw %v, want 15001: %s:* -> %s:8080", r, a1.IP, b1.IP)
		}
		r = last(z2.records())
		if r.Port != 15008 || r.Src.Addr() != e.topo.Node("n1").IP || r.OrigDst != netip.AddrPortFrom(b1.IP, 15008) {
			t.Errorf("ztunnel n2 saw %v, want 15008: n1 -> %s:15008", r, b1.IP)
		}
	})

	t.Run("a pod's client port 15008 is not taken for HBONE", func(t *testing.T) {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{Port: 15008}, Timeout: 2 * time.Second}
		c, err := a1.NS.Dial(ctx, d, "tcp", net.JoinHostPort(e.pod("b2").IP.String(), echoPort))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		io.WriteString(c, "from 15008\n")
		if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("the wire carries only TLS on 15008 for enrolled pods", func(t *testing.T) {
		const secret = "SECRET-PLAINTEXT-MARKER"
		pcap, err := e.topo.Node("n1").NS.StartCapture(netns.Uplink, filepath.Join(t.TempDir(), "uplink.pcap"), "tcp")
		if err != nil {
			t.Fatal(err)
		}
		for _, pair := range [][2]string{{"a1", "b1"}, {"b1", "a1"}, {"a1", "b2"}, {"a2", "b2"}} {
			if _, err := e.talk(pair[0], pair[1], secret); err != nil {
				t.Fatalf("%s -> %s: %v", pair[0], pair[1], err)
			}
		}
		pkts, err := pcap.Stop()
		if err != nil {
			t.Fatal(err)
		}
		var tunnelled, clear int
		first := map[[2]netip.AddrPort]bool{} // flows whose first payload was checked
		for _, p := range pkts {
			enrolled := slices.Contains([]netip.Addr{a1.IP, b1.IP}, p.Src.Addr()) || slices.Contains([]netip.Addr{a1.IP, b1.IP}, p.Dst.Addr())
			hasSecret := bytes.Contains(p.Payload, []byte(secret))
			switch {
			case enrolled && p.Src.Port() != 15008 && p.Dst.Port() != 15008:
				t.Errorf("enrolled pod's packet not on port 15008: %v", p)
			case enrolled && hasSecret:
				t.Errorf("enrolled pod's payload in clear: %v", p)
			case enrolled:
				tunnelled++
				// Each direction of a tunnel starts with a TLS handshake record.
				if flow := [2]netip.AddrPort{p.Src, p.Dst}; len(p.Payload) > 0 && !first[flow] {
					first[flow] = true
					if len(p.Payload) < 3 || p.Payload[0] != 0x16 || p.Payload[1] != 0x03 {
						t.Errorf("tunnel %v does not start with a TLS handshake: % x", p, p.Payload[:min(len(p.Payload), 8)])
					}
				}
			case hasSecret:
				clear++
			}
		}
		// a1 -> b2 leaves ztunnel as passthrough from the node's address,
		// a2 -> b2 is not captured: both are plain.
		if len(first) < 4 { // both directions of a1 -> b1 and b1 -> a1
			t.Errorf("saw %d tunnel directions start, want at least 4", len(first))
		}
		if tunnelled == 0 || clear == 0 {
			t.Errorf("saw %d tunnelled packets and %d plaintext ones (a2 -> b2), want both", tunnelled, clear)
		}
	})

	t.Run("pairs that are not enrolled are unchanged", func(t *testing.T) {
		before1, before2 := len(z1.records()), len(z2.records())
		got, err := e.talk("a2", "b2", "plain")
		if err != nil {
			t.Fatal(err)
		}
		if want := "b2 from " + a2.IP.String(); !strings.HasPrefix(got, want) {
			t.Errorf("answer %q, want prefix %q", got, want)
		}
		if len(z1.records()) != before1 || len(z2.records()) != before2 {
			t.Errorf("ztunnel saw a2 -> b2: %v %v", z1.records()[before1:], z2.records()[before2:])
		}
	})

	t.Run("inbound plaintext from another node goes to 15006", func(t *testing.T) {
		if _, err := e.talk("a2", "b1", "in"); err != nil {
			t.Fatal(err)
		}
		if r := last(z2.records()); r.Port != 15006 || r.Src.Addr() != a2.IP || r.OrigDst != netip.AddrPortFrom(b1.IP, 8080) {
			t.Errorf("ztunnel n2 saw %v, want 15006: %s:* -> %s:8080", r, a2.IP, b1.IP)
		}
	})

	t.Run("inbound plaintext from the same node goes to 15006", func(t *testing.T) {
		if _, err := e.talk("a2", "a1", "in"); err != nil {
			t.Fatal(err)
		}
		if r := last(z1.records()); r.Port != 15006 || r.Src.Addr() != a2.IP || r.OrigDst != netip.AddrPortFrom(a1.IP, 8080) {
			t.Errorf("ztunnel n1 saw %v, want 15006: %s:* -> %s:8080", r, a2.IP, a1.IP)
		}
	})

	t.Run("enrolled pods of one node talk through ztunnel's 15008", func(t *testing.T) {
		n1 := e.topo.Node("n1")
		a5, err := n1.AddPod("a5")
		if err != nil {
			t.Fatal(err)
		}
		defer n1.RemovePod(a5)
		startEcho(t, a5)
		e.enroll(t, "a5")
		defer func() {
			e.cap["n1"].RemovePod(ctx, Pod{Name: "a5", IPs: []netip.Addr{a5.IP}})
			e.mu.Lock()
			delete(e.mesh, a5.IP)
			e.mu.Unlock()
		}()
		got, err := e.talk("a1", "a5", "neighbour")
		if err != nil {
			t.Fatal(err)
		}
		if want := "a5 from " + a1.IP.String() + ":"; !strings.HasPrefix(got, want) {
			t.Errorf("answer %q, want prefix %q", got, want)
		}
		rs := z1.records()
		if len(rs) < 2 || rs[len(rs)-2].Port != 15001 || rs[len(rs)-1].Port != 15008 || rs[len(rs)-1].OrigDst != netip.AddrPortFrom(a5.IP, 15008) {
			t.Errorf("ztunnel n1 saw %v, want 15001 then 15008 to %s", rs, a5.IP)
		}
	})

	t.Run("capture chains with a CNI's TCX program", func(t *testing.T) {
		n1 := e.topo.Node("n1")
		a6, err := n1.AddPod("a6")
		if err != nil {
			t.Fatal(err)
		}
		defer n1.RemovePod(a6)
		// The CNI was there first, with a program that ends the chain
		// (TCX_PASS): capture still works because it attaches at the head.
		cni, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:         ebpf.SchedCLS,
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
			License:      "MIT",
		})
		if err != nil {
			t.Fatal(err)
		}
		defer cni.Close()
		var cniLink link.Link
		err = n1.NS.Do(func() error {
			ifi, err := net.InterfaceByName(a6.HostIfname)
			if err != nil {
				return err
			}
			cniLink, err = link.AttachTCX(link.TCXOptions{Interface: ifi.Index, Program: cni, Attach: ebpf.AttachTCXIngress})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer cniLink.Close()
		e.enroll(t, "a6")
		defer e.cap["n1"].RemovePod(ctx, Pod{Name: "a6", IPs: []netip.Addr{a6.IP}})
		if _, err := e.talk("a6", "b2", "chained"); err != nil {
			t.Fatal(err)
		}
		if r := last(z1.records()); r.Src.Addr() != a6.IP {
			t.Errorf("ztunnel n1's last connection is %v, want a6's", r)
		}
		info, err := cniLink.Info()
		if err != nil || info.TCX().Ifindex == 0 {
			t.Errorf("the CNI's link lost its interface: %v %v", info, err)
		}
	})

	t.Run("host processes get inbound capture", func(t *testing.T) {
		// A process of the node's network namespace (a host-network pod,
		// a node daemon) is a client like any other: its connection to an
		// enrolled pod goes to ztunnel's 15006, where PeerAuthentication
		// STRICT resets it.
		n2 := e.topo.Node("n2")
		before := len(z2.records())
		c, err := n2.NS.Dial(ctx, &net.Dialer{Timeout: 2 * time.Second}, "tcp", net.JoinHostPort(b1.IP.String(), echoPort))
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		fmt.Fprintf(c, "host\n")
		got, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		recs := z2.records()[before:]
		if len(recs) != 1 || recs[0].Port != 15006 || recs[0].Src.Addr() != n2.IP || recs[0].OrigDst != netip.AddrPortFrom(b1.IP, 8080) {
			t.Errorf("ztunnel n2 saw %v, want one 15006: %s:* -> %s:8080 (the host's connection reached the pod directly)", recs, n2.IP, b1.IP)
		}
		if want := "b1 from " + n2.IP.String() + ":"; !strings.HasPrefix(got, want) {
			t.Errorf("answer %q, want prefix %q", got, want)
		}
	})

	t.Run("kubelet's probes reach the pod directly", func(t *testing.T) {
		n2 := e.topo.Node("n2")
		cg := probeCgroup()
		if err := os.Mkdir(cg, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(cg) })
		if err := e.cap["n2"].RefreshProbeCgroups(); err != nil {
			t.Fatal(err)
		}
		before := len(z2.records())
		// The stand-in for kubelet: a process in the probe cgroup, in the
		// node's namespace, that opens a connection to the pod.
		got, err := probeFrom(ctx, cg, n2.NS, netip.AddrPortFrom(b1.IP, 8080))
		if err != nil {
			t.Fatal(err)
		}
		if want := "b1 from " + n2.IP.String() + ":"; !strings.HasPrefix(got, want) {
			t.Errorf("probe answer %q, want prefix %q", got, want)
		}
		if recs := z2.records()[before:]; len(recs) != 0 {
			t.Errorf("ztunnel saw the probe: %v", recs)
		}
		// The same process outside the cgroup is just a host process.
		before = len(z2.records())
		if _, err := probeFrom(ctx, "", n2.NS, netip.AddrPortFrom(b1.IP, 8080)); err != nil {
			t.Fatal(err)
		}
		if recs := z2.records()[before:]; len(recs) != 1 || recs[0].Port != 15006 {
			t.Errorf("ztunnel saw %v for a host process outside the probe cgroup, want one 15006", recs)
		}
	})

	t.Run("a pod is captured from its first packet", func(t *testing.T) {
		n1 := e.topo.Node("n1")
		a3, err := n1.AddPod("a3")
		if err != nil {
			t.Fatal(err)
		}
		defer n1.RemovePod(a3)
		// The CNI-like hook: capture the pod once its veth exists, before
		// anything runs in it.
		if err := e.cap["n1"].AddPod(ctx, Pod{Name: "a3", IPs: []netip.Addr{a3.IP}}); err != nil {
			t.Fatal(err)
		}
		defer e.cap["n1"].RemovePod(ctx, Pod{Name: "a3", IPs: []netip.Addr{a3.IP}})
		before, _ := e.cap["n1"].Stats()
		pcap, err := n1.NS.StartCapture(netns.Uplink, filepath.Join(t.TempDir(), "uplink.pcap"), "tcp")
		if err != nil {
			t.Fatal(err)
		}
		// The pod's very first packet is this SYN.
		if _, err := e.talk("a3", "b2", "first"); err != nil {
			t.Fatal(err)
		}
		pkts, err := pcap.Stop()
		if err != nil {
			t.Fatal(err)
		}
		after, _ := e.cap["n1"].Stats()
		if r := z1.records(); r[len(r)-1].Src.Addr() != a3.IP || r[len(r)-1].Port != 15001 {
			t.Errorf("ztunnel n1's last connection is %v, want a3's first", r[len(r)-1])
		}
		if after.Outbound != before.Outbound+1 {
			t.Errorf("outbound captures went from %d to %d, want +1", before.Outbound, after.Outbound)
		}
		for _, p := range pkts {
			if p.Src.Addr() == a3.IP || p.Dst.Addr() == a3.IP {
				t.Errorf("a3's packet on the wire: %v", p)
			}
		}
	})

	t.Run("with ztunnel down, enrolled connections are refused", func(t *testing.T) {
		z1.Close()
		pcap, err := e.topo.Node("n1").NS.StartCapture(netns.Uplink, filepath.Join(t.TempDir(), "uplink.pcap"), "tcp")
		if err != nil {
			t.Fatal(err)
		}
		for _, to := range []string{"b1", "b2"} {
			start := time.Now()
			_, err := e.talk("a1", to, "leak?")
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("a1 -> %s with ztunnel down: %v, want connection refused", to, err)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("refusal took %v", d)
			}
		}
		// Inbound: ztunnel n2 down too; a plaintext connection to b1 is
		// refused rather than delivered.
		z2.Close()
		if _, err := e.talk("a2", "b1", "leak?"); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("a2 -> b1 with ztunnel n2 down: %v, want connection refused", err)
		}
		// Same node: the RST goes back to the client pod.
		if _, err := e.talk("a2", "a1", "leak?"); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("a2 -> a1 with ztunnel n1 down: %v, want connection refused", err)
		}
		// Pods outside the mesh do not notice.
		if _, err := e.talk("a2", "b2", "plain"); err != nil {
			t.Errorf("a2 -> b2 with ztunnels down: %v", err)
		}
		pkts, err := pcap.Stop()
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pkts {
			if p.Src.Addr() == a1.IP {
				t.Errorf("a1's packet left the node: %v", p)
			}
		}
		if s, _ := e.cap["n1"].Stats(); s.Refused < 2 {
			t.Errorf("n1 refused %d SYNs, want 2", s.Refused)
		}
	})

	t.Run("killing the ztunnel process refuses, restarting it resumes", func(t *testing.T) {
		e.zt["n2"] = startZtunnel(t, e.topo.Node("n2").NS, e.inMesh) // back from the last test
		z2 = e.zt["n2"]
		// Hand node n1 over to a ztunnel process: this process lets go of
		// capture (it stays pinned); its listeners are closed already.
		if err := e.cap["n1"].Close(); err != nil {
			t.Fatal(err)
		}
		zt := e.startZtunnelProcess(t, "n1")
		if _, err := e.talk("a1", "b1", "via process"); err != nil {
			t.Fatalf("a1 -> b1 through the ztunnel process: %v", err)
		}
		// kill -9: no clean-up code runs.
		zt.Process.Kill()
		zt.Wait()
		for _, to := range []string{"b1", "b2"} {
			if _, err := e.talk("a1", to, "leak?"); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("a1 -> %s with the ztunnel process killed: %v, want connection refused", to, err)
			}
		}
		zt = e.startZtunnelProcess(t, "n1")
		if _, err := e.talk("a1", "b1", "back"); err != nil {
			t.Errorf("a1 -> b1 after the ztunnel process restarted: %v", err)
		}
		zt.Process.Kill()
		zt.Wait()

		// The rest of the test runs with n1's ztunnel in this process
		// again; loading finds the pinned pods.
		c, err := Load(e.opts["n1"])
		if err != nil {
			t.Fatal(err)
		}
		e.cap["n1"] = c
		e.zt["n1"] = startZtunnel(t, e.topo.Node("n1").NS, e.inMesh)
		z1 = e.zt["n1"]
		if _, err := e.talk("a1", "b1", "back"); err != nil {
			t.Fatal(err)
		}
		if r := z1.records(); len(r) != 1 || r[0].OrigDst != netip.AddrPortFrom(b1.IP, 8080) {
			t.Errorf("reloaded ztunnel n1 saw %v", r)
		}
		pods, err := e.cap["n1"].Pods()
		if err != nil || len(pods) != 1 || pods[a1.IP] != a1.HostIfname {
			t.Errorf("after reload n1 captures %v (%v), want a1 on %s", pods, err, a1.HostIfname)
		}
	})

	t.Run("inbound capture does not depend on the uplink program", func(t *testing.T) {
		if err := e.cap["n2"].detach("uplink-" + netns.Uplink); err != nil {
			t.Fatal(err)
		}
		defer e.cap["n2"].SetupNode()
		if _, err := e.talk("a2", "b1", "in"); err != nil {
			t.Fatal(err)
		}
		if r := last(z2.records()); r.Port != 15006 || r.Src.Addr() != a2.IP {
			t.Errorf("ztunnel n2 saw %v, want 15006 from %s", r, a2.IP)
		}
	})

	t.Run("a pod that is gone is released by Reconcile", func(t *testing.T) {
		n1 := e.topo.Node("n1")
		a4, err := n1.AddPod("a4")
		if err != nil {
			t.Fatal(err)
		}
		if err := e.cap["n1"].AddPod(ctx, Pod{Name: "a4", IPs: []netip.Addr{a4.IP}}); err != nil {
			t.Fatal(err)
		}
		if err := n1.RemovePod(a4); err != nil { // veth and netns gone
			t.Fatal(err)
		}
		if err := e.cap["n1"].Reconcile(ctx, []Pod{{Name: "a1", IPs: []netip.Addr{a1.IP}}}); err != nil {
			t.Fatal(err)
		}
		pods, err := e.cap["n1"].Pods()
		if err != nil || len(pods) != 1 || pods[a1.IP] == "" {
			t.Errorf("n1 captures %v (%v), want only a1", pods, err)
		}
		pins, _ := filepath.Glob(filepath.Join(e.opts["n1"].PinPath, "links", "pod-"+a4.HostIfname+"-*"))
		if len(pins) > 0 {
			t.Errorf("links of a4 still pinned: %v", pins)
		}
	})

	t.Run("un-enrolling restores direct traffic", func(t *testing.T) {
		if err := e.cap["n1"].Reconcile(ctx, nil); err != nil {
			t.Fatal(err)
		}
		before := len(z1.records())
		got, err := e.talk("a1", "b2", "direct")
		if err != nil {
			t.Fatal(err)
		}
		if want := "b2 from " + a1.IP.String(); !strings.HasPrefix(got, want) || len(z1.records()) != before {
			t.Errorf("a1 -> b2 answered %q, ztunnel saw %v", got, z1.records()[before:])
		}
		// And back.
		if err := e.cap["n1"].Reconcile(ctx, []Pod{{Name: "a1", IPs: []netip.Addr{a1.IP}}}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.talk("a1", "b2", "again"); err != nil || len(z1.records()) != before+1 {
			t.Errorf("re-enrolled a1 -> b2: %v, ztunnel saw %v", err, z1.records()[before:])
		}
	})

	t.Run("uninstall leaves nothing behind", func(t *testing.T) {
		for _, n := range e.topo.Nodes {
			if err := e.cap[n.Name].Uninstall(); err != nil {
				t.Fatal(err)
			}
			delete(e.cap, n.Name)
			if _, err := os.Stat(e.opts[n.Name].PinPath); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s: pin path still there: %v", n.Name, err)
			}
			out, err := n.NS.Command(ctx, "sh", "-c", "ip rule show | grep fwmark; ip route show table 100; sysctl -n net.ipv4.tcp_early_demux; cat /proc/sys/net/ipv4/conf/pv*/accept_local | grep -v 0; true").CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != "1" {
				t.Errorf("%s: rules, routes or sysctl left: %q %v", n.Name, out, err)
			}
			err = n.NS.Do(func() error {
				ifs, err := net.Interfaces()
				if err != nil {
					return err
				}
				for _, ifi := range ifs {
					for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
						q, err := link.QueryPrograms(link.QueryOptions{Target: ifi.Index, Attach: at})
						if err != nil {
							return err
						}
						if len(q.Programs) > 0 {
							return fmt.Errorf("%s has %d %s programs", ifi.Name, len(q.Programs), at)
						}
					}
				}
				return nil
			})
			if err != nil {
				t.Errorf("%s: %v", n.Name, err)
			}
		}
		if _, err := e.talk("a1", "b1", "direct"); err != nil {
			t.Errorf("a1 -> b1 after uninstall: %v", err)
		}
	})
}

func last(rs []record) record {
	if len(rs) == 0 {
		return record{}
	}
	return rs[len(rs)-1]
}

// probeFrom connects to dst from a new process in the network namespace ns
// and, unless cgroup is empty, in the cgroup v2 directory cgroup (moved
// there before its socket exists), sends "probe" and returns the answer's
// first line.
func probeFrom(ctx context.Context, cgroup string, ns *netns.NS, dst netip.AddrPort) (string, error) {
	join := ""
	if cgroup != "" {
		join = "echo $$ > " + filepath.Join(cgroup, "cgroup.procs") + " && "
	}
	script := fmt.Sprintf(`%sexec nsenter --net=%s bash -c 'exec 3<>/dev/tcp/%s/%d && echo probe >&3 && head -n1 <&3'`,
		join, ns.Path(), dst.Addr(), dst.Port())
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "bash", "-c", script).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("probe: %w: %s", err, out)
	}
	return strings.TrimSpace(string(out)), nil
}
