package workload

import (
	"net/netip"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/model"
)

// TestWaypointBypassRoundTrip: the no-bypass opt-out crosses the wire.
func TestWaypointBypassRoundTrip(t *testing.T) {
	for _, bypass := range []bool{false, true} {
		w := &model.Workload{UID: "c/Pod/ns/p", Name: "p", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Enrolled: true, WaypointBypass: bypass}
		b, err := proto.Marshal(FromWorkload(w))
		if err != nil {
			t.Fatal(err)
		}
		var p Workload
		if err := proto.Unmarshal(b, &p); err != nil {
			t.Fatal(err)
		}
		got, err := ToWorkload(&p)
		if err != nil {
			t.Fatal(err)
		}
		if got.WaypointBypass != bypass || p.GetWaypointBypass() != bypass {
			t.Errorf("WaypointBypass %v: got model %v, proto %v", bypass, got.WaypointBypass, p.GetWaypointBypass())
		}
	}
}
