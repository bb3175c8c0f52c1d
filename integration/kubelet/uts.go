package kubelet

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// utsDir holds the pods' UTS namespaces (bind mounts, as /var/run/netns
// holds network namespaces).
const utsDir = "/run/ambit-uts"

// newUTS creates a UTS namespace whose host name is hostname (truncated to
// 63 bytes, as a kubelet does), pinned by a bind mount at path, so that every
// process of the pod (its containers, exec) joins it with nsenter --uts.
func newUTS(path, hostname string) error {
	if len(hostname) > 63 {
		hostname = hostname[:63]
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("uts namespace: %w", err)
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("uts namespace: %w", err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: it leaves the process with this
		// goroutine, and its namespace stays pinned by the mount.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWUTS); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		if err := unix.Sethostname([]byte(hostname)); err != nil {
			errc <- fmt.Errorf("sethostname: %w", err)
			return
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/uts", unix.Gettid())
		if err := unix.Mount(src, path, "", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return fmt.Errorf("uts namespace %s: %w", path, err)
	}
	return nil
}

// removeUTS unpins a namespace made by newUTS.
func removeUTS(path string) {
	_ = unix.Unmount(path, unix.MNT_DETACH)
	_ = os.Remove(path)
}
