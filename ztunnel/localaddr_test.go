package ztunnel

import (
	"net"
	"net/netip"
	"testing"
	"time"
)

func TestIsLocalAddr(t *testing.T) {
	ifas, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, ia := range ifas {
		ip, _ := netip.AddrFromSlice(ia.(*net.IPNet).IP)
		if !isLocalAddr(ip.Unmap()) {
			t.Errorf("%v is an interface address, isLocalAddr says no", ip)
		}
	}
	if isLocalAddr(netip.MustParseAddr("192.0.2.1")) { // TEST-NET-1
		t.Error("isLocalAddr(192.0.2.1) = true")
	}

	// The list is refreshed once older than localAddrsTTL.
	var c addrCache
	t0 := time.Now()
	if !c.has(netip.MustParseAddr("127.0.0.1"), t0) {
		t.Fatal("127.0.0.1 not local")
	}
	c.addrs = nil // as if listed before 127.0.0.1 existed
	if c.has(netip.MustParseAddr("127.0.0.1"), t0.Add(localAddrsTTL/2)) {
		t.Error("list refreshed before its TTL")
	}
	if !c.has(netip.MustParseAddr("127.0.0.1"), t0.Add(localAddrsTTL)) {
		t.Error("list not refreshed after its TTL")
	}
}
