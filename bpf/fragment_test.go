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
