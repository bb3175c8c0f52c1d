package translate

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/model"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func load(t *testing.T, path string) *Objects {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	objs, _, err := Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	o := NewObjects()
	for _, obj := range objs {
		o.Set(obj)
	}
	return o
}

// golden is the translation, sorted, as JSON.
type golden struct {
	Workloads  []*model.Workload           `json:"workloads"`
	Services   []*model.Service            `json:"services"`
	Policies   []*model.Policy             `json:"policies"`
	PeerAuthn  []*model.PeerAuthentication `json:"peerAuthentications"`
	HTTPRoutes []*model.HTTPRoute          `json:"httpRoutes"`
	GRPCRoutes []*model.HTTPRoute          `json:"grpcRoutes,omitempty"`
	DestRules  []*model.DestinationRule    `json:"destinationRules,omitempty"`
	WPolicies  []*model.WaypointPolicy     `json:"waypointPolicies,omitempty"`
	Waypoints  []*model.Waypoint           `json:"waypoints,omitempty"`
	Problems   []string                    `json:"problems"`
}

func values[T any](m map[string]*T) []*T {
	out := make([]*T, 0, len(m))
	for _, k := range sortedKeys(m) {
		out = append(out, m[k])
	}
	return out
}

func render(t *testing.T, r Result) []byte {
	g := golden{
		Workloads: values(r.Snapshot.Workloads), Services: values(r.Snapshot.Services),
		Policies: values(r.Snapshot.Policies), PeerAuthn: values(r.Snapshot.PeerAuthn),
		HTTPRoutes: values(r.Snapshot.HTTPRoutes), GRPCRoutes: values(r.Snapshot.GRPCRoutes),
		DestRules: values(r.Snapshot.DestinationRules), WPolicies: values(r.Snapshot.WaypointPolicies),
		Waypoints: values(r.Snapshot.Waypoints),
	}
	for _, p := range r.Problems {
		g.Problems = append(g.Problems, p.String())
	}
	slices.Sort(g.Problems)
	b, err := json.MarshalIndent(g, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return append(b, '\n')
}

// TestGolden translates each testdata/*.yaml and compares with its .golden.json.
func TestGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.yaml")
	for _, in := range files {
		t.Run(filepath.Base(in), func(t *testing.T) {
			got := render(t, Build(load(t, in), Options{}))
			out := strings.TrimSuffix(in, ".yaml") + ".golden.json"
			if *update {
				if err := os.WriteFile(out, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(out)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("translation of %s differs from %s (run with -update and review the diff):\n%s", in, out, got)
			}
		})
	}
}

// TestUpdateMatchesBuild: the incremental path gives the same model as a full
// build, after each of a series of changes.
func TestUpdateMatchesBuild(t *testing.T) {
	o := load(t, "testdata/mesh.yaml")
	snap := Build(o, Options{}).Snapshot
	pod := func(k string) *corev1.Pod { return o.Pods[k].DeepCopy() }
	steps := []struct {
		name   string
		change func() Changes
	}{
		{"pod relabelled out of a service", func() Changes {
			p := pod("demo/server-1")
			p.Labels = map[string]string{"app": "other"}
			return o.Set(p)
		}},
		{"pod becomes ready", func() Changes {
			p := pod("demo/server-0")
			p.Status.Conditions = nil
			return o.Set(p)
		}},
		{"pod deleted", func() Changes { return o.Delete(&corev1.Pod{}, "demo/client-7d4b9c-abcde") }},
		{"new pod", func() Changes {
			return o.Set(&corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: "new", Namespace: "demo", Labels: map[string]string{"app": "server"}},
				Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.1.99"},
			})
		}},
		{"namespace unenrolled", func() Changes {
			n := o.Namespaces["demo"].DeepCopy()
			n.Labels = nil
			return o.Set(n)
		}},
		{"older service deleted: conflict resolves", func() Changes { return o.Delete(&corev1.Service{}, "demo/aaa-first") }},
		{"waypoint service deleted", func() Changes { return o.Delete(&corev1.Service{}, "shop/waypoint") }},
		{"backend appears", func() Changes {
			return o.Set(&corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: "ghost", Namespace: "shop"},
				Spec:       corev1.ServiceSpec{ClusterIP: "10.96.1.99", Ports: []corev1.ServicePort{{Port: 80}}},
			})
		}},
	}
	for _, s := range steps {
		ch := s.change()
		d, _ := Update(o, snap, ch, Options{})
		snap = snap.Apply(d)
		want := Build(o, Options{}).Snapshot
		for _, pair := range []struct{ got, want any }{
			{snap.Workloads, want.Workloads}, {snap.Services, want.Services}, {snap.Policies, want.Policies},
			{snap.PeerAuthn, want.PeerAuthn}, {snap.HTTPRoutes, want.HTTPRoutes},
		} {
			if !reflect.DeepEqual(pair.got, pair.want) {
				g, _ := json.MarshalIndent(pair.got, "", " ")
				w, _ := json.MarshalIndent(pair.want, "", " ")
				t.Fatalf("%s: incremental != full\nincremental: %s\nfull: %s", s.name, g, w)
			}
		}
	}
}

// TestUpdateL7MatchesBuild: the incremental path gives the same L7 model
// (routes and their status, GRPCRoutes, DestinationRules, waypoint
// policies) as a full build.
func TestUpdateL7MatchesBuild(t *testing.T) {
	o := load(t, "testdata/mesh.yaml")
	snap := Build(o, Options{}).Snapshot
	decode := func(doc string) any {
		objs, _, err := Decode(strings.NewReader(doc))
		if err != nil || len(objs) != 1 {
			t.Fatalf("decode: %v (%d objects)", err, len(objs))
		}
		return objs[0]
	}
	steps := []struct {
		name   string
		change func() Changes
	}{
		{"destination rule", func() Changes {
			return o.Set(decode(`{apiVersion: networking.istio.io/v1, kind: DestinationRule, metadata: {name: cart, namespace: shop},
  spec: {host: cart, trafficPolicy: {connectionPool: {tcp: {maxConnections: 3}}, portLevelSettings: [{port: {number: 80}, loadBalancer: {simple: RANDOM}}]}}}`))
		}},
		{"grpc route", func() Changes {
			return o.Set(decode(`{apiVersion: gateway.networking.k8s.io/v1, kind: GRPCRoute, metadata: {name: g, namespace: shop},
  spec: {parentRefs: [{group: "", kind: Service, name: cart}], rules: [{matches: [{method: {service: a.B, method: C}}], backendRefs: [{name: cart, port: 80}]}]}}`))
		}},
		{"waypoint policy", func() Changes {
			return o.Set(decode(`{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: wp, namespace: shop},
  spec: {targetRefs: [{kind: Service, group: "", name: cart}], rules: [{to: [{operation: {methods: [GET]}}]}]}}`))
		}},
		{"route parent loses its port", func() Changes {
			s := o.Services["shop/cart"].DeepCopy()
			s.Spec.Ports[0].Port = 81
			return o.Set(s)
		}},
		{"destination rule deleted", func() Changes {
			return o.Delete(decode(`{apiVersion: networking.istio.io/v1, kind: DestinationRule, metadata: {name: x}}`), "shop/cart")
		}},
		{"grpc route deleted", func() Changes { return o.Delete(&gwv1.GRPCRoute{}, "shop/g") }},
	}
	for _, s := range steps {
		ch := s.change()
		d, _ := Update(o, snap, ch, Options{})
		snap = snap.Apply(d)
		want := Build(o, Options{}).Snapshot
		for _, pair := range []struct{ got, want any }{
			{snap.HTTPRoutes, want.HTTPRoutes}, {snap.GRPCRoutes, want.GRPCRoutes}, {snap.DestinationRules, want.DestinationRules},
			{snap.WaypointPolicies, want.WaypointPolicies}, {snap.Waypoints, want.Waypoints}, {snap.Policies, want.Policies},
		} {
			if !reflect.DeepEqual(pair.got, pair.want) {
				g, _ := json.MarshalIndent(pair.got, "", " ")
				w, _ := json.MarshalIndent(pair.want, "", " ")
				t.Fatalf("%s: incremental != full\nincremental: %s\nfull: %s", s.name, g, w)
			}
		}
	}
	if len(snap.WaypointPolicies) != 1 || len(snap.GRPCRoutes) != 0 || len(snap.DestinationRules) != 0 {
		t.Errorf("end state: %d waypoint policies, %d grpc routes, %d destination rules", len(snap.WaypointPolicies), len(snap.GRPCRoutes), len(snap.DestinationRules))
	}
	if r := snap.HTTPRoutes["shop/cart-split"]; r == nil || r.Parents[0].Accepted() {
		t.Errorf("a route whose parent port is gone is still accepted: %+v", r)
	}
}

// TestWaypointPolicyStatus: a targetRefs policy says who enforces it, and
// when it is enforced more strictly than written or waits for its target.
func TestWaypointPolicyStatus(t *testing.T) {
	o := load(t, "testdata/mesh.yaml")
	for _, doc := range []string{
		`{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: ok, namespace: shop},
  spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], rules: [{to: [{operation: {methods: [GET]}}]}]}}`,
		`{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: strict, namespace: shop},
  spec: {targetRefs: [{kind: Service, group: "", name: cart}], rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]}}`,
		`{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: waiting, namespace: shop},
  spec: {targetRefs: [{kind: Service, group: "", name: nothere}], rules: [{}]}}`,
	} {
		objs, _, err := Decode(strings.NewReader(doc))
		if err != nil {
			t.Fatal(err)
		}
		o.Set(objs[0])
	}
	s := Build(o, Options{}).Snapshot
	for name, want := range map[string]model.Condition{
		"ok":      {Type: model.ConditionWaypointAccepted, Status: true, Reason: model.ReasonAccepted, Message: "enforced by waypoint shop/waypoint"},
		"strict":  {Type: model.ConditionWaypointAccepted, Status: false, Reason: model.ReasonUnsupportedValue},
		"waiting": {Type: model.ConditionWaypointAccepted, Status: false, Reason: model.ReasonTargetNotFound},
	} {
		p := s.WaypointPolicies["shop/"+name]
		if p == nil || len(p.Conditions) != 1 {
			t.Fatalf("%s: %+v", name, p)
		}
		got := p.Conditions[0]
		if want.Message == "" {
			got.Message = ""
		}
		if got != want {
			t.Errorf("%s: condition %+v, want %+v", name, p.Conditions[0], want)
		}
	}
	if p := s.WaypointPolicies["shop/strict"]; len(p.Rules) != 0 {
		t.Errorf("an ALLOW rule the waypoint cannot evaluate was kept: %+v", p.Rules)
	}
}

// TestCustomWaypointPolicyDenies: a CUSTOM (external authorization) policy,
// which ambit cannot call, denies what its rules match instead of being
// dropped (which would allow what it meant to gate); AUDIT is ignored.
func TestCustomWaypointPolicyDenies(t *testing.T) {
	o := load(t, "testdata/mesh.yaml")
	for _, doc := range []string{
		`{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: extauthz, namespace: shop},
  spec: {action: CUSTOM, provider: {name: opa}, targetRefs: [{kind: Service, group: "", name: cart}], rules: [{to: [{operation: {paths: ["/admin*"]}}]}]}}`,
		`{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: audit, namespace: shop},
  spec: {action: AUDIT, targetRefs: [{kind: Service, group: "", name: cart}], rules: [{}]}}`,
	} {
		objs, _, err := Decode(strings.NewReader(doc))
		if err != nil {
			t.Fatal(err)
		}
		o.Set(objs[0])
	}
	s := Build(o, Options{}).Snapshot
	p := s.WaypointPolicies["shop/extauthz"]
	if p == nil || p.Action != model.ActionDeny || len(p.Rules) != 1 || len(p.Rules[0].To) != 1 {
		t.Fatalf("CUSTOM policy: %+v, want a DENY of what its rule matches", p)
	}
	if p := s.WaypointPolicies["shop/audit"]; p != nil {
		t.Errorf("AUDIT policy kept: %+v", p)
	}
}
