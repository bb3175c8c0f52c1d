package kubelet

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// bindMount is one bind mount of a pod's mount namespace: src (a directory
// or a file on the machine) at dst inside the namespace.
type bindMount struct {
	src, dst string
	readOnly bool
}

// newMountNamespace pins at path a mount namespace in which every bind is
// mounted, parents before children. Sources are first bound to a staging
// directory under mntDir, so that a mount hiding a later source (a volume at
// /tmp over a source under /tmp) hides nothing. A missing dst is created on
// the machine's file system (an empty directory or file; a mount namespace
// isolates mounts, not files), so dst may be neither "/" nor an ancestor of
// mntDir.
//
// readOnlyRoot remounts the root read-only in the namespace (the bind mounts
// are mounts of their own and keep their mode).
func newMountNamespace(path string, binds []bindMount, readOnlyRoot bool) error {
	if err := privateDir(mntDir); err != nil {
		return err
	}
	stage := filepath.Join(mntDir, ".stage", filepath.Base(path))
	if err := os.MkdirAll(stage, 0o700); err != nil {
		return fmt.Errorf("mount namespace: %w", err)
	}
	defer os.RemoveAll(stage) // its mounts live only in the namespace, unmounted there
	binds = slices.Clone(binds)
	// Parents first: a shorter path is never under a longer one.
	slices.SortStableFunc(binds, func(a, b bindMount) int { return len(filepath.Clean(a.dst)) - len(filepath.Clean(b.dst)) })
	var script strings.Builder
	script.WriteString("set -e\n")
	for i, b := range binds {
		dst := filepath.Clean(b.dst)
		if dst == "/" || strings.HasPrefix(mntDir+"/", dst+"/") || dst == "/var/run" {
			return fmt.Errorf("mount namespace: cannot mount over %s (it would hide %s)", dst, mntDir)
		}
		st, err := os.Stat(b.src)
		if err != nil {
			return fmt.Errorf("mount namespace: %w", err)
		}
		s := filepath.Join(stage, strconv.Itoa(i))
		if st.IsDir() {
			fmt.Fprintf(&script, "mkdir -p %s\n", quote(s))
		} else {
			fmt.Fprintf(&script, ": > %s\n", quote(s))
		}
		fmt.Fprintf(&script, "mount --bind %s %s\n", quote(b.src), quote(s))
	}
	for i, b := range binds {
		s := filepath.Join(stage, strconv.Itoa(i))
		dst := quote(filepath.Clean(b.dst))
		if st, _ := os.Stat(b.src); st != nil && st.IsDir() {
			fmt.Fprintf(&script, "mkdir -p %s\n", dst)
		} else {
			fmt.Fprintf(&script, "mkdir -p %s; [ -e %s ] || : > %s\n", quote(filepath.Dir(filepath.Clean(b.dst))), dst, dst)
		}
		fmt.Fprintf(&script, "mount --bind %s %s\n", quote(s), dst)
		if b.readOnly {
			fmt.Fprintf(&script, "mount -o remount,bind,ro %s\n", dst)
		}
	}
	for i := range binds {
		fmt.Fprintf(&script, "umount -l %s\n", quote(filepath.Join(stage, strconv.Itoa(i))))
	}
	if readOnlyRoot {
		script.WriteString("mount -o remount,bind,ro /\n")
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("mount namespace: %w", err)
	}
	f.Close()
	// util-linux: a multi-threaded process cannot unshare its mount
	// namespace itself.
	out, err := exec.Command("unshare", "--mount="+path, "--propagation", "private", "sh", "-c", script.String()).CombinedOutput()
	if err != nil {
		removeMountNS(path)
		return fmt.Errorf("mount namespace %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// quote is s as one word of sh.
func quote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// imageDir is where the image of container is mounted in the pod's mount
// namespace pinned at mnt.
func imageDir(mnt, container string) string {
	return filepath.Join(mntDir, ".image", filepath.Base(mnt), container)
}

// removeImageDirs removes the mount points imageDir made for the namespace
// pinned at mnt, once it is gone.
func removeImageDirs(mnt string) {
	_ = os.RemoveAll(filepath.Join(mntDir, ".image", filepath.Base(mnt)))
}
