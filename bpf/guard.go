package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The guard (sockopt_guard in capture.c, a cgroup setsockopt program at the
// root cgroup, so it sees every process of the node) closes the two ways a
// process of the node can put frames on an enrolled pod's veth past
// pod_egress: in the node's network namespace it refuses (EPERM)
// setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS) and, unless
// Options.AllowNodeAFXDP, every SOL_XDP option (an AF_XDP socket cannot send
// without registering its UMEM and rings). It is loaded and attached apart
// from the capture programs: a node where it cannot be (no root cgroup in
// view) still captures, and Capture.Guard says why it is off.

// guardLink names the guard's link in Capture.links; its pin in the links
// directory is guardLink-0 or guardLink-1 (see attachGuardErr).
const guardLink = "guard-sockopt"

// tcxObjects are the capture programs and maps that every node needs.
type tcxObjects struct {
	PodEgress     *ebpf.Program `ebpf:"pod_egress"`
	PodIngress    *ebpf.Program `ebpf:"pod_ingress"`
	UplinkIngress *ebpf.Program `ebpf:"uplink_ingress"`
	captureMaps
}

func (o *tcxObjects) Close() error {
	return errors.Join(closeAll(o.PodEgress, o.PodIngress, o.UplinkIngress), o.captureMaps.Close())
}

// guardObjects is the guard.
type guardObjects struct {
	SockoptGuard *ebpf.Program `ebpf:"sockopt_guard"`
}

func (o *guardObjects) Close() error { return closeAll(o.SockoptGuard) }

func closeAll(ps ...*ebpf.Program) error {
	var errs []error
	for _, p := range ps {
		if p != nil {
			errs = append(errs, p.Close())
		}
	}
	return errors.Join(errs...)
}

// netnsCookie returns the cookie of the node's network namespace
// (SO_NETNS_COOKIE, Linux 5.14), which the guard compares with a socket's.
func (c *Capture) netnsCookie() (uint64, error) {
	var cookie uint64
	err := c.inNetns(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		cookie = v
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("netns cookie: %w", err)
	}
	return cookie, nil
}

// loadGuard loads the guard for the node (c not yet shared). A failure is
// kept in c.guardErr: capture works without it.
func (c *Capture) loadGuard(spec *ebpf.CollectionSpec) {
	cookie, err := c.netnsCookie()
	if err == nil {
		err = spec.Variables["node_netns_cookie"].Set(cookie)
	}
	if err == nil {
		allow := uint8(0)
		if c.opts.AllowNodeAFXDP {
			allow = 1
		}
		err = spec.Variables["allow_af_xdp"].Set(allow)
	}
	if err == nil {
		err = spec.LoadAndAssign(&c.guard, nil)
	}
	if err != nil {
		c.guardErr = fmt.Errorf("load guard: %w", err)
	}
}

// withRootCgroup calls fn with the directory of the node's root cgroup v2
// (id 1): the guard attached there applies to every process of the node.
// In a cgroup namespace of its own, the cgroup2 file system in view (or
// the one withCgroup2 mounts) has another root, and the guard is refused.
func withRootCgroup(fn func(dir string) error) error {
	return withCgroup2(func() error {
		mounts, err := cgroup2Mounts()
		if err != nil {
			return err
		}
		for _, m := range mounts {
			if id, err := cgroupID(m.point); err == nil && id == rootCgroupID {
				return fn(m.point)
			}
		}
		return errors.New("the node's root cgroup is not in view: mount the host's cgroup2 file system (hostPath /sys/fs/cgroup) and use the host's cgroup namespace")
	})
}

// attachGuard attaches the loaded guard at the root cgroup and pins its
// link, replacing the link of an earlier Load only once the new one is
// attached, so the node is never unguarded between two ztunnels (c.mu
// held).
func (c *Capture) attachGuard() {
	if c.guardErr == nil {
		c.guardErr = c.attachGuardErr()
	}
	if c.guardErr != nil {
		c.log.Warn("guard off: a host-network process with CAP_NET_RAW can reach enrolled pods past capture (SECURITY.md)", "err", c.guardErr)
	} else if gap := compatGap(); gap != "" {
		c.log.Warn("guard on, but "+gap, "cmdline", "ia32_emulation=0")
	}
}

func (c *Capture) attachGuardErr() error {
	if _, ok := c.links[guardLink]; ok {
		return nil
	}
	var l link.Link
	err := withRootCgroup(func(root string) error {
		var err error
		l, err = link.AttachCgroup(link.CgroupOptions{Path: root, Attach: ebpf.AttachCGroupSetsockopt, Program: c.guard.SockoptGuard})
		return err
	})
	if err != nil {
		return fmt.Errorf("attach guard: %w", err)
	}
	// Pinned beside the old link (an earlier ztunnel's, under the other of
	// two names: bpffs does not rename), which is released only once the
	// new one is attached and pinned; if pinning fails the old one stays.
	dir := filepath.Join(c.opts.PinPath, linksDir)
	name, other := guardLink+"-0", guardLink+"-1"
	if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
		name, other = other, name
	}
	os.Remove(filepath.Join(dir, name)) // a leftover of an interrupted reload
	if err := l.Pin(filepath.Join(dir, name)); err != nil {
		l.Close()
		return fmt.Errorf("pin guard: %w", err)
	}
	if old, err := link.LoadPinnedLink(filepath.Join(dir, other), nil); err == nil {
		old.Unpin()
		old.Close()
	}
	c.links[guardLink] = l
	return nil
}

// compatGap says what the guard does not see on this machine: the kernel
// runs cgroup setsockopt programs only for native system calls, not for a
// 32-bit (compat) setsockopt, which an x86-64 kernel with IA32 emulation
// accepts from any process (int $0x80 needs no 32-bit userland). Empty
// when the kernel was booted with ia32_emulation=0 (Linux 6.7) or is not
// x86-64.
func compatGap() string {
	if runtime.GOARCH != "amd64" {
		return ""
	}
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		for _, f := range strings.Fields(string(b)) {
			if v, ok := strings.CutPrefix(f, "ia32_emulation="); ok {
				switch strings.ToLower(v) {
				case "0", "n", "no", "off", "false":
					return ""
				}
			}
		}
	}
	return "a 32-bit (compat) setsockopt is not seen by cgroup hooks: boot with ia32_emulation=0 to close it (SECURITY.md)"
}

// Guard reports whether the node's guard is in force: nil once SetupNode
// attached it, else why not.
func (c *Capture) Guard() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.guardErr != nil {
		return c.guardErr
	}
	if _, ok := c.links[guardLink]; !ok {
		return errors.New("guard not attached: SetupNode has not run")
	}
	return nil
}
