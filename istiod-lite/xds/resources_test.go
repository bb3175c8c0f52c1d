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

// TestDeltaResourcesMatchDiff: from the store's deltas or by comparing
// snapshots, a push carries the same resources.
func TestDeltaResourcesMatchDiff(t *testing.T) {
	var st model.Store
	st.Replace(meshSnapshot(t))
	before, v := st.LoadVersion()
	w := *before.Workloads["Kubernetes/Pod/demo/server-1"]
	w.Ready = !w.Ready
	st.Apply(&model.Delta{Workloads: []*model.Workload{&w}})
	st.Apply(&model.Delta{RemovedWorkloads: []string{"Kubernetes/Pod/demo/lost"}, RemovedPolicies: []string{"demo/deny-legacy"}})
	ds, cur, _, ok := st.Since(v)
	if !ok {
		t.Fatal("Since")
	}
	fromDeltas, err := MakeDeltaResources(ds, cur)
	if err != nil {
		t.Fatal(err)
	}
	fromDiff, err := MakeResources(before, cur)
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range workload.TypeURLs {
		a, b := fromDeltas.Set[typ], fromDiff.Set[typ]
		if len(a) != len(b) {
			t.Fatalf("%s: %d set from deltas, %d from the diff", typ, len(a), len(b))
		}
		for k := range b {
			if a[k] == nil || !bytes.Equal(a[k].Value, b[k].Value) {
				t.Fatalf("%s %s differs", typ, k)
			}
		}
		ra, rb := slices.Sorted(slices.Values(fromDeltas.Remove[typ])), slices.Sorted(slices.Values(fromDiff.Remove[typ]))
		if !slices.Equal(ra, rb) {
			t.Fatalf("%s: removed %v vs %v", typ, ra, rb)
		}
	}
	if fromDeltas.Count() != 3 {
		t.Fatalf("%d resources, want 3", fromDeltas.Count())
	}
}
