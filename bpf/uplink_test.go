package bpf

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// TestPodProgramsNeverTakeTheUplink reproduces the capture of the node's
// uplink: the model still lists a pod whose veth is gone (a CNI DEL during a
// rolling update), its address now routes through the uplink (the node's
// default route), and the next Reconcile must skip and report it instead of
// attaching the pod programs to the uplink, which would drop the node's own
// TCP with other nodes.
func TestPodProgramsNeverTakeTheUplink(t *testing.T) {
	e := newEnv(t, "a1")
	ctx := context.Background()
	n1, n2 := e.topo.Node("n1"), e.topo.Node("n2")
	a1 := e.pod("a1")
	c := e.cap["n1"]

	// A real node has a default route through its uplink.
	if err := n1.NS.IP("route add default via " + n2.IP.String() + " dev " + netns.Uplink); err != nil {
		t.Fatal(err)
	}
	// Node-to-node TCP: n2 listens on its own address.
	ln, err := n2.NS.Listen(ctx, nil, "tcp4", net.JoinHostPort(n2.IP.String(), "9999"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(conn, "node n2\n")
			conn.Close()
		}
	}()
	nodeTCP := func() error {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		conn, err := n1.NS.Dial(ctx, nil, "tcp4", ln.Addr().String())
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		b, err := io.ReadAll(conn)
		if err != nil || string(b) != "node n2\n" {
			return errors.New("read " + string(b) + ": " + errString(err))
		}
		return nil
	}
	if err := nodeTCP(); err != nil {
		t.Fatalf("node TCP before: %v", err)
	}

	a7, err := n1.AddPod("a7")
	if err != nil {
		t.Fatal(err)
	}
	desired := []Pod{{Name: "a1", IPs: []netip.Addr{a1.IP}}, {Name: "a7", IPs: []netip.Addr{a7.IP}}}
	if err := c.Reconcile(ctx, desired); err != nil {
		t.Fatal(err)
	}
	if err := n1.RemovePod(a7); err != nil { // CNI DEL: veth and route gone
		t.Fatal(err)
	}
	if out, _ := n1.NS.Command(ctx, "ip", "route", "get", a7.IP.String()).CombinedOutput(); !strings.Contains(string(out), "dev "+netns.Uplink) {
		t.Fatalf("the test needs a7's address to route through the uplink: %s", out)
	}

	err = c.Reconcile(ctx, desired)
	if !errors.Is(err, ErrNoPodVeth) || !strings.Contains(err.Error(), "a7") {
		t.Errorf("Reconcile with a7's veth gone: %v, want an error naming a7 and wrapping ErrNoPodVeth", err)
	}
	if why := c.Skipped()["a7"]; !strings.Contains(why, netns.Uplink) {
		t.Errorf("Skipped reports a7 as %q, want the reason naming %s (all: %v)", why, netns.Uplink, c.Skipped())
	}
	err = c.AddPod(ctx, Pod{Name: "a7", IPs: []netip.Addr{a7.IP}})
	if !errors.Is(err, ErrNoPodVeth) {
		t.Errorf("AddPod with a7's veth gone: %v, want ErrNoPodVeth", err)
	}
	assertOnlyUplinkProgram(t, n1)
	if err := nodeTCP(); err != nil {
		t.Errorf("node TCP between nodes after the reconcile: %v", err)
	}
	pods, err := c.Pods()
	if err != nil || len(pods) != 1 || pods[a1.IP] != a1.HostIfname {
		t.Errorf("n1 captures %v (%v), want a1 only", pods, err)
	}
	if _, err := e.talk("a1", "b2", "still captured"); err != nil || last(e.zt["n1"].records()).Src.Addr() != a1.IP {
		t.Errorf("a1 -> b2: %v, ztunnel n1's last connection %v, want a1's", err, last(e.zt["n1"].records()))
	}

	t.Run("devices that are not a pod's veth are refused", func(t *testing.T) {
		if err := n1.NS.IP("link add brx type bridge\nlink set brx up\nroute add 10.1.0.240/32 dev brx scope link"); err != nil {
			t.Fatal(err)
		}
		for _, p := range []Pod{
			{Name: "on-uplink", IPs: []netip.Addr{a1.IP}, HostIfname: netns.Uplink},
			{Name: "on-lo", IPs: []netip.Addr{n1.IP}},
			{Name: "on-bridge", IPs: []netip.Addr{netip.MustParseAddr("10.1.0.240")}},
			{Name: "no-address", HostIfname: a1.HostIfname},
		} {
			if err := c.AddPod(ctx, p); !errors.Is(err, ErrNoPodVeth) {
				t.Errorf("AddPod(%+v): %v, want ErrNoPodVeth", p, err)
			}
		}
		assertOnlyUplinkProgram(t, n1)
		if err := nodeTCP(); err != nil {
			t.Errorf("node TCP: %v", err)
		}
	})

	t.Run("a captured pod whose route is gone stays captured", func(t *testing.T) {
		// Fail closed: its veth still exists, so the pod may still send.
		a8, err := n1.AddPod("a8")
		if err != nil {
			t.Fatal(err)
		}
		defer n1.RemovePod(a8)
		desired := append(desired, Pod{Name: "a8", IPs: []netip.Addr{a8.IP}})
		if err := c.Reconcile(ctx, desired[:1]); err != nil { // a7 gone from the model
			t.Fatal(err)
		}
		if len(c.Skipped()) != 0 {
			t.Errorf("Skipped after a7 left the model: %v", c.Skipped())
		}
		if err := c.Reconcile(ctx, []Pod{desired[0], desired[2]}); err != nil {
			t.Fatal(err)
		}
		if err := n1.NS.IP("route del " + a8.IP.String() + "/32 dev " + a8.HostIfname); err != nil {
			t.Fatal(err)
		}
		err = c.Reconcile(ctx, []Pod{desired[0], desired[2]})
		if !errors.Is(err, ErrNoPodVeth) || c.Skipped()["a8"] == "" {
			t.Errorf("Reconcile with a8's route gone: %v (skipped %v), want a8 reported", err, c.Skipped())
		}
		pods, err := c.Pods()
		if err != nil || pods[a8.IP] != a8.HostIfname {
			t.Errorf("n1 captures %v (%v), want a8 still on %s", pods, err, a8.HostIfname)
		}
	})
}

// assertOnlyUplinkProgram checks that n's uplink has only the uplink program:
// one TCX ingress program, no egress one.
func assertOnlyUplinkProgram(t *testing.T, n *netns.Node) {
	t.Helper()
	err := n.NS.Do(func() error {
		ifi, err := net.InterfaceByName(netns.Uplink)
		if err != nil {
			return err
		}
		for at, want := range map[ebpf.AttachType]int{ebpf.AttachTCXIngress: 1, ebpf.AttachTCXEgress: 0} {
			q, err := link.QueryPrograms(link.QueryOptions{Target: ifi.Index, Attach: at})
			if err != nil {
				return err
			}
			if len(q.Programs) != want {
				t.Errorf("%s has %d %s programs, want %d (pod programs on the uplink?)", netns.Uplink, len(q.Programs), at, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}
