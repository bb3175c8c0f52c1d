package model

import (
	"net/netip"
	"testing"
)

func TestStoreApplyIsCopyOnWrite(t *testing.T) {
	var st Store
	changed := st.Changed()
	a := &Workload{UID: "c/Pod/ns/a", Name: "a", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}
	svc := &Service{Name: "s", Namespace: "ns", Hostname: "s.ns.svc.cluster.local", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.1")}}
	st.Replace(NewSnapshot([]*Workload{a}, []*Service{svc}, nil, nil))
	<-changed
	before := st.Load()

	b := &Workload{UID: "c/Pod/ns/b", Name: "b", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.2")}}
	st.Apply(&Delta{Workloads: []*Workload{b}, RemovedWorkloads: []string{a.UID}})
	<-changed
	after := st.Load()

	if before.WorkloadByIP(netip.MustParseAddr("10.0.0.1")) != a || before.WorkloadByIP(netip.MustParseAddr("10.0.0.2")) != nil {
		t.Fatal("the old snapshot changed")
	}
	if after.WorkloadByIP(netip.MustParseAddr("10.0.0.1")) != nil || after.WorkloadByIP(netip.MustParseAddr("10.0.0.2")) != b {
		t.Fatal("the delta was not applied")
	}
	if after.ServiceByVIP(netip.MustParseAddr("::ffff:10.96.0.1")) != svc {
		t.Fatal("service lookup by (v4-mapped) VIP failed")
	}
	if got := a.Identity().String(); got != "spiffe://cluster.local/ns/ns/sa/default" {
		t.Fatalf("identity %s", got)
	}
}

func TestApplyPatchesIndexes(t *testing.T) {
	ip := netip.MustParseAddr
	a := &Workload{UID: "a", Addresses: []netip.Addr{ip("10.0.0.1")}}
	b := &Workload{UID: "b", Addresses: []netip.Addr{ip("10.0.0.2")}}
	s := NewSnapshot([]*Workload{a, b}, nil, nil, nil)
	a2 := &Workload{UID: "a", Addresses: []netip.Addr{ip("10.0.0.3")}}
	n := s.Apply(&Delta{Workloads: []*Workload{a2}, RemovedWorkloads: []string{"b"}})
	if n.WorkloadByIP(ip("10.0.0.1")) != nil || n.WorkloadByIP(ip("10.0.0.2")) != nil || n.WorkloadByIP(ip("10.0.0.3")) != a2 {
		t.Fatal("index not patched")
	}
	if s.WorkloadByIP(ip("10.0.0.1")) != a || s.WorkloadByIP(ip("10.0.0.2")) != b {
		t.Fatal("old snapshot changed")
	}
	r := &HTTPRoute{Name: "r", Namespace: "ns"}
	if n2 := n.Apply(&Delta{HTTPRoutes: []*HTTPRoute{r}}); n2.HTTPRoutes["ns/r"] != r || n2.WorkloadByIP(ip("10.0.0.3")) != a2 {
		t.Fatal("routes")
	}
}

func TestSince(t *testing.T) {
	var st Store
	a := &Workload{UID: "a"}
	st.Replace(NewSnapshot([]*Workload{a}, nil, nil, nil))
	_, v := st.LoadVersion()
	d1 := &Delta{Workloads: []*Workload{{UID: "b"}}}
	d2 := &Delta{RemovedWorkloads: []string{"a"}}
	st.Apply(d1)
	st.Apply(&Delta{}) // empty: not a version
	st.Apply(d2)
	ds, cur, v2, ok := st.Since(v)
	if !ok || len(ds) != 2 || ds[0] != d1 || ds[1] != d2 || v2 != v+2 || cur.Workloads["a"] != nil || cur.Workloads["b"] == nil {
		t.Fatalf("Since: ok=%v %d deltas, version %d->%d", ok, len(ds), v, v2)
	}
	if ds, _, _, ok := st.Since(v2); !ok || len(ds) != 0 {
		t.Fatal("Since(current) should be ok and empty")
	}
	st.Replace(cur)
	if _, _, _, ok := st.Since(v2); ok {
		t.Fatal("Since across a Replace should not be ok")
	}
}
