package ztunnel

import (
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// TestUnknownDestinationWaitsPerSource: the node's slots for connections
// waiting for an unknown destination are shared per source: a pod that
// fills its share (maxUnknownWaitsPerSource) gets its next one reset at
// once, while another pod of the node still gets to wait. (Security review
// of issue 19, F6.)
func TestUnknownDestinationWaitsPerSource(t *testing.T) {
	const wait = 6 * time.Second // long enough that the first waits outlast the test's checks
	m := newTestMesh(t, nil)
	n1 := startNode(t, "node1", m.store, m.certs, func(c *Config) {
		c.PodCIDRs = []netip.Prefix{netip.PrefixFrom(m.net.ip(64), 26)} // .64 - .127
		c.UnknownDestinationWait = wait
	})
	ip := m.net.ip
	socks := n1.p.Addr(ListenerSOCKS5)
	dst := netip.AddrPortFrom(ip(71), 8080).String() // unknown to the config

	// The client pod (ip 11) fills its share.
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	dial := func(src netip.Addr) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if c, err := socksDial(socks, src, dst); err == nil {
				c.Close()
			}
		}()
	}
	for range maxUnknownWaitsPerSource {
		dial(ip(11))
	}
	waitFor(t, "the client's connections to wait", func() bool {
		return n1.p.unknownWaitsBySrc.waiting(ip(11)) == maxUnknownWaitsPerSource
	})

	// Its next one is reset at once.
	start := time.Now()
	c, err := socksDial(socks, ip(11), dst)
	if err == nil {
		c.Close()
		t.Fatal("connected to an unknown pod address")
	}
	var se *socksReplyError
	if !errors.As(err, &se) {
		t.Fatalf("dial: %v, want a SOCKS5 refusal", err)
	}
	if took := time.Since(start); took > wait/2 {
		t.Errorf("the client's connection past its share was refused after %v: it waited for a slot of its own", took)
	}

	// Another pod of the node (the intruder, ip 12) still waits.
	dial(ip(12))
	waitFor(t, "the other pod's connection to wait", func() bool {
		return n1.p.unknownWaitsBySrc.waiting(ip(12)) == 1
	})
	if n := n1.p.unknownWaitsBySrc.waiting(ip(11)); n != maxUnknownWaitsPerSource {
		t.Errorf("%d connections of the client wait, want its share, %d", n, maxUnknownWaitsPerSource)
	}
}
