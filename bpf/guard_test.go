package bpf

import (
	"errors"
	"testing"

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
	if err := c2.Uninstall(); err != nil {
		t.Fatal(err)
	}
	delete(e.cap, "n1")
	if err := qdiscBypass(n1); err != nil {
		t.Errorf("after Uninstall: PACKET_QDISC_BYPASS in the node's namespace: %v, want it allowed", err)
	}
	if err := qdiscBypass(e.topo.Node("n2").NS); !errors.Is(err, unix.EPERM) {
		t.Errorf("n2 after n1's Uninstall: %v, want EPERM (its own guard)", err)
	}
}
