package bpf

import (
	"encoding/binary"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// TestTCPFragmentsOfEnrolledPodsAreDropped: the program cannot capture a TCP
// segment it cannot inspect, so an enrolled pod's TCP fragments (here a
// later fragment of a crafted datagram, sent with a raw socket: no TCP header
// to match a connection by) are dropped instead of being routed out in
// plaintext; a pod outside the mesh sends the same and it crosses the
// underlay.
func TestTCPFragmentsOfEnrolledPodsAreDropped(t *testing.T) {
	e := newEnv(t, "a1")
	a1, a2, b1 := e.pod("a1"), e.pod("a2"), e.pod("b1")
	pc, err := e.topo.Node("n2").NS.StartCapture(netns.Uplink, filepath.Join(t.TempDir(), "frag.pcap"), "tcp")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*netns.Pod{a1, a2} {
		if err := sendTCPFragment(p, b1.IP); err != nil {
			t.Fatalf("%s: %v", p.Name, err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	packets, err := pc.Stop()
	if err != nil {
		t.Fatal(err)
	}
	from := map[netip.Addr]int{}
	for _, p := range packets {
		from[p.Src.Addr()]++
	}
	if from[a1.IP] != 0 {
		t.Errorf("the enrolled pod's TCP fragment crossed the underlay (%d packets)", from[a1.IP])
	}
	if from[a2.IP] == 0 {
		t.Errorf("the unenrolled pod's fragment did not arrive either: the test proves nothing (%v)", from)
	}
}

// sendTCPFragment sends, from inside p, the second fragment (offset 8 bytes)
// of a TCP datagram to dst, carrying plaintext. Its first bytes are shaped
// like a TCP header only so that the test's pcap reader lists it.
func sendTCPFragment(p *netns.Pod, dst netip.Addr) error {
	tcp := make([]byte, 20+24)
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], 8080)
	tcp[12] = 5 << 4
	tcp[13] = 0x18 // PSH|ACK
	copy(tcp[20:], "fragment-payload-in-clr")
	ip := make([]byte, 20, 20+len(tcp))
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(tcp)))
	binary.BigEndian.PutUint16(ip[4:], 0x1234)
	binary.BigEndian.PutUint16(ip[6:], 0x0001) // offset 1 (x 8 bytes), last fragment
	ip[8], ip[9] = 64, unix.IPPROTO_TCP
	src, dst4 := p.IP.As4(), dst.As4()
	copy(ip[12:], src[:])
	copy(ip[16:], dst4[:])
	return p.NS.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, append(ip, tcp...), 0, &unix.SockaddrInet4{Addr: dst4})
	})
}

// TestCraftedTCPOfEnrolledPodsDoesNotLeave re-runs the attack's crafted raw
// TCP packets (odd flag combinations, IP options) from an enrolled pod: none
// crosses the underlay from the pod's address, while the same packets from
// a pod outside the mesh do (the control).
func TestCraftedTCPOfEnrolledPodsDoesNotLeave(t *testing.T) {
	e := newEnv(t, "a1")
	a1, a2, b2 := e.pod("a1"), e.pod("a2"), e.pod("b2")
	pc, err := e.topo.Node("n1").NS.StartCapture(netns.Uplink, filepath.Join(t.TempDir(), "crafted.pcap"), "tcp")
	if err != nil {
		t.Fatal(err)
	}
	const (
		fin, syn, rst, psh, ack, urg = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
	)
	flags := []byte{syn, syn | fin, syn | rst, syn | ack, syn | urg, fin, 0, fin | psh | urg, ack, psh | ack, rst, rst | ack, 0xff}
	// IP options: none, NOPs + end of list, a record-route option.
	options := [][]byte{nil, {1, 1, 1, 0}, {7, 7, 4, 0, 0, 0, 0, 0}}
	// The control's packets are not all forwarded on the first try on a busy
	// machine (the tail of a burst is sometimes lost before the uplink): each
	// round resends, from both pods, the packets the control has not yet got
	// across, so a1 is tried at least as often as a2 needed.
	type key struct{ oi, fi int }
	port := func(k key) uint16 { return uint16(42000 + k.oi*100 + k.fi) }
	todo := map[key]bool{}
	for oi := range options {
		for fi := range flags {
			todo[key{oi, fi}] = true
		}
	}
	want := len(todo)
	var n int
	for round := 0; round < 5 && len(todo) > 0; round++ {
		for k := range todo {
			for _, p := range []*netns.Pod{a1, a2} {
				pkt := withIPOptions(ipv4TCP(p.IP, b2.IP, port(k), 8080, flags[k.fi], []byte("crafted-plaintext")), options[k.oi])
				if err := sendRaw(p, b2.IP, pkt); err != nil {
					t.Fatalf("%s: %v", p.Name, err)
				}
				n++
			}
		}
		for deadline := time.Now().Add(3 * time.Second); len(todo) > 0 && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
			pkts, _ := netns.ReadPcap(pc.File)
			for _, p := range pkts {
				if p.Src.Addr() != a2.IP || p.Dst != netip.AddrPortFrom(b2.IP, 8080) {
					continue
				}
				for k := range todo {
					if port(k) == p.Src.Port() {
						delete(todo, k)
					}
				}
			}
		}
	}
	pkts, err := pc.Stop()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pkts {
		if p.Src.Addr() == a1.IP {
			t.Errorf("the enrolled pod's crafted packet crossed the underlay: %v", p)
		}
	}
	if len(todo) > 0 {
		t.Errorf("%d of the unenrolled pod's %d packets never crossed the uplink: the test proves nothing", len(todo), want)
	}
	t.Logf("sent %d crafted packets", n)
}

// withIPOptions inserts opts (a multiple of 4 bytes) after the IPv4 header
// of pkt, fixing its lengths and header checksum.
func withIPOptions(pkt, opts []byte) []byte {
	if len(opts) == 0 {
		return pkt
	}
	out := append(append(append([]byte{}, pkt[:20]...), opts...), pkt[20:]...)
	out[0] = 0x40 | byte((20+len(opts))/4)
	binary.BigEndian.PutUint16(out[2:], uint16(len(out)))
	out[10], out[11] = 0, 0
	binary.BigEndian.PutUint16(out[10:], checksum(out[:20+len(opts)]))
	return out
}

// sendRaw sends the IPv4 packet pkt from inside p with a raw socket.
func sendRaw(p *netns.Pod, dst netip.Addr, pkt []byte) error {
	return p.NS.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: dst.As4()})
	})
}
