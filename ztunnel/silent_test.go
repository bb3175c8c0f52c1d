package ztunnel

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestSilentConnectionsReclaimed: through the mesh (SOCKS5 in on node 1,
// HBONE to node 2, delivery to the pod), a connection silent both ways is
// closed after IdleTimeout, and one whose client half-closed while the
// upstream stays silent after HalfCloseTimeout.
func TestSilentConnectionsReclaimed(t *testing.T) {
	const bound = 300 * time.Millisecond
	for _, halfClose := range []bool{false, true} {
		name := "idle"
		if halfClose {
			name = "half-closed"
		}
		t.Run(name, func(t *testing.T) {
			m := newTestMesh(t, func(c *Config) {
				if halfClose {
					c.HalfCloseTimeout = bound
				} else {
					c.IdleTimeout = bound
				}
			})
			ip := m.net.ip
			ln, err := net.Listen("tcp", netip.AddrPortFrom(ip(21), 7102).String())
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			hold := make(chan struct{})
			defer close(hold)
			go func() {
				c, err := ln.Accept()
				if err == nil {
					defer c.Close()
					io.Copy(io.Discard, c) // never answers
					<-hold
				}
			}()
			c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), netip.AddrPortFrom(ip(21), 7102).String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			waitFor(t, "connection established", func() bool { return m.n2.p.connCount() == 1 })
			start := time.Now()
			if halfClose {
				c.(*net.TCPConn).CloseWrite()
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadAll(c); err != nil {
				t.Fatalf("client: %v, want the connection closed", err)
			}
			if el := time.Since(start); el < bound/2 || el > bound+4*time.Second {
				t.Errorf("closed after %v, want about %v", el, bound)
			}
			waitFor(t, "connections reclaimed", func() bool { return m.n1.p.connCount() == 0 && m.n2.p.connCount() == 0 })
		})
	}
}
