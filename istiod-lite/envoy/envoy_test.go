package envoy

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// translateFiles runs translate's decode and build on the given YAML files.
func translateFiles(t testing.TB, paths ...string) translate.Result {
	t.Helper()
	o := translate.NewObjects()
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		objs, _, err := translate.Decode(f)
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		for _, obj := range objs {
			o.Set(obj)
		}
	}
	return translate.Build(o, translate.Options{})
}

var shop = Waypoint{Namespace: "shop", Name: "waypoint"}

// check validates every resource and the snapshot's consistency.
func check(t testing.TB, r *Resources) {
	t.Helper()
	byType := map[string][]types.Resource{}
	add := func(typ string, m interface {
		proto.Message
		ValidateAll() error
	}) {
		if err := m.ValidateAll(); err != nil {
			t.Errorf("invalid %s %s: %v", typ, cache.GetResourceName(m), err)
		}
		byType[typ] = append(byType[typ], m)
	}
	for _, x := range r.Listeners {
		add(resource.ListenerType, x)
	}
	for _, x := range r.Routes {
		add(resource.RouteType, x)
	}
	for _, x := range r.Clusters {
		add(resource.ClusterType, x)
	}
	for _, x := range r.Endpoints {
		add(resource.EndpointType, x)
	}
	s, err := cache.NewSnapshot("1", byType)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Consistent(); err != nil {
		t.Errorf("inconsistent: %v", err)
	}
}

// render is the golden form: each resource as protojson, re-indented with
// encoding/json (protojson's own spacing is deliberately unstable), and the
// translation's problems.
func render(t *testing.T, r *Resources, problems []translate.Problem) []byte {
	t.Helper()
	conv := func(m proto.Message) any {
		b, err := protojson.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var v any
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	g := struct {
		Listeners []any    `json:"listeners"`
		Routes    []any    `json:"routes"`
		Clusters  []any    `json:"clusters"`
		Endpoints []any    `json:"endpoints"`
		Problems  []string `json:"problems"`
	}{}
	for _, x := range r.Listeners {
		g.Listeners = append(g.Listeners, conv(x))
	}
	for _, x := range r.Routes {
		g.Routes = append(g.Routes, conv(x))
	}
	for _, x := range r.Clusters {
		g.Clusters = append(g.Clusters, conv(x))
	}
	for _, x := range r.Endpoints {
		g.Endpoints = append(g.Endpoints, conv(x))
	}
	for _, p := range problems {
		g.Problems = append(g.Problems, p.String())
	}
	slices.Sort(g.Problems)
	b, err := json.MarshalIndent(g, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return append(b, '\n')
}

// TestGolden translates each testdata/<case>.yaml (with _base.yaml) through
// translate and ForWaypoint and compares with testdata/<case>.golden.json.
func TestGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/[^_]*.yaml")
	if len(files) < 9 {
		t.Fatalf("only %d golden cases", len(files))
	}
	for _, in := range files {
		t.Run(strings.TrimSuffix(filepath.Base(in), ".yaml"), func(t *testing.T) {
			tr := translateFiles(t, "testdata/_base.yaml", in)
			r, err := ForWaypoint(tr.Snapshot, shop)
			if err != nil {
				t.Fatal(err)
			}
			check(t, r)
			got := render(t, r, tr.Problems)
			again, err := ForWaypoint(tr.Snapshot, shop)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, render(t, again, tr.Problems)) {
				t.Error("two builds of one snapshot differ")
			}
			out := strings.TrimSuffix(in, ".yaml") + ".golden.json"
			if *update {
				if err := os.WriteFile(out, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(out)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the golden file (run with -update and review the diff):\n%s", in, got)
			}
		})
	}
}

func routesOf(t *testing.T, r *Resources, name string) []*route.Route {
	t.Helper()
	for _, rc := range r.Routes {
		if rc.GetName() == name {
			return rc.GetVirtualHosts()[0].GetRoutes()
		}
	}
	t.Fatalf("no route config %s", name)
	return nil
}

const reviewsChain = "inbound-vip|9080|http|reviews.shop.svc.cluster.local"

// TestDefaultRoute: with no route attached, requests go to the service
// itself with Istio's default retries and no timeout.
func TestDefaultRoute(t *testing.T) {
	tr := translateFiles(t, "testdata/_base.yaml")
	r, err := ForWaypoint(tr.Snapshot, shop)
	if err != nil {
		t.Fatal(err)
	}
	rs := routesOf(t, r, reviewsChain)
	if len(rs) != 1 {
		t.Fatalf("%d routes, want 1", len(rs))
	}
	a := rs[0].GetRoute()
	if a.GetCluster() != "outbound|9080||reviews.shop.svc.cluster.local" {
		t.Errorf("cluster %q", a.GetCluster())
	}
	rp := a.GetRetryPolicy()
	if rp.GetNumRetries().GetValue() != 2 || rp.GetRetryOn() != "connect-failure,refused-stream,unavailable,cancelled" {
		t.Errorf("retry policy %v", rp)
	}
	if a.GetTimeout() == nil || a.GetTimeout().AsDuration() != 0 {
		t.Errorf("timeout %v, want an explicit 0 (Envoy's default is 15 s)", a.GetTimeout())
	}
	// The chain of the unnamed port is TCP.
	var names []string
	for _, c := range r.Listeners[0].GetFilterChains() {
		names = append(names, c.GetName())
	}
	if !slices.Contains(names, "inbound-vip|5432|tcp|ratings.shop.svc.cluster.local") {
		t.Errorf("chains %v lack ratings' TCP port", names)
	}
}

// TestInvalidBackendShare: an invalid backendRef keeps its weight and
// names a cluster that does not exist, with 500 as the not-found code.
func TestInvalidBackendShare(t *testing.T) {
	tr := translateFiles(t, "testdata/_base.yaml", "testdata/invalid-backend.yaml")
	r, err := ForWaypoint(tr.Snapshot, shop)
	if err != nil {
		t.Fatal(err)
	}
	clusters := map[string]bool{}
	for _, c := range r.Clusters {
		clusters[c.GetName()] = true
	}
	var split *route.RouteAction
	for _, rt := range routesOf(t, r, reviewsChain) {
		if rt.GetMatch().GetPathSeparatedPrefix() == "/split" {
			split = rt.GetRoute()
		}
	}
	if split == nil {
		t.Fatal("no /split route")
	}
	if split.GetClusterNotFoundResponseCode() != route.RouteAction_INTERNAL_SERVER_ERROR {
		t.Error("cluster_not_found_response_code is not 500")
	}
	var total, bad uint32
	for _, w := range split.GetWeightedClusters().GetClusters() {
		total += w.GetWeight().GetValue()
		if !clusters[w.GetName()] {
			bad += w.GetWeight().GetValue()
		}
	}
	if total != 100 || bad != 50 {
		t.Errorf("weights: total %d, to undefined clusters %d; want 100 and 50", total, bad)
	}
	// Status: the route is accepted with ResolvedRefs False.
	rt := tr.Snapshot.HTTPRoutes["shop/reviews-broken"]
	if rt == nil || !rt.Parents[0].Accepted() {
		t.Fatalf("route not accepted: %+v", rt)
	}
	var resolved *model.Condition
	for i, c := range rt.Parents[0].Conditions {
		if c.Type == model.ConditionResolvedRefs {
			resolved = &rt.Parents[0].Conditions[i]
		}
	}
	if resolved == nil || resolved.Status || resolved.Reason != model.ReasonBackendNotFound {
		t.Errorf("ResolvedRefs %+v, want False BackendNotFound", resolved)
	}
	if wp := tr.Snapshot.HTTPRoutes["shop/wrong-port"]; wp == nil || wp.Parents[0].Accepted() {
		t.Errorf("a route on a port the service lacks is accepted: %+v", wp)
	}
}

// TestPrecedence checks the order of the precedence case's routes.
func TestPrecedence(t *testing.T) {
	tr := translateFiles(t, "testdata/_base.yaml", "testdata/precedence.yaml")
	r, err := ForWaypoint(tr.Snapshot, shop)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, rt := range routesOf(t, r, reviewsChain) {
		m := rt.GetMatch()
		s := m.GetPath() + m.GetPathSeparatedPrefix() + m.GetSafeRegex().GetRegex()
		for _, h := range m.GetHeaders() {
			s += " " + h.GetName()
		}
		s += fmt.Sprintf(" q%d ->%s", len(m.GetQueryParameters()), rt.GetRoute().GetCluster())
		got = append(got, s)
	}
	want := []string{
		"/health q0 ->outbound|9080||reviews-v2.shop.svc.cluster.local",
		"/api/v1 :method q0 ->outbound|9080||reviews-v2.shop.svc.cluster.local",
		"/api x-user q0 ->outbound|9080||reviews-v1.shop.svc.cluster.local",
		"/api q0 ->outbound|9080||reviews-v1.shop.svc.cluster.local", // older route wins the tie
		"/api q0 ->outbound|9080||reviews-v2.shop.svc.cluster.local",
		"/items/[0-9]+ q2 ->outbound|9080||reviews-v2.shop.svc.cluster.local",
	}
	if !slices.Equal(got, want) {
		t.Errorf("order:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestOtherWaypoint: a waypoint gets only the services bound to it.
func TestOtherWaypoint(t *testing.T) {
	tr := translateFiles(t, "testdata/_base.yaml")
	r, err := ForWaypoint(tr.Snapshot, Waypoint{Namespace: "shop", Name: "other"})
	if err != nil {
		t.Fatal(err)
	}
	check(t, r)
	if len(r.Listeners[0].GetFilterChains())+len(r.Routes)+len(r.Clusters)+len(r.Endpoints) != 0 {
		t.Errorf("resources for an unbound waypoint: %d chains, %d clusters", len(r.Listeners[0].GetFilterChains()), len(r.Clusters))
	}
}
