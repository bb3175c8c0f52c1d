package ztunnel

import (
	"net/netip"
	"testing"
)

// BenchmarkIsLocalAddr is the check a transparent proxy makes for each
// plain connection's destination (and each connection to a listener's
// port): is it one of this host's addresses?
//
//	go test -run '^$' -bench IsLocalAddr -benchmem ./ztunnel/
func BenchmarkIsLocalAddr(b *testing.B) {
	local, remote := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("192.0.2.1")
	b.ReportAllocs()
	for b.Loop() {
		if !isLocalAddr(local) || isLocalAddr(remote) {
			b.Fatal("wrong answer")
		}
	}
}
