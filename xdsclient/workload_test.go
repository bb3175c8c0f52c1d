package xdsclient

import (
	"net/netip"
	"strings"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/model"
)

func workloadResource(t *testing.T, name string, w *model.Workload) *discovery.Resource {
	t.Helper()
	a, err := anypb.New(workload.FromWorkload(w))
	if err != nil {
		t.Fatal(err)
	}
	return &discovery.Resource{Name: name, Version: "v-" + name, Resource: a}
}

// The ztunnel's types apply each response to the store as one delta, or
// nothing of it (a resource whose name is not its key refuses the whole
// response), and the versions held are those applied.
func TestWorkloadTypesApplyToStore(t *testing.T) {
	store := &model.Store{}
	c := &Client{Addr: "unused:1", Store: store}
	if err := c.setup(); err != nil {
		t.Fatal(err)
	}
	w := func(uid string, ip string) *model.Workload {
		return &model.Workload{UID: uid, Name: uid, Namespace: "demo", Addresses: []netip.Addr{netip.MustParseAddr(ip)}}
	}
	err := c.apply(&discovery.DeltaDiscoveryResponse{TypeUrl: workload.WorkloadType, Resources: []*discovery.Resource{
		workloadResource(t, "a", w("a", "10.0.0.1")), workloadResource(t, "b", w("b", "10.0.0.2")),
	}})
	if err != nil {
		t.Fatal(err)
	}
	if s := store.Load(); len(s.Workloads) != 2 || s.Workloads["a"] == nil {
		t.Fatalf("store %v", s.Workloads)
	}
	err = c.apply(&discovery.DeltaDiscoveryResponse{TypeUrl: workload.WorkloadType, RemovedResources: []string{"a"},
		Resources: []*discovery.Resource{workloadResource(t, "c", w("c", "10.0.0.3")), workloadResource(t, "wrong", w("d", "10.0.0.4"))}})
	if err == nil || !strings.Contains(err.Error(), "resource wrong: name wrong != key d") {
		t.Fatalf("err %v", err)
	}
	if s := store.Load(); len(s.Workloads) != 2 || s.Workloads["a"] == nil || s.Workloads["c"] != nil {
		t.Fatalf("a refused response changed the store: %v", s.Workloads)
	}
	if err := c.apply(&discovery.DeltaDiscoveryResponse{TypeUrl: workload.WorkloadType, RemovedResources: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	if s := store.Load(); len(s.Workloads) != 1 || s.Workloads["b"] == nil {
		t.Fatalf("store %v", s.Workloads)
	}
	if v := c.versions[workload.WorkloadType]; len(v) != 1 || v["b"] != "v-b" {
		t.Fatalf("versions %v", v)
	}
	if c.allReceived() {
		t.Fatal("received with only workloads")
	}
	for _, typ := range workload.TypeURLs[1:] {
		if err := c.apply(&discovery.DeltaDiscoveryResponse{TypeUrl: typ}); err != nil {
			t.Fatal(err)
		}
	}
	if !c.allReceived() {
		t.Fatal("not received with every type")
	}
	a, _ := anypb.New(workload.FromService(&model.Service{Name: "s", Namespace: "demo", Hostname: "s.demo.svc.cluster.local"}))
	if err := c.apply(&discovery.DeltaDiscoveryResponse{TypeUrl: workload.WorkloadType, Resources: []*discovery.Resource{{Name: "s", Resource: a}}}); err == nil {
		t.Fatal("a service accepted in a workload response")
	}
	if err := c.apply(&discovery.DeltaDiscoveryResponse{TypeUrl: "type.googleapis.com/other"}); err == nil {
		t.Fatal("an unsubscribed type accepted")
	}
}
