package model

import "testing"

func TestWorkloadIdentityCached(t *testing.T) {
	for _, w := range []*Workload{
		{Namespace: "shop", ServiceAccount: "client"},
		{Namespace: "shop"},
		{Namespace: "shop", ServiceAccount: "client", TrustDomain: "example.org"},
		{Namespace: "shop", ServiceAccount: "client", TrustDomain: "Not A Domain"},
		{Namespace: "bad/ns", ServiceAccount: "client"},
	} {
		want := w.buildIdentity()
		for range 2 { // built, then from the cache
			if got := w.Identity(); got != want {
				t.Errorf("%+v: Identity() = %v, want %v", w, got, want)
			}
		}
	}
	a := (&Workload{Namespace: "shop", ServiceAccount: "a"}).Identity()
	b := (&Workload{Namespace: "shop", ServiceAccount: "b"}).Identity()
	if a == b || a.String() != "spiffe://cluster.local/ns/shop/sa/a" {
		t.Errorf("identities %v, %v", a, b)
	}
}
