package ambitctl

import (
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/bpf"
)

// TestPrintZtCapture: the capture table of a ztunnel that captures.
func TestPrintZtCapture(t *testing.T) {
	var b strings.Builder
	err := printZtCapture(&b, ztCapture{Enabled: true, Status: bpf.Status{
		PinPath: "/sys/fs/bpf/ambit",
		Pods:    map[string]string{"10.1.0.3": "pv1", "10.1.0.2": "pv0"},
		Skipped: map[string]string{"shop/gone": "no pod veth: veth gone"},
		Stats:   bpf.Stats{Outbound: 4, HBONE: 1, Dropped: 2},
		Guard:   "off: attach guard: the node's root cgroup is not in view",
	}})
	if err != nil {
		t.Fatal(err)
	}
	got := b.String()
	for _, want := range []string{"CAPTURE: on (pinned in /sys/fs/bpf/ambit)", "GUARD: off: attach guard: the node's root cgroup is not in view",
		"outbound 4, inbound 0, hbone 1", "dropped 2", "SKIPPED POD", "shop/gone"} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in:\n%s", want, got)
		}
	}
	if i, j := strings.Index(got, "10.1.0.2"), strings.Index(got, "10.1.0.3"); i < 0 || j < i {
		t.Errorf("captured addresses not listed in order:\n%s", got)
	}
}
