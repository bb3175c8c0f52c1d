package bpf

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// TestTaggedFramesOfEnrolledPodsAreDropped reproduces the double-tagged VLAN
// escape: a pod with CAP_NET_RAW sends, on a raw AF_PACKET socket,
// Ether/802.1Q(vlan 0)/802.1Q(vlan 0)/IPv4/TCP SYN with a spoofed source to a
// pod of another node (and the same with an 802.1ad outer tag, and with a
// single VLAN 0 tag). The kernel strips the outer tag before TCX and the inner
// one after it, then routes the inner packet: unless the pod veth's program
// drops tagged frames, the SYN crosses the underlay uncaptured. An enrolled
// pod's frames must not reach the uplink; an unenrolled pod's (the control)
// do, proving the frames are routable.
func TestTaggedFramesOfEnrolledPodsAreDropped(t *testing.T) {
	e := newEnv(t, "a1")
	a1, a2, b2 := e.pod("a1"), e.pod("a2"), e.pod("b2")
	before, _ := e.cap["n1"].Stats()
	pc, err := e.topo.Node("n1").NS.StartCapture(netns.Uplink, filepath.Join(t.TempDir(), "vlan.pcap"), "tcp")
	if err != nil {
		t.Fatal(err)
	}
	spoofed := netip.MustParseAddr("10.1.0.250") // no pod has it
	tags := []struct {
		name string
		tpid []uint16 // outermost first
	}{
		{"802.1Q/802.1Q", []uint16{unix.ETH_P_8021Q, unix.ETH_P_8021Q}},
		{"802.1ad/802.1Q", []uint16{unix.ETH_P_8021AD, unix.ETH_P_8021Q}},
		{"802.1Q", []uint16{unix.ETH_P_8021Q}},
	}
	// Each frame gets its own source port: pod index * 100 + tag index.
	port := func(pod, tag int) uint16 { return uint16(41000 + pod*100 + tag) }
	for pi, p := range []*netns.Pod{a1, a2} {
		for ti, tag := range tags {
			if err := sendTaggedSYN(p, tag.tpid, spoofed, port(pi, ti), b2.IP); err != nil {
				t.Fatalf("%s %s: %v", p.Name, tag.name, err)
			}
		}
	}
	// The control frames (a2's, sent last) arriving on the uplink say the
	// frames have been through the node.
	seen := map[uint16]bool{}
	deadline := time.Now().Add(5 * time.Second)
	for len(seen) < len(tags) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		pkts, _ := netns.ReadPcap(pc.File)
		for _, p := range pkts {
			if p.Src.Addr() == spoofed && p.Src.Port()/100 == 411 {
				seen[p.Src.Port()] = true
			}
		}
	}
	pkts, err := pc.Stop()
	if err != nil {
		t.Fatal(err)
	}
	crossed := map[uint16]bool{}
	for _, p := range pkts {
		if p.Src.Addr() == spoofed && p.Dst.Addr() == b2.IP {
			crossed[p.Src.Port()] = true
		}
	}
	for ti, tag := range tags {
		if crossed[port(0, ti)] {
			t.Errorf("enrolled pod's %s-tagged SYN with a spoofed source crossed the underlay", tag.name)
		}
		if !crossed[port(1, ti)] {
			t.Errorf("the unenrolled pod's %s-tagged SYN did not cross either: the test proves nothing (%v)", tag.name, crossed)
		}
	}
	after, _ := e.cap["n1"].Stats()
	if got := after.Dropped - before.Dropped; got < uint64(len(tags)) {
		t.Errorf("n1 dropped %d packets, want at least %d", got, len(tags))
	}
}

// sendTaggedSYN sends from inside p, on an AF_PACKET socket, an Ethernet
// frame with the VLAN 0 tags tpids (outermost first) around an IPv4 TCP SYN
// from src:sport to dst:8080, addressed to the pod's gateway MAC.
func sendTaggedSYN(p *netns.Pod, tpids []uint16, src netip.Addr, sport uint16, dst netip.Addr) error {
	ip := ipv4TCP(src, dst, sport, 8080, 0x02, nil)
	return p.NS.Do(func() error {
		ifi, err := net.InterfaceByName(netns.PodIfname)
		if err != nil {
			return err
		}
		gw, err := net.ParseMAC(netns.HostVethMAC)
		if err != nil {
			return err
		}
		frame := append(append([]byte{}, gw...), ifi.HardwareAddr...)
		for _, tpid := range tpids {
			frame = binary.BigEndian.AppendUint16(frame, tpid)
			frame = binary.BigEndian.AppendUint16(frame, 0) // PCP 0, VLAN 0
		}
		frame = binary.BigEndian.AppendUint16(frame, unix.ETH_P_IP)
		frame = append(frame, ip...)
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: ifi.Index, Protocol: htons(tpids[0]), Halen: 6}
		copy(sa.Addr[:], gw)
		if err := unix.Sendto(fd, frame, 0, sa); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		return nil
	})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// ipv4TCP builds an IPv4 packet carrying a TCP segment with flags and
// payload, checksums included.
func ipv4TCP(src, dst netip.Addr, sport, dport uint16, flags byte, payload []byte) []byte {
	tcp := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	binary.BigEndian.PutUint32(tcp[4:], 1000)
	tcp[12] = 5 << 4
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], 64240)
	tcp = append(tcp, payload...)
	s4, d4 := src.As4(), dst.As4()
	pseudo := append(append(append([]byte{}, s4[:]...), d4[:]...), 0, unix.IPPROTO_TCP, byte(len(tcp)>>8), byte(len(tcp)))
	binary.BigEndian.PutUint16(tcp[16:], checksum(append(pseudo, tcp...)))
	ip := make([]byte, 20, 20+len(tcp))
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(tcp)))
	ip[8], ip[9] = 64, unix.IPPROTO_TCP
	copy(ip[12:], s4[:])
	copy(ip[16:], d4[:])
	binary.BigEndian.PutUint16(ip[10:], checksum(ip))
	return append(ip, tcp...)
}

// checksum is the Internet checksum (RFC 1071) of b.
func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
