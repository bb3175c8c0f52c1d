package kubelet

import (
	"errors"
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
		// The thread goes back to its own namespace and lives on: a thread
		// that ends kills the children it started with Pdeathsig (the
		// mesh's ztunnels and istiod-lite), whichever goroutine started them.
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/uts")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWUTS); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		err = unix.Sethostname([]byte(hostname))
		if err == nil {
			src := fmt.Sprintf("/proc/self/task/%d/ns/uts", unix.Gettid())
			if err = unix.Mount(src, path, "", unix.MS_BIND, ""); err != nil {
				err = fmt.Errorf("bind %s: %w", path, err)
			}
		} else {
			err = fmt.Errorf("sethostname: %w", err)
		}
		if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWUTS); serr != nil {
			// Stuck in the pod's namespace: the thread must end (locked).
			errc <- errors.Join(err, fmt.Errorf("back to the host's uts namespace: %w", serr))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	if err := <-errc; err != nil {
		removeUTS(path)
		return fmt.Errorf("uts namespace %s: %w", path, err)
	}
	return nil
}

// removeUTS unpins a namespace made by newUTS.
func removeUTS(path string) {
	_ = unix.Unmount(path, unix.MNT_DETACH)
	_ = os.Remove(path)
}
