package model

import "testing"

// TestWaypointBypassAllowed: "allow" on the pod or its namespace opts out;
// the pod's own label, whatever its value, beats its namespace's.
func TestWaypointBypassAllowed(t *testing.T) {
	allow := map[string]string{LabelWaypointBypass: WaypointBypassAllow}
	deny := map[string]string{LabelWaypointBypass: "deny"}
	for _, c := range []struct {
		ns, pod map[string]string
		want    bool
	}{
		{nil, nil, false},
		{allow, nil, true},
		{nil, allow, true},
		{allow, deny, false},
		{deny, allow, true},
		{map[string]string{LabelWaypointBypass: "Allow"}, nil, false}, // values are case-sensitive
	} {
		if got := WaypointBypassAllowed(c.ns, c.pod); got != c.want {
			t.Errorf("WaypointBypassAllowed(%v, %v) = %v, want %v", c.ns, c.pod, got, c.want)
		}
	}
}
