// Package netns builds test topologies out of Linux network namespaces: nodes
// joined by an underlay bridge, and pods attached to their node by veth pairs
// the way a CNI plugin would attach them. Integration tests and benchmarks use
// it to run ambit's data path for real on one machine. Everything here needs
// root and iproute2.
package netns

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// NS is a named network namespace, as created by `ip netns add`.
type NS struct {
	// Name is the namespace's name under /var/run/netns.
	Name string
}

// New creates the network namespace name with its loopback up. It fails if
// the name is taken.
func New(name string) (*NS, error) {
	if err := run("ip", "netns", "add", name); err != nil {
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	ns := &NS{Name: name}
	if err := ns.IP("link set lo up"); err != nil {
		ns.Delete()
		return nil, err
	}
	return ns, nil
}

// Path is the namespace's bind mount, usable with setns(2) or nsenter.
func (n *NS) Path() string { return filepath.Join("/var/run/netns", n.Name) }

// Delete removes the namespace. Its interfaces go with it once no socket holds
// it any more.
func (n *NS) Delete() error {
	if err := run("ip", "netns", "del", n.Name); err != nil {
		return fmt.Errorf("delete netns %s: %w", n.Name, err)
	}
	return nil
}

// Do runs fn on an OS thread that has entered the namespace. Sockets created
// inside fn belong to the namespace for their whole life, so Do is how a test
// listens or dials "from" a pod or a node.
func (n *NS) Do(fn func() error) error {
	f, err := os.Open(n.Path())
	if err != nil {
		return fmt.Errorf("open netns %s: %w", n.Name, err)
	}
	defer f.Close()
	errc := make(chan error, 1)
	// A fresh goroutine keeps the caller's thread untouched. If the thread
	// cannot be switched back it stays locked and the runtime discards it.
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", n.Name, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("leave netns %s: %w", n.Name, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Listen listens on address inside the namespace.
func (n *NS) Listen(ctx context.Context, lc *net.ListenConfig, network, address string) (net.Listener, error) {
	if lc == nil {
		lc = &net.ListenConfig{}
	}
	var ln net.Listener
	err := n.Do(func() (err error) {
		ln, err = lc.Listen(ctx, network, address)
		return err
	})
	return ln, err
}

// Dial connects to address from inside the namespace. The connection's
// socket stays in the namespace after Dial returns.
func (n *NS) Dial(ctx context.Context, d *net.Dialer, network, address string) (net.Conn, error) {
	if d == nil {
		d = &net.Dialer{}
	}
	var c net.Conn
	err := n.Do(func() (err error) {
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Command returns a command that runs inside the namespace (via `ip netns
// exec`).
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// IP runs iproute2 inside the namespace, one command per line of script
// (`ip -batch`), for example "link set eth0 up\naddr add 10.0.0.1/24 dev eth0".
func (n *NS) IP(script string) error {
	cmd := exec.Command("ip", "-n", n.Name, "-batch", "-")
	cmd.Stdin = strings.NewReader(script + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ip -n %s: %w: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// Sysctl sets a sysctl (dotted name, "net.ipv4.ip_forward") inside the
// namespace.
func (n *NS) Sysctl(name, value string) error {
	p := filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/"))
	return n.Do(func() error {
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s in %s: %w", name, n.Name, err)
		}
		return nil
	})
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
	}
	return nil
}
