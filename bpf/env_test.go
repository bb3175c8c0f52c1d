package bpf

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// The test world: two nodes with two pods each; a1 and b1 are enrolled.
//
//	n1: a1 (enrolled), a2      n2: b1 (enrolled), b2
//
// Each node runs a stand-in for ztunnel (zt) and every pod an echo server on
// port 8080 that answers "<pod> from <peer address>: <line>".
type env struct {
	topo *netns.Topology
	cap  map[string]*Capture // by node
	zt   map[string]*ztunnel // by node
	opts map[string]Options  // by node

	mu   sync.Mutex          // guards mesh
	mesh map[netip.Addr]bool // enrolled pods' addresses
}

func (e *env) inMesh(ip netip.Addr) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.mesh[ip]
}

const echoPort = "8080"

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, eBPF, bpffs")
	}
}

func newEnv(t testing.TB, enrolled ...string) *env {
	t.Helper()
	requireRoot(t)
	topo, err := netns.Build(netns.Config{
		Prefix: fmt.Sprintf("bpft%d", os.Getpid()),
		Nodes: []netns.NodeConfig{
			{Name: "n1", Pods: []string{"a1", "a2"}},
			{Name: "n2", Pods: []string{"b1", "b2"}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{topo: topo, cap: map[string]*Capture{}, zt: map[string]*ztunnel{}, opts: map[string]Options{}, mesh: map[netip.Addr]bool{}}
	t.Cleanup(func() {
		for _, z := range e.zt {
			z.Close()
		}
		for _, c := range e.cap {
			c.Close()
		}
		for _, o := range e.opts {
			Uninstall(o)
		}
		topo.Close()
	})
	for _, n := range topo.Nodes {
		for _, p := range n.Pods {
			startEcho(t, p)
		}
		opts := Options{
			PinPath:      fmt.Sprintf("/sys/fs/bpf/ambit-test%d-%s", os.Getpid(), n.Name),
			Netns:        n.NS.Path(),
			Uplinks:      []string{netns.Uplink},
			ProbeCgroups: []string{probeCgroup()},
			Logger:       testLogger(t),
		}
		e.opts[n.Name] = opts
		c, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		e.cap[n.Name] = c
		if err := c.SetupNode(); err != nil {
			t.Fatal(err)
		}
		e.zt[n.Name] = startZtunnel(t, n.NS, e.inMesh)
	}
	for _, name := range enrolled {
		e.enroll(t, name)
	}
	return e
}

func (e *env) pod(name string) *netns.Pod { return e.topo.Pod(name) }

func (e *env) enroll(t testing.TB, name string) {
	t.Helper()
	p := e.pod(name)
	if err := e.cap[p.Node.Name].AddPod(context.Background(), Pod{Name: name, IPs: []netip.Addr{p.IP}}); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.mesh[p.IP] = true
	e.mu.Unlock()
}

// talk connects from pod from to to:8080, sends a line and returns the answer.
func (e *env) talk(from, to string, line string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := e.pod(from).NS.Dial(ctx, nil, "tcp", net.JoinHostPort(e.pod(to).IP.String(), echoPort))
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(got), err
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

func startEcho(t testing.TB, p *netns.Pod) {
	ln, err := p.NS.Listen(context.Background(), nil, "tcp", ":"+echoPort)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if line == "stream\n" { // throughput mode: swallow everything
						io.Copy(io.Discard, r)
						return
					}
					fmt.Fprintf(c, "%s from %s: %s", p.Name, c.RemoteAddr(), line)
				}
			}()
		}
	}()
}

// ztunnel is a minimal stand-in for the real one, enough to prove capture:
// 15001 accepts captured outbound connections and tunnels them in TLS to the
// destination pod's 15008 (or, for a pod outside the mesh, connects to it); 15008 terminates that TLS and delivers to the pod
// from the client's address (transparent); 15006 delivers captured inbound
// plaintext the same way. It records what each listener saw.
type ztunnel struct {
	ns     *netns.NS // the node's
	inMesh func(netip.Addr) bool
	lns    []net.Listener

	mu   sync.Mutex // guards seen
	seen []record
}

type record struct {
	Port         int            // listener: 15001, 15006, 15008
	Src, OrigDst netip.AddrPort // RemoteAddr and LocalAddr of the accepted connection
}

func (r record) String() string { return fmt.Sprintf("%d: %s -> %s", r.Port, r.Src, r.OrigDst) }

var tlsCert = sync.OnceValue(func() tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
})

func startZtunnel(t testing.TB, ns *netns.NS, inMesh func(netip.Addr) bool) *ztunnel {
	t.Helper()
	z, err := newZtunnel(ns, inMesh)
	if err != nil {
		t.Fatal(err)
	}
	return z
}

func newZtunnel(ns *netns.NS, inMesh func(netip.Addr) bool) (*ztunnel, error) {
	z := &ztunnel{ns: ns, inMesh: inMesh}
	lc := &net.ListenConfig{Control: ztunnelSocket}
	for _, port := range []int{15001, 15006, 15008} {
		ln, err := ns.Listen(context.Background(), lc, "tcp4", fmt.Sprintf(":%d", port))
		if err != nil {
			z.Close()
			return nil, err
		}
		if port == 15008 {
			ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{tlsCert()}})
		}
		z.lns = append(z.lns, ln)
		go z.serve(ln, port)
	}
	return z, nil
}

func (z *ztunnel) Close() {
	for _, ln := range z.lns {
		ln.Close()
	}
}

func (z *ztunnel) records() []record {
	z.mu.Lock()
	defer z.mu.Unlock()
	return append([]record(nil), z.seen...)
}

func (z *ztunnel) serve(ln net.Listener, port int) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		r := record{Port: port, Src: c.RemoteAddr().(*net.TCPAddr).AddrPort(), OrigDst: c.LocalAddr().(*net.TCPAddr).AddrPort()}
		r.Src = netip.AddrPortFrom(r.Src.Addr().Unmap(), r.Src.Port())
		r.OrigDst = netip.AddrPortFrom(r.OrigDst.Addr().Unmap(), r.OrigDst.Port())
		z.mu.Lock()
		z.seen = append(z.seen, r)
		z.mu.Unlock()
		go z.handle(c, r)
	}
}

func (z *ztunnel) handle(c net.Conn, r record) {
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var up net.Conn
	var err error
	switch r.Port {
	case 15001: // outbound: tunnel to the destination pod's 15008
		if !z.inMesh(r.OrigDst.Addr()) { // passthrough, from the node
			up, err = z.ns.Dial(ctx, nil, "tcp4", r.OrigDst.String())
			break
		}
		d := &tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}}
		err = z.ns.Do(func() (err error) {
			up, err = d.DialContext(ctx, "tcp4", netip.AddrPortFrom(r.OrigDst.Addr(), 15008).String())
			return err
		})
		if err == nil {
			_, err = fmt.Fprintf(up, "%s %s\n", r.OrigDst, r.Src)
		}
	case 15008: // HBONE-ish: read the target, deliver from the client's address
		br := bufio.NewReader(c)
		var line string
		if line, err = br.ReadString('\n'); err != nil {
			return
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return
		}
		c = &bufConn{Conn: c, r: br}
		up, err = z.deliver(ctx, netip.MustParseAddrPort(f[1]).Addr(), f[0])
	case 15006: // inbound plaintext: deliver from the client's address
		up, err = z.deliver(ctx, r.Src.Addr(), r.OrigDst.String())
	}
	if err != nil {
		return
	}
	defer up.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(up, c)
		closeWrite(up)
		close(done)
	}()
	io.Copy(c, up)
	closeWrite(c)
	<-done
}

func (z *ztunnel) deliver(ctx context.Context, src netip.Addr, dst string) (net.Conn, error) {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Control: ztunnelSocket}
	return z.ns.Dial(ctx, d, "tcp4", dst)
}

// ztunnelSocket makes a socket of ztunnel's: IP_TRANSPARENT, and the bypass
// mark that lets its packets (deliveries, accepted connections) reach pods.
func ztunnelSocket(network, address string, c syscall.RawConn) error {
	if err := Transparent(network, address, c); err != nil {
		return err
	}
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, DefaultBypassMark)
	}); err != nil {
		return err
	}
	return serr
}

// probeCgroup is the cgroup v2 directory the tests' stand-in for kubelet
// runs its probes in (made by the test that needs it).
func probeCgroup() string {
	return filepath.Join(cgroup2Mount(), fmt.Sprintf("ambit-bpft%d-kubelet", os.Getpid()))
}

// cgroup2Mount is where the cgroup v2 hierarchy is mounted ("" if nowhere).
func cgroup2Mount() string {
	b, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "cgroup2" {
			return f[1]
		}
	}
	return ""
}

type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func closeWrite(c net.Conn) {
	switch c := c.(type) {
	case interface{ CloseWrite() error }:
		c.CloseWrite()
	case *bufConn:
		closeWrite(c.Conn)
	}
}
