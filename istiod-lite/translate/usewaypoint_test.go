package translate

import (
	"testing"

	"github.com/ambit-mesh/ambit/model"
)

// TestUseWaypointPrecedence: an object's own istio.io/use-waypoint label
// beats its namespace's; "none" on the object opts out of the namespace's
// waypoint; istio.io/use-waypoint-namespace names the waypoint's namespace,
// read from the same object as the name.
func TestUseWaypointPrecedence(t *testing.T) {
	const uw, uwns = model.LabelUseWaypoint, LabelUseWaypointNamespace
	for _, c := range []struct {
		name         string
		obj, ns      map[string]string
		want, wantNS string
		wantExplicit bool
	}{
		{name: "no labels", obj: nil, ns: nil},
		{name: "namespace only", ns: map[string]string{uw: "ns-wp"}, want: "ns-wp", wantNS: "shop"},
		{name: "object beats namespace", obj: map[string]string{uw: "own"}, ns: map[string]string{uw: "ns-wp"}, want: "own", wantNS: "shop", wantExplicit: true},
		{name: "none opts out of the namespace's", obj: map[string]string{uw: "none"}, ns: map[string]string{uw: "ns-wp"}},
		{name: "empty value opts out too", obj: map[string]string{uw: ""}, ns: map[string]string{uw: "ns-wp"}},
		{name: "namespace none binds nothing", ns: map[string]string{uw: "none"}},
		{name: "object's waypoint namespace", obj: map[string]string{uw: "own", uwns: "infra"}, ns: map[string]string{uw: "ns-wp", uwns: "other"}, want: "own", wantNS: "infra", wantExplicit: true},
		{name: "namespace's waypoint namespace", ns: map[string]string{uw: "ns-wp", uwns: "infra"}, want: "ns-wp", wantNS: "infra"},
		{name: "object's waypoint namespace label alone binds nothing", obj: map[string]string{uwns: "infra"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			name, ns, explicit := useWaypoint(c.obj, "shop", c.ns)
			if name != c.want || ns != c.wantNS || explicit != c.wantExplicit {
				t.Errorf("useWaypoint = (%q, %q, %v), want (%q, %q, %v)", name, ns, explicit, c.want, c.wantNS, c.wantExplicit)
			}
		})
	}
}
