package ztunnel

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/model"
)

// BenchmarkResolve is the per-connection cost of resolving an outbound
// connection to a Service VIP with 1000 endpoints (every other one ready),
// and to a pod IP.
//
//	go test -run '^$' -bench Resolve -benchmem ./ztunnel/
func BenchmarkResolve(b *testing.B) {
	var ws []*model.Workload
	svc := &model.Service{Name: "big", Namespace: "shop", Hostname: "big.shop.svc.cluster.local",
		VIPs: []netip.Addr{netip.MustParseAddr("10.96.1.1")}, Ports: []model.ServicePort{{Port: 80, TargetPort: 8080}}}
	for i := range 1000 {
		w := &model.Workload{UID: fmt.Sprintf("c/Pod/shop/big-%d", i), Name: fmt.Sprintf("big-%d", i), Namespace: "shop", ServiceAccount: "big",
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})}, Enrolled: true, Ready: i%2 == 0}
		ws = append(ws, w)
		svc.Endpoints = append(svc.Endpoints, model.Endpoint{WorkloadUID: w.UID})
	}
	client := &model.Workload{UID: "c/Pod/shop/client", Name: "client", Namespace: "shop", ServiceAccount: "client",
		Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Enrolled: true, Ready: true}
	ws = append(ws, client)
	snap := model.NewSnapshot(ws, []*model.Service{svc}, nil, nil)
	for _, tc := range []struct {
		name string
		dst  netip.AddrPort
	}{
		{"service-1000-endpoints", netip.MustParseAddrPort("10.96.1.1:80")},
		{"pod", netip.MustParseAddrPort("10.1.0.2:8080")},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r, err := Resolve(snap, client, tc.dst, nil)
				if err != nil || r.Kind != RouteHBONE {
					b.Fatal(r, err)
				}
			}
		})
	}
}
