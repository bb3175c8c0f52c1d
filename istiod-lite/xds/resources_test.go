package xds

import (
	"bytes"
	"flag"
	"os"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/model"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// TestMakeResourcesGolden: the xDS resources of the translation test model.
func TestMakeResourcesGolden(t *testing.T) {
	cur := meshSnapshot(t)
	r, err := MakeResources(model.NewSnapshot(nil, nil, nil, nil), cur)
	if err != nil {
		t.Fatal(err)
	}
	if err := Consistent(r, cur); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for _, typ := range workload.TypeURLs {
		names := make([]string, 0, len(r.Set[typ]))
		for n := range r.Set[typ] {
			names = append(names, n)
		}
		slices.Sort(names)
		for _, n := range names {
			m, err := r.Set[typ][n].UnmarshalNew()
			if err != nil {
				t.Fatal(err)
			}
			b, err := protojson.MarshalOptions{Multiline: true}.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			out.WriteString("# " + typ + " " + n + "\n")
			// protojson's spacing is deliberately unstable; normalize it.
			out.Write(bytes.ReplaceAll(b, []byte(":  "), []byte(": ")))
			out.WriteString("\n")
		}
	}
	const golden = "testdata/mesh.xds.golden"
	if *update {
		if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update)", err)
	}
	if !bytes.Equal(out.Bytes(), want) {
		t.Errorf("resources differ from %s (run with -update and review):\n%s", golden, out.String())
	}
}

func TestConsistentRejectsDanglingEndpoint(t *testing.T) {
	svc := &model.Service{Name: "s", Namespace: "ns", Hostname: "s.ns.svc.cluster.local", Endpoints: []model.Endpoint{{WorkloadUID: "ghost"}}}
	cur := model.NewSnapshot(nil, []*model.Service{svc}, nil, nil)
	r, err := MakeResources(model.NewSnapshot(nil, nil, nil, nil), cur)
	if err != nil {
		t.Fatal(err)
	}
	if Consistent(r, cur) == nil {
		t.Fatal("a service endpoint without its workload passed")
	}
}
