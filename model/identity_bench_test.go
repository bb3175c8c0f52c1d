package model

import "testing"

// BenchmarkWorkloadIdentity is the cost of Workload.Identity, called
// several times per proxied connection (source principal, peers, waypoint
// checks).
//
//	go test -run '^$' -bench WorkloadIdentity -benchmem ./model/
func BenchmarkWorkloadIdentity(b *testing.B) {
	w := &Workload{Name: "client-7d9f", Namespace: "shop", ServiceAccount: "client", TrustDomain: "cluster.local"}
	b.ReportAllocs()
	for b.Loop() {
		if w.Identity().IsZero() {
			b.Fatal("zero identity")
		}
	}
}
