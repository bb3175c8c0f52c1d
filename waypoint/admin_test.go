package waypoint

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
)

// TestConfigDumpEveryResource: /config_dump lists every resource of the
// active snapshot with its version, type and name, including a
// RouteConfiguration whose retry policy carries the previous_hosts
// predicate as istiod-lite sends it (an Any of a type this test does not
// link itself), and a resource that cannot be rendered is still listed.
func TestConfigDumpEveryResource(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, whoami("A"))
	cl := clusterName(svc)
	withPredicate := func(typeURL string) func(*routev3.RouteAction) {
		return func(a *routev3.RouteAction) {
			retries("5xx", 1, 0)(a)
			a.RetryPolicy.RetryHostPredicate[0].ConfigType = &routev3.RetryPolicy_RetryHostPredicate_TypedConfig{
				TypedConfig: &anypb.Any{TypeUrl: typeURL}}
		}
	}
	type entry struct {
		Version  string          `json:"version"`
		Type     string          `json:"type"`
		Name     string          `json:"name"`
		Resource json.RawMessage `json:"resource"`
		Error    string          `json:"error"`
	}
	check := func(predicate, version string, renderable bool) {
		t.Helper()
		rs := simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, withPredicate(predicate))}, map[string][]ep{cl: {{addr: b.addr}}})
		for i := range rs {
			rs[i].Version = fmt.Sprintf("%s-%d", version, i)
		}
		e.apply(rs...)
		var dump struct {
			Resources []entry `json:"resources"`
		}
		getJSON(t, e.admin+"/config_dump", &dump)
		if len(dump.Resources) != len(rs) {
			t.Fatalf("%s: config_dump lists %d resources, applied %d: %+v", version, len(dump.Resources), len(rs), dump.Resources)
		}
		byType := map[string]entry{}
		for i, d := range dump.Resources {
			if want := rs[i].Version; d.Version != want {
				t.Errorf("%s: resource %d (%s %q) version %q, want %q", version, i, d.Type, d.Name, d.Version, want)
			}
			byType[d.Type] = d
		}
		for _, typ := range []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
			if _, ok := byType[typ]; !ok {
				t.Errorf("%s: config_dump has no %s", version, typ)
			}
		}
		rc := byType[resource.RouteType]
		if rc.Name != chainName(80, svc) || rc.Version != version+"-1" {
			t.Fatalf("%s: route config %q version %q", version, rc.Name, rc.Version)
		}
		var a anypb.Any
		if err := protojson.Unmarshal(rc.Resource, &a); err != nil || a.GetTypeUrl() != resource.RouteType {
			t.Fatalf("%s: route config %s: unmarshal: %v", version, rc.Resource, err)
		}
		if renderable {
			var got routev3.RouteConfiguration
			if err := a.UnmarshalTo(&got); err != nil || got.GetName() != rc.Name || rc.Error != "" {
				t.Fatalf("%s: route config %s: %v (error %q)", version, rc.Resource, err, rc.Error)
			}
			return
		}
		if !strings.Contains(rc.Error, "example.NotLinked") || len(a.GetValue()) != 0 {
			t.Fatalf("%s: unrenderable route config: resource %s error %q", version, rc.Resource, rc.Error)
		}
	}
	check("type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate", "v1", true)
	check("type.googleapis.com/example.NotLinked", "v2", false)
}

// TestLinksEveryExtensionIstiodLiteEmits: the typed configs istiod-lite
// wraps in Any (filters, retry predicates, protocol options) must be linked
// into the waypoint itself, or /config_dump cannot render the resources that
// carry them. (This test binary links them all through kube_test.go's
// istiod-lite imports, hence the check on the package's own dependencies.)
func TestLinksEveryExtensionIstiodLiteEmits(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatal("no go command:", err)
	}
	list := func(args ...string) []string {
		out, err := exec.Command(gobin, append([]string{"list"}, args...)...).Output()
		if err != nil {
			t.Fatalf("go list %v: %v", args, err)
		}
		return strings.Fields(string(out))
	}
	deps := list("-deps", ".")
	var n int
	for _, p := range list("-f", `{{join .Imports "\n"}}`, "../istiod-lite/envoy") {
		if !strings.HasPrefix(p, "github.com/envoyproxy/go-control-plane/envoy/extensions/") {
			continue
		}
		n++
		if !slices.Contains(deps, p) {
			t.Errorf("istiod-lite emits types of %s, which the waypoint does not link", p)
		}
	}
	if n == 0 {
		t.Fatal("istiod-lite/envoy imports no extension package: the check is stale")
	}
}
