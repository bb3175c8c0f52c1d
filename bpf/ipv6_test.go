package bpf

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
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

// TestIPv6ExtensionHeadersOfEnrolledPodsAreDropped reproduces the IPv6
// destination-options bypass: an enrolled pod and an attacker's sink on
// another node both put a destination-options header in front of TCP
// (IPV6_DSTOPTS, which the kernel's TCP honours), so the program, looking
// only at the first next-header value, let a whole plaintext session through.
// The extension-header chain must be walked: the enrolled pod's session does
// not reach the sink (an unenrolled pod's does: the control), and IPv6 UDP
// behind the same header still passes.
func TestIPv6ExtensionHeadersOfEnrolledPodsAreDropped(t *testing.T) {
	e := newEnv(t, "a1")
	a1, a2, b2 := e.pod("a1"), e.pod("a2"), e.pod("b2")
	addr6 := setupIPv6(t, e, a1, a2, b2)
	sink := startSink6(t, b2, netip.AddrPortFrom(addr6[b2], 9090))
	pc, err := e.topo.Node("n1").NS.StartCapture(netns.Uplink, filepath.Join(t.TempDir(), "v6.pcap"), "ip6") // "tcp" would miss TCP behind extension headers
	if err != nil {
		t.Fatal(err)
	}

	// Control: outside the mesh the session works.
	if got, err := talk6(a2, sink.addr, "control", true); err != nil || !strings.Contains(got, "control") {
		t.Fatalf("a2 -> sink with a destination-options header: %q %v; the test proves nothing", got, err)
	}
	// The attack.
	got, err := talk6(a1, sink.addr, "exfiltrated", true)
	if err == nil {
		t.Errorf("a1 -> sink with a destination-options header: a plaintext session (%q)", got)
	}
	// Plain IPv6 TCP stays dropped.
	if got, err := talk6(a1, sink.addr, "plain", false); err == nil {
		t.Errorf("a1 -> sink in plain IPv6 TCP: a plaintext session (%q)", got)
	}
	if from := sink.peers(); from[addr6[a1]] != 0 || from[addr6[a2]] != 1 {
		t.Errorf("sink accepted %v, want one connection from a2 (%s) and none from a1 (%s)", from, addr6[a2], addr6[a1])
	}
	if _, err := pc.Stop(); err != nil {
		t.Fatal(err)
	}
	from, err := ipv6Sources(pc.File)
	if err != nil {
		t.Fatal(err)
	}
	if from[addr6[a1]] != 0 {
		t.Errorf("%d of a1's IPv6 packets crossed the underlay", from[addr6[a1]])
	}
	if from[addr6[a2]] == 0 {
		t.Errorf("none of a2's IPv6 packets seen on the uplink (%v): the capture proves nothing", from)
	}

	t.Run("IPv6 UDP behind extension headers passes", func(t *testing.T) {
		got, err := udp6(a1, netip.AddrPortFrom(addr6[b2], 9091))
		if err != nil || got != "udp ok" {
			t.Errorf("a1 -> b2 UDP with a destination-options header: %q %v", got, err)
		}
	})
}

// setupIPv6 gives the pods and their nodes IPv6 addresses and routes
// (static neighbours, like the IPv4 topology): pod fd00:<node>::<n>/128,
// gateway fe80::1 (the host veth's MAC), nodes fd00:ff::<node>/64 on the
// underlay. It returns the pods' addresses.
func setupIPv6(t *testing.T, e *env, pods ...*netns.Pod) map[*netns.Pod]netip.Addr {
	t.Helper()
	mac := func(ns *netns.NS, ifname string) string {
		var hw net.HardwareAddr
		if err := ns.Do(func() error {
			ifi, err := net.InterfaceByName(ifname)
			if err == nil {
				hw = ifi.HardwareAddr
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return hw.String()
	}
	nodeIP := func(n *netns.Node) string { return fmt.Sprintf("fd00:ff::%d", n.Index+1) }
	for _, n := range e.topo.Nodes {
		if err := n.NS.Sysctl("net.ipv6.conf.all.forwarding", "1"); err != nil {
			t.Fatal(err)
		}
		script := []string{fmt.Sprintf("addr add %s/64 dev %s nodad", nodeIP(n), netns.Uplink)}
		for _, o := range e.topo.Nodes {
			if o != n {
				script = append(script,
					fmt.Sprintf("neigh add %s lladdr %s dev %s nud permanent", nodeIP(o), mac(o.NS, netns.Uplink), netns.Uplink),
					fmt.Sprintf("route add fd00:%d::/64 via %s dev %s", o.Index+1, nodeIP(o), netns.Uplink))
			}
		}
		if err := n.NS.IP(strings.Join(script, "\n")); err != nil {
			t.Fatal(err)
		}
	}
	out := map[*netns.Pod]netip.Addr{}
	for _, p := range pods {
		a := netip.MustParseAddr(fmt.Sprintf("fd00:%d::%d", p.Node.Index+1, p.IP.As4()[3]))
		out[p] = a
		if err := p.NS.IP(fmt.Sprintf("addr add %s/128 dev %s nodad\nneigh add fe80::1 lladdr %s dev %s nud permanent\nroute add default via fe80::1 dev %s",
			a, netns.PodIfname, netns.HostVethMAC, netns.PodIfname, netns.PodIfname)); err != nil {
			t.Fatal(err)
		}
		if err := p.Node.NS.IP(fmt.Sprintf("route add %s/128 dev %s\nneigh add %s lladdr %s dev %s nud permanent",
			a, p.HostIfname, a, mac(p.NS, netns.PodIfname), p.HostIfname)); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// dstOpts sets a destination-options header (8 bytes: PadN) on every packet
// the socket sends, as the sticky IPV6_DSTOPTS option (needs CAP_NET_RAW).
func dstOpts(_, _ string, rc syscall.RawConn) error {
	hdr := []byte{0, 0, 1, 4, 0, 0, 0, 0} // next header (set by the kernel), length 0, PadN of 4
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), unix.IPPROTO_IPV6, unix.IPV6_DSTOPTS, string(hdr))
	})
	return errors.Join(err, serr)
}

// sink6 is an attacker's TCP server that answers with a
// destination-options header too, and counts its peers.
type sink6 struct {
	addr netip.AddrPort
	mu   sync.Mutex // guards from
	from map[netip.Addr]int
}

func (s *sink6) peers() map[netip.Addr]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[netip.Addr]int{}
	for k, v := range s.from {
		out[k] = v
	}
	return out
}

func startSink6(t *testing.T, p *netns.Pod, addr netip.AddrPort) *sink6 {
	t.Helper()
	s := &sink6{addr: addr, from: map[netip.Addr]int{}}
	ln, err := p.NS.Listen(context.Background(), &net.ListenConfig{Control: dstOpts}, "tcp6", addr.String())
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
			s.mu.Lock()
			s.from[c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()]++
			s.mu.Unlock()
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				io.WriteString(c, "sink got: "+line)
			}()
		}
	}()
	var uc net.PacketConn
	err = p.NS.Do(func() (err error) {
		uc, err = (&net.ListenConfig{Control: dstOpts}).ListenPacket(context.Background(), "udp6", netip.AddrPortFrom(addr.Addr(), addr.Port()+1).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := uc.ReadFrom(buf)
			if err != nil {
				return
			}
			if string(buf[:n]) == "udp?" {
				uc.WriteTo([]byte("udp ok"), from)
			}
		}
	}()
	return s
}

// talk6 sends a line from p to addr over IPv6 TCP, with a
// destination-options header when opts, and returns the answer. A dropped SYN
// makes it time out after 1.5 s.
func talk6(p *netns.Pod, addr netip.AddrPort, line string, opts bool) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	d := &net.Dialer{}
	if opts {
		d.Control = dstOpts
	}
	c, err := p.NS.Dial(ctx, d, "tcp6", addr.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(got), err
}

// udp6 sends "udp?" from p to addr with a destination-options header and
// returns the answer.
func udp6(p *netns.Pod, addr netip.AddrPort) (string, error) {
	var got string
	err := p.NS.Do(func() error {
		c, err := (&net.ListenConfig{Control: dstOpts}).ListenPacket(context.Background(), "udp6", "[::]:0")
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.WriteTo([]byte("udp?"), net.UDPAddrFromAddrPort(addr)); err != nil {
			return err
		}
		buf := make([]byte, 64)
		n, _, err := c.ReadFrom(buf)
		got = string(buf[:n])
		return err
	})
	return got, err
}

// ipv6Sources counts the IPv6 packets of an Ethernet pcap file by source.
func ipv6Sources(path string) (map[netip.Addr]int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) < 24 || binary.LittleEndian.Uint32(b) != 0xa1b2c3d4 {
		return nil, fmt.Errorf("%s: not a little-endian pcap file", path)
	}
	out := map[netip.Addr]int{}
	for off := 24; off+16 <= len(b); {
		n := int(binary.LittleEndian.Uint32(b[off+8:]))
		off += 16
		if off+n > len(b) {
			break
		}
		f := b[off : off+n]
		off += n
		if len(f) >= 14+40 && binary.BigEndian.Uint16(f[12:]) == unix.ETH_P_IPV6 {
			out[netip.AddrFrom16([16]byte(f[14+8:14+24]))]++
		}
	}
	return out, nil
}
