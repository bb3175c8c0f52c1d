package workload

import (
	"os"
	"reflect"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/istiod-lite/translate"
)

// TestRoundTrip: every resource of the translation golden input survives
// model -> proto -> wire -> proto -> model unchanged.
func TestRoundTrip(t *testing.T) {
	f, err := os.Open("../../istiod-lite/translate/testdata/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	objs, _, err := translate.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	o := translate.NewObjects()
	for _, obj := range objs {
		o.Set(obj)
	}
	snap := translate.Build(o, translate.Options{}).Snapshot
	wire := func(m proto.Message, into proto.Message) {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if err := proto.Unmarshal(b, into); err != nil {
			t.Fatal(err)
		}
	}
	check := func(name string, got any, err error, want any) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: round trip\n got %+v\nwant %+v", name, got, want)
		}
	}
	for k, w := range snap.Workloads {
		var p Workload
		wire(FromWorkload(w), &p)
		got, err := ToWorkload(&p)
		check(k, got, err, w)
	}
	for k, s := range snap.Services {
		var p Service
		wire(FromService(s), &p)
		if ServiceName(&p) != s.Key() {
			t.Errorf("service name %s != %s", ServiceName(&p), s.Key())
		}
		got, err := ToService(&p)
		check(k, got, err, s)
	}
	for k, pol := range snap.Policies {
		var p Authorization
		wire(FromPolicy(pol), &p)
		got, err := ToPolicy(&p)
		check(k, got, err, pol)
	}
	for k, pa := range snap.PeerAuthn {
		var p PeerAuthentication
		wire(FromPeerAuthn(pa), &p)
		got, err := ToPeerAuthn(&p)
		check(k, got, err, pa)
	}
	if len(snap.Workloads) == 0 || len(snap.Policies) == 0 {
		t.Fatal("empty input")
	}
}

func TestMalformedAddressIsAnError(t *testing.T) {
	if _, err := ToWorkload(&Workload{Uid: "x", Addresses: [][]byte{{1, 2, 3}}}); err == nil {
		t.Fatal("3-byte address accepted")
	}
}
