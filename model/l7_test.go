package model

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestWaypointIdentityAndRef(t *testing.T) {
	w := &Waypoint{Name: "wp", Namespace: "shop"}
	if got := w.Identity(spiffeid.TrustDomain{}).String(); got != "spiffe://cluster.local/ns/shop/sa/wp" {
		t.Errorf("identity %s", got)
	}
	if r := w.Ref(); r.Resolved() {
		t.Errorf("a waypoint without an address resolves: %+v", r)
	}
	w.Address = netip.MustParseAddr("10.96.0.50")
	if r := w.Ref(); !r.Resolved() || r.Address.String() != "10.96.0.50:15008" {
		t.Errorf("ref %+v", r)
	}
}

func TestDeltaL7(t *testing.T) {
	s := NewSnapshot(nil, nil, nil, nil)
	d := &Delta{DestinationRules: []*DestinationRule{{Name: "r", Namespace: "shop", Service: "shop/a.shop.svc.cluster.local"}},
		Waypoints: []*Waypoint{{Name: "wp", Namespace: "shop"}}}
	if d.Empty() || d.Len() != 2 {
		t.Fatalf("delta: empty %v, len %d", d.Empty(), d.Len())
	}
	n := s.Apply(d)
	if n.DestinationRules["shop/r"] == nil || n.Waypoints["shop/wp"] == nil || len(s.DestinationRules) != 0 {
		t.Fatalf("apply: %v %v (old %v)", n.DestinationRules, n.Waypoints, s.DestinationRules)
	}
	n2 := n.Apply(&Delta{RemovedDestinationRules: []string{"shop/r"}})
	if len(n2.DestinationRules) != 0 || n2.Waypoints["shop/wp"] == nil {
		t.Fatalf("removal: %v %v", n2.DestinationRules, n2.Waypoints)
	}
}
