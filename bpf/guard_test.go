package bpf

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// qdiscBypass opens a packet socket in ns and turns PACKET_QDISC_BYPASS on:
// the way to send frames on a veth past its TCX egress hook.
func qdiscBypass(ns *netns.NS) error {
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1)
	})
}

// xskTXRing creates an AF_XDP socket in ns and sizes its TX ring: an
// AF_XDP socket sends nothing without it (and its UMEM).
func xskTXRing(ns *netns.NS) error {
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_XDP, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.SetsockoptInt(fd, unix.SOL_XDP, unix.XDP_TX_RING, 64)
	})
}

// TestGuard checks the setsockopt guard: in a node's namespace, a packet
// socket cannot turn on PACKET_QDISC_BYPASS and an AF_XDP socket cannot set
// up its TX ring; a pod's own namespace and the node after Uninstall are
// left alone, and a reload (a new ztunnel) keeps the node guarded.
func TestGuard(t *testing.T) {
	e := newEnv(t, "a1")
	c := e.cap["n1"]
	if err := c.Guard(); err != nil {
		t.Fatalf("guard off: %v", err)
	}
	n1 := e.topo.Node("n1").NS
	a2 := e.pod("a2")
	if st, err := c.Status(); err != nil || !strings.HasPrefix(st.Guard, "on") || st.Pods[e.pod("a1").IP.String()] != e.pod("a1").HostIfname {
		t.Errorf("Status() = %+v, %v; want the guard on and a1 captured on its veth", st, err)
	}

	if err := qdiscBypass(n1); !errors.Is(err, unix.EPERM) {
		t.Errorf("PACKET_QDISC_BYPASS in the node's namespace: %v, want EPERM", err)
	}
	if err := qdiscBypass(a2.NS); err != nil {
		t.Errorf("PACKET_QDISC_BYPASS in a pod's namespace: %v, want it allowed", err)
	}
	if err := xskTXRing(n1); !errors.Is(err, unix.EPERM) {
		t.Errorf("AF_XDP TX ring in the node's namespace: %v, want EPERM", err)
	}
	if err := xskTXRing(a2.NS); err != nil {
		t.Errorf("AF_XDP TX ring in a pod's namespace: %v, want it allowed", err)
	}
	// A ztunnel restarting (a new Load) keeps the node guarded.
	c2, err := Load(e.opts["n1"])
	if err != nil {
		t.Fatal(err)
	}
	if err := c2.SetupNode(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	e.cap["n1"] = c2
	if err := qdiscBypass(n1); !errors.Is(err, unix.EPERM) {
		t.Errorf("after a reload: PACKET_QDISC_BYPASS in the node's namespace: %v, want EPERM", err)
	}
	if pins, _ := filepath.Glob(filepath.Join(e.opts["n1"].PinPath, linksDir, guardLink+"*")); len(pins) != 1 {
		t.Errorf("guard pins after a reload: %v, want one (the old one released)", pins)
	}
	if err := c2.Uninstall(); err != nil {
		t.Fatal(err)
	}
	delete(e.cap, "n1")
	if err := c2.Guard(); err == nil {
		t.Error("Guard() after Uninstall: nil, want why it is off")
	}
	if err := qdiscBypass(n1); err != nil {
		t.Errorf("after Uninstall: PACKET_QDISC_BYPASS in the node's namespace: %v, want it allowed", err)
	}
	if err := qdiscBypass(e.topo.Node("n2").NS); !errors.Is(err, unix.EPERM) {
		t.Errorf("n2 after n1's Uninstall: %v, want EPERM (its own guard)", err)
	}
}

// TestGuardClosesQdiscBypass shows the hole the guard closes: from the
// node's namespace, a SYN sent on an enrolled pod's veth with
// PACKET_QDISC_BYPASS skips pod_egress and the pod answers it (a plaintext
// handshake past inbound capture); the same SYN sent without the bypass
// goes through pod_egress to the ztunnel stand-in and the pod never
// answers; with the guard in force the bypass cannot be turned on.
func TestGuardClosesQdiscBypass(t *testing.T) {
	e := newEnv(t, "a1")
	c := e.cap["n1"]
	n1 := e.topo.Node("n1")
	a1 := e.pod("a1")
	var podMAC net.HardwareAddr
	if err := a1.NS.Do(func() error {
		ifi, err := net.InterfaceByName(netns.PodIfname)
		podMAC = ifi.HardwareAddr
		return err
	}); err != nil {
		t.Fatal(err)
	}
	hostMAC, _ := net.ParseMAC(netns.HostVethMAC)

	// synAcked sends one SYN from the node to a1:8080 on a1's veth and
	// reports whether a1 answered with a SYN-ACK.
	synAcked := func(bypass bool, sport uint16) (bool, error) {
		var acked bool
		err := n1.NS.Do(func() error {
			ifi, err := net.InterfaceByName(a1.HostIfname)
			if err != nil {
				return err
			}
			// ETH_P_ALL: such a socket sees what arrives before TCX
			// ingress (pod_ingress drops the pod's answer to an unknown
			// connection).
			fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
				return err
			}
			if bypass {
				if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1); err != nil {
					return err
				}
			}
			frame := make([]byte, 14, 14+40)
			copy(frame[0:6], podMAC)
			copy(frame[6:12], hostMAC)
			binary.BigEndian.PutUint16(frame[12:], unix.ETH_P_IP)
			frame = append(frame, ipv4TCP(n1.IP, a1.IP, sport, 8080, 0x02 /* SYN */, nil)...)
			if err := unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6, Addr: [8]byte(append(podMAC[:6:6], 0, 0))}); err != nil {
				return err
			}
			tv := unix.NsecToTimeval((500 * time.Millisecond).Nanoseconds())
			if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
				return err
			}
			buf := make([]byte, 2048)
			for {
				n, _, err := unix.Recvfrom(fd, buf, 0)
				if err != nil {
					return nil // timed out: no answer
				}
				if isSynAck(buf[:n], a1.IP, 8080, sport) {
					acked = true
					return nil
				}
			}
		})
		return acked, err
	}

	if acked, err := synAcked(false, 40001); err != nil || acked {
		t.Fatalf("SYN through pod_egress: answered by the pod %v (%v), want inbound capture", acked, err)
	}
	if _, err := synAcked(true, 40002); !errors.Is(err, unix.EPERM) {
		t.Fatalf("SYN with PACKET_QDISC_BYPASS, guard in force: %v, want EPERM", err)
	}
	// Without the guard, the hole.
	c.mu.Lock()
	err := c.detach(guardLink)
	c.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if acked, err := synAcked(true, 40003); err != nil || !acked {
		t.Fatalf("SYN with PACKET_QDISC_BYPASS, no guard: answered by the pod %v (%v); the test no longer shows the hole", acked, err)
	}
}

// isSynAck reports whether frame is a TCP SYN-ACK from src:sport to dport.
func isSynAck(frame []byte, src netip.Addr, sport, dport uint16) bool {
	if len(frame) < 14+20+20 || binary.BigEndian.Uint16(frame[12:]) != unix.ETH_P_IP {
		return false
	}
	ip := frame[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[9] != unix.IPPROTO_TCP || len(ip) < ihl+20 || netip.AddrFrom4([4]byte(ip[12:16])) != src {
		return false
	}
	tcp := ip[ihl:]
	return binary.BigEndian.Uint16(tcp[0:]) == sport && binary.BigEndian.Uint16(tcp[2:]) == dport && tcp[13]&0x12 == 0x12
}
