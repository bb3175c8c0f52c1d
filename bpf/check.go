package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// ErrUnsupported is returned (wrapped, with what is missing) when the node
// cannot run capture.
var ErrUnsupported = errors.New("node cannot run eBPF capture")

// Check verifies, before anything is loaded, that the node can run capture:
// Linux >= 6.6 (TCX links), the sched_cls program type with the
// bpf_skc_lookup_tcp and bpf_sk_assign helpers, and a bpffs at pinPath. It
// names everything that is missing in one error wrapping ErrUnsupported. BTF
// and cgroup v2 are not needed by these programs; their absence is logged.
func Check(pinPath string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var missing []string
	release, major, minor := kernelVersion()
	if major < 6 || major == 6 && minor < 6 {
		missing = append(missing, fmt.Sprintf("Linux >= 6.6 for TCX links (running %s)", release))
	}
	if err := features.HaveProgramType(ebpf.SchedCLS); errors.Is(err, unix.EPERM) {
		missing = append(missing, "the privileges to load eBPF programs (CAP_BPF, CAP_NET_ADMIN; run as root)")
	} else if err != nil {
		missing = append(missing, fmt.Sprintf("the sched_cls program type (%v)", err))
	} else {
		for _, h := range []asm.BuiltinFunc{asm.FnSkcLookupTcp, asm.FnSkAssign, asm.FnSkbChangeTail} {
			if err := features.HaveProgramHelper(ebpf.SchedCLS, h); err != nil {
				missing = append(missing, fmt.Sprintf("the %s helper (%v)", h, err))
			}
		}
	}
	if !onFS(pinPath, unix.BPF_FS_MAGIC) {
		missing = append(missing, fmt.Sprintf("a bpffs at %s (mount -t bpf bpf /sys/fs/bpf)", pinPath))
	}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		log.Warn("kernel BTF missing (/sys/kernel/btf/vmlinux); capture does not need it")
	}
	if !onFS("/sys/fs/cgroup", unix.CGROUP2_SUPER_MAGIC) && !onFS("/sys/fs/cgroup/unified", unix.CGROUP2_SUPER_MAGIC) {
		log.Warn("cgroup v2 not mounted; capture does not need it")
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: missing %s", ErrUnsupported, strings.Join(missing, "; "))
	}
	return nil
}

func kernelVersion() (release string, major, minor int) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown", 0, 0
	}
	release = unix.ByteSliceToString(u.Release[:])
	fmt.Sscanf(release, "%d.%d", &major, &minor)
	return release, major, minor
}

// onFS reports whether path, or its closest existing parent, is on a file
// system of type magic.
func onFS(path string, magic int64) bool {
	for p := filepath.Clean(path); ; p = filepath.Dir(p) {
		var st unix.Statfs_t
		err := unix.Statfs(p, &st)
		if err == nil {
			return int64(st.Type) == magic
		}
		if p == "/" {
			return false
		}
	}
}

// mountBPFFS mounts bpffs on /sys/fs/bpf when pinPath lives under it and it is
// not mounted yet, as the node's setup would.
func mountBPFFS(pinPath string, log *slog.Logger) error {
	const root = "/sys/fs/bpf"
	if !strings.HasPrefix(filepath.Clean(pinPath)+"/", root+"/") || onFS(root, unix.BPF_FS_MAGIC) {
		return nil
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("%w: missing a bpffs at %s, and mounting one failed: %v", ErrUnsupported, root, err)
	}
	// A bpffs mounted here lives as long as this mount namespace. Under
	// `ip netns exec` (a private mount namespace) it, and every pin in it,
	// vanishes when the process exits, and capture with it; a DaemonSet
	// mounts the host's /sys/fs/bpf so pins outlive restarts.
	log.Warn("mounted a bpffs: pins survive a restart only if this mount is the host's", "path", root)
	return nil
}
