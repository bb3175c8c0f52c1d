package bpf

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// envMarkDial makes the test binary a host process that dials with a
// socket mark (see markDial): "<addr> <mark>".
const envMarkDial = "AMBIT_BPF_TEST_MARKDIAL"

// markDial connects to addr from a socket with SO_MARK mark (0: none),
// sends a line and prints the answer's first line, after a line saying
// whether the process has CAP_NET_ADMIN.
func markDial(arg string) {
	f := strings.Fields(arg)
	mark, _ := strconv.ParseUint(f[1], 0, 32)
	fmt.Printf("net_admin=%v\n", hasCap(unix.CAP_NET_ADMIN))
	d := net.Dialer{Timeout: 3 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) {
			if mark != 0 {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
			}
		})
		return serr
	}}
	c, err := d.DialContext(context.Background(), "tcp4", f[0])
	if err != nil {
		fmt.Println("dial:", err)
		os.Exit(0)
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(c, "probe\n")
	l, err := bufio.NewReader(c).ReadString('\n')
	fmt.Printf("%s (err %v)\n", strings.TrimSpace(l), err)
	os.Exit(0)
}

// hasCap reports whether the process's effective capabilities include c.
func hasCap(c int) bool {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			n, _ := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return n&(1<<c) != 0
		}
	}
	return false
}

// TestBypassMarkNeedsZtunnelsCgroup: a host-network process that is root
// in its container with the default capabilities (CAP_NET_RAW, no
// CAP_NET_ADMIN) can set SO_MARK to ztunnel's bypass mark (0x400) since
// Linux 5.17. The mark alone must not let it reach an enrolled pod
// directly: its connection gets inbound capture (15006) like any other host
// process's. Nor do the capture and loop marks (0x100, 0x200) help it.
// (Security review of issue 19, F1.)
func TestBypassMarkNeedsZtunnelsCgroup(t *testing.T) {
	if _, err := exec.LookPath("capsh"); err != nil {
		t.Fatal("capsh (libcap2-bin) is needed to drop CAP_NET_ADMIN")
	}
	e := newEnv(t, "a1", "b1")
	b1 := e.pod("b1")
	z2 := e.zt["n2"]
	n2 := e.topo.Node("n2")
	dst := net.JoinHostPort(b1.IP.String(), echoPort)

	// The host-network container's cgroup: not ztunnel's.
	cg := filepath.Join(cgroup2Mount(), fmt.Sprintf("ambit-bpft%d-hostnet", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(cg) })
	cgFD, err := os.Open(cg)
	if err != nil {
		t.Fatal(err)
	}
	defer cgFD.Close()

	run := func(mark uint32) (answer string, captured int) {
		t.Helper()
		before := len(z2.records())
		cmd := exec.Command("nsenter", "--net="+n2.NS.Path(), "capsh", "--drop=cap_net_admin,cap_sys_admin,cap_bpf", "--",
			"-c", "exec \"$0\" -test.run='^$'", os.Args[0])
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %#x", envMarkDial, dst, mark))
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgFD.Fd())}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("mark %#x: %v\n%s", mark, err, out)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		if len(lines) < 2 || lines[0] != "net_admin=false" {
			t.Fatalf("mark %#x: the host process must run without CAP_NET_ADMIN: %q", mark, out)
		}
		return lines[len(lines)-1], len(z2.records()) - before
	}
	answered := "b1 from " + n2.IP.String() + ":"

	// Unmarked: inbound capture, as for any host process.
	if got, n := run(0); n != 1 || !strings.HasPrefix(got, answered) {
		t.Fatalf("unmarked host connection: %q, %d captured; want an answer through inbound capture", got, n)
	}
	for _, mark := range []uint32{DefaultBypassMark, 0x100, 0x200, 0x700} {
		got, n := run(mark)
		t.Logf("SO_MARK %#x without CAP_NET_ADMIN: %q, %d captured", mark, got, n)
		if strings.HasPrefix(got, answered) && n == 0 {
			t.Errorf("SO_MARK %#x: the host process reached enrolled b1 directly (no capture): %q", mark, got)
		}
	}
	// The bypass mark in particular changes nothing: captured like unmarked.
	if got, n := run(DefaultBypassMark); n != 1 || !strings.HasPrefix(got, answered) {
		t.Errorf("SO_MARK 0x400: %q, %d captured; want an answer through inbound capture", got, n)
	}
	for _, r := range z2.records() {
		if r.Port != 15006 || r.Src.Addr() != n2.IP {
			t.Errorf("ztunnel n2 saw %v, want only the host's connections on 15006", r)
		}
	}
}

// TestProcessCgroup: the calling process's cgroup v2 directory is found,
// and a process moved into a cgroup finds that one.
func TestProcessCgroup(t *testing.T) {
	requireRoot(t)
	dir, err := ProcessCgroup()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains("\n"+string(b), fmt.Sprintf("\n%d\n", os.Getpid())) {
		t.Errorf("%s/cgroup.procs does not list this process (%d)", dir, os.Getpid())
	}
	if root, err := InRootCgroup(); err != nil || root {
		t.Errorf("InRootCgroup = %v, %v; TestMain moves the tests out of the root", root, err)
	}
}

// TestZtunnelCgroupIsNotTheRoot: the root cgroup holds every process that
// has no cgroup of its own; SetupNode refuses to trust its marked packets.
func TestZtunnelCgroupIsNotTheRoot(t *testing.T) {
	requireRoot(t)
	topo, err := netns.Build(netns.Config{Prefix: fmt.Sprintf("bpfr%d", os.Getpid()), Nodes: []netns.NodeConfig{{Name: "n1"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	opts := Options{
		PinPath:        fmt.Sprintf("/sys/fs/bpf/ambit-testroot%d", os.Getpid()),
		Netns:          topo.Node("n1").NS.Path(),
		Uplinks:        []string{netns.Uplink},
		ZtunnelCgroups: []string{cgroup2Mount()},
	}
	t.Cleanup(func() { Uninstall(opts) })
	c, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetupNode(); err == nil || !strings.Contains(err.Error(), "root cgroup") {
		t.Fatalf("SetupNode with the root cgroup as ztunnel's: %v, want a refusal", err)
	}
}
