package bpf

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// TestMain doubles as the ztunnel process of TestZtunnelProcess: with
// envZtunnelNetns set, the test binary loads capture from its pins and runs
// the ztunnel stand-in in that namespace until it is killed.
//
// The test process is the ztunnel stand-in's process: capture trusts the
// bypass mark only from its cgroup (ZtunnelCgroups), which must not be the
// root cgroup. When it is, the test process moves into a cgroup of its own
// for the run.
func TestMain(m *testing.M) {
	if arg := os.Getenv(envMarkDial); arg != "" {
		markDial(arg)
	}
	if ns := os.Getenv(envZtunnelNetns); ns != "" {
		if err := ztunnelProcess(ns); err != nil {
			fmt.Fprintln(os.Stderr, "ztunnel process:", err)
			os.Exit(1)
		}
	}
	os.Exit(runInOwnCgroup(m))
}

func runInOwnCgroup(m *testing.M) int {
	if os.Geteuid() != 0 {
		return m.Run()
	}
	if root, err := InRootCgroup(); err != nil || !root {
		return m.Run()
	}
	mnt := cgroup2Mount()
	dir := filepath.Join(mnt, fmt.Sprintf("ambit-bpft%d-ztunnel", os.Getpid()))
	if err := JoinCgroup(dir); err != nil {
		fmt.Fprintln(os.Stderr, "leave the root cgroup:", err)
		return 1
	}
	code := m.Run()
	os.WriteFile(filepath.Join(mnt, "cgroup.procs"), []byte(fmt.Sprint(os.Getpid())), 0o644)
	os.Remove(dir)
	return code
}

const (
	envZtunnelNetns = "AMBIT_BPF_TEST_ZTUNNEL_NETNS" // the node's netns name
	envZtunnelPins  = "AMBIT_BPF_TEST_ZTUNNEL_PINS"  // Options.PinPath
	envZtunnelMesh  = "AMBIT_BPF_TEST_ZTUNNEL_MESH"  // enrolled pod IPs, comma-separated
)

// ztunnelProcess is what a real ztunnel does at start: Load (which finds the
// pinned capture), SetupNode (idempotent), listen. It never re-enrolls pods.
func ztunnelProcess(nsName string) error {
	ns := &netns.NS{Name: nsName}
	c, err := Load(Options{PinPath: os.Getenv(envZtunnelPins), Netns: ns.Path(), Uplinks: []string{netns.Uplink}})
	if err != nil {
		return err
	}
	if err := c.SetupNode(); err != nil {
		return err
	}
	var mesh []netip.Addr
	for _, s := range strings.Split(os.Getenv(envZtunnelMesh), ",") {
		mesh = append(mesh, netip.MustParseAddr(s))
	}
	if _, err := newZtunnel(ns, func(ip netip.Addr) bool { return slices.Contains(mesh, ip) }); err != nil {
		return err
	}
	fmt.Println("ready")
	select {}
}

// startZtunnelProcess starts the ztunnel of node as a process of its own and
// returns once it listens.
func (e *env) startZtunnelProcess(t *testing.T, node string) *exec.Cmd {
	t.Helper()
	var mesh []string
	e.mu.Lock()
	for ip := range e.mesh {
		mesh = append(mesh, ip.String())
	}
	e.mu.Unlock()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		envZtunnelNetns+"="+e.topo.Node(node).NS.Name,
		envZtunnelPins+"="+e.opts[node].PinPath,
		envZtunnelMesh+"="+strings.Join(mesh, ","))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("ztunnel process did not start: %q %v", line, err)
	}
	return cmd
}
