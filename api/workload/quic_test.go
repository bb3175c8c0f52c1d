package workload

import (
	"net/netip"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/model"
)

// TestQUICRoundTrip: the QUIC advertisement crosses the wire.
func TestQUICRoundTrip(t *testing.T) {
	for _, quic := range []bool{false, true} {
		w := &model.Workload{UID: "c/Pod/ns/p", Name: "p", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Enrolled: true, QUIC: quic}
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
		if got.QUIC != quic || p.GetHboneQuic() != quic {
			t.Errorf("QUIC %v: got model %v, proto %v", quic, got.QUIC, p.GetHboneQuic())
		}
	}
}
