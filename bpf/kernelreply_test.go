package bpf

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// setSysctl writes a per-namespace sysctl of ns (a path under /proc/sys).
func setSysctl(t testing.TB, ns *netns.NS, path, value string) {
	t.Helper()
	if err := ns.Do(func() error { return os.WriteFile(path, []byte(value), 0o644) }); err != nil {
		t.Fatalf("%s in %s: %v", path, ns.Name, err)
	}
}

// TestSYNCookiesReachPods: under a SYN flood, or with an accept queue that
// overflows, the kernel answers a SYN with a SYN cookie: a SYN-ACK sent for
// no socket at all (neither the listener nor a request socket owns it), so
// capture cannot see whose it is, and the ACK that completes the handshake
// finds no socket but the listener. ztunnel's listeners answer pods that way
// under a connection storm; losing either packet stalls each new connection
// for a second or more (SYN retransmits) and, with enough of them, fails it.
// tcp_syncookies=2 makes every SYN-ACK of the nodes a cookie, so each
// connection below depends on them: outbound from an enrolled pod (15001),
// HBONE between the nodes (15008), and a host process's connection to an
// enrolled pod (inbound capture, 15006).
func TestSYNCookiesReachPods(t *testing.T) {
	e := newEnv(t, "a1", "b1")
	for _, n := range e.topo.Nodes {
		setSysctl(t, n.NS, "/proc/sys/net/ipv4/tcp_syncookies", "2")
	}
	before := len(e.zt["n1"].records())
	for i := range 3 {
		want := "b1 from " + e.pod("a1").IP.String() + ":"
		if got, err := e.talk("a1", "b1", "hello"); err != nil || !strings.HasPrefix(got, want) {
			t.Fatalf("connection %d from enrolled a1 with SYN cookies on the nodes: %q, %v", i, got, err)
		}
	}
	if n := len(e.zt["n1"].records()) - before; n != 3 {
		t.Errorf("ztunnel n1 took %d connections, want the 3 of a1", n)
	}

	n2 := e.topo.Node("n2")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := n2.NS.Dial(ctx, nil, "tcp4", net.JoinHostPort(e.pod("b1").IP.String(), echoPort))
	if err != nil {
		t.Fatalf("host process of n2 to enrolled b1 with SYN cookies: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(c, "host\n")
	got, err := bufio.NewReader(c).ReadString('\n')
	if want := "b1 from " + n2.IP.String() + ":"; err != nil || !strings.HasPrefix(got, want) {
		t.Fatalf("host process of n2 to enrolled b1 with SYN cookies: %q, %v", got, err)
	}
	if r := e.zt["n2"].records(); len(r) == 0 || r[len(r)-1].Port != 15006 {
		t.Errorf("the host connection did not go through inbound capture: %v", r)
	}
}

// TestTimeWaitAnswersReachPods: after ztunnel closes a delivery first, its
// socket becomes a time-wait socket, and the kernel answers the pod's late
// segments (a retransmitted FIN, an old ACK) from a control socket with the
// time-wait socket's mark: in the root cgroup, not ztunnel's. Those answers
// must reach the pod, or it retransmits its FIN until it gives up.
func TestTimeWaitAnswersReachPods(t *testing.T) {
	e := newEnv(t, "a1", "b1")
	a1, b1, n2 := e.pod("a1"), e.pod("b1"), e.topo.Node("n2")
	// a1 closes after the answer, so ztunnel n2 closes its delivery to b1
	// first (FIN after a1's), and b1's echo closes after it: the delivery
	// socket ends in TIME_WAIT in n2's namespace.
	got, err := e.talk("a1", "b1", "hello")
	want := "b1 from " + a1.IP.String() + ":"
	if err != nil || !strings.HasPrefix(got, want) {
		t.Fatalf("a1 -> b1: %q, %v", got, err)
	}
	port := strings.TrimSuffix(strings.SplitN(strings.TrimPrefix(got, want), ":", 2)[0], " ")
	delivery := netip.MustParseAddrPort(a1.IP.String() + ":" + port)
	local := netip.AddrPortFrom(b1.IP, 8080)
	deadline := time.Now().Add(5 * time.Second)
	for !inTimeWait(t, n2.NS, delivery, local) {
		if time.Now().After(deadline) {
			t.Fatalf("ztunnel n2's delivery socket %v -> %v never reached TIME_WAIT", delivery, local)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// From b1, a late ACK of that connection (out of window): the
	// time-wait socket answers it with an ACK.
	var fd int
	if err := b1.NS.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_TCP)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200_000})
	seg := tcpSegment(local, delivery, 0x10) // ACK
	to := &unix.SockaddrInet4{Addr: delivery.Addr().As4()}
	buf := make([]byte, 1500)
	answered := time.Now().Add(3 * time.Second)
	for time.Now().Before(answered) {
		if err := unix.Sendto(fd, seg, 0, to); err != nil {
			t.Fatal(err)
		}
		for {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				break // timeout: send again
			}
			ihl := int(buf[0]&0xf) * 4
			if n < ihl+20 || netip.AddrFrom4([4]byte(buf[12:16])) != delivery.Addr() {
				continue
			}
			th := buf[ihl:n]
			if binary.BigEndian.Uint16(th[0:2]) == delivery.Port() && binary.BigEndian.Uint16(th[2:4]) == local.Port() {
				t.Logf("b1 got the time-wait answer: flags %#x", th[13])
				return
			}
		}
	}
	t.Fatalf("no answer from ztunnel n2's time-wait socket %v reached b1", delivery)
}

// inTimeWait reports whether ns has a TIME_WAIT socket local -> remote.
func inTimeWait(t *testing.T, ns *netns.NS, local, remote netip.AddrPort) bool {
	var b []byte
	if err := ns.Do(func() (err error) {
		b, err = os.ReadFile("/proc/thread-self/net/tcp")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	hex := func(a netip.AddrPort) string {
		ip := a.Addr().As4()
		return fmt.Sprintf("%08X:%04X", binary.LittleEndian.Uint32(ip[:]), a.Port())
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[1] == hex(local) && f[2] == hex(remote) && f[3] == "06" {
			return true
		}
	}
	return false
}

// tcpSegment is a 20-byte TCP header from src to dst with flags and a
// valid checksum, for a raw IPPROTO_TCP socket.
func tcpSegment(src, dst netip.AddrPort, flags byte) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], src.Port())
	binary.BigEndian.PutUint16(h[2:], dst.Port())
	binary.BigEndian.PutUint32(h[4:], 0x1000)
	binary.BigEndian.PutUint32(h[8:], 0x2000)
	h[12] = 5 << 4
	h[13] = flags
	binary.BigEndian.PutUint16(h[14:], 1024)
	s, d := src.Addr().As4(), dst.Addr().As4()
	sum := uint32(unix.IPPROTO_TCP) + uint32(len(h))
	for _, b := range [][]byte{s[:], d[:], h} {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(h[16:], ^uint16(sum))
	return h
}
