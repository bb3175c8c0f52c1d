package deployer

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/model"
)

// TestWaypointQUIC: a Gateway that asks for HBONE over QUIC (the label or
// annotation ambit.dev/hbone-quic=enabled, on it or in its infrastructure)
// gets a waypoint run with --hbone-quic, declaring UDP 15008, whose pods
// carry the label that makes them advertise QUIC; any other gets none of
// that, and pods labelled "disabled", so that a namespace's or node's label
// does not advertise a QUIC the waypoint does not serve.
func TestWaypointQUIC(t *testing.T) {
	cfg := New(Config{}).cfg
	for _, c := range []struct {
		name string
		edit func(*gwv1.Gateway)
		quic bool
	}{
		{"plain", func(*gwv1.Gateway) {}, false},
		{"label", func(gw *gwv1.Gateway) { gw.Labels = map[string]string{model.LabelHBONEQUIC: "enabled"} }, true},
		{"annotation", func(gw *gwv1.Gateway) { gw.Annotations = map[string]string{model.LabelHBONEQUIC: "enabled"} }, true},
		{"infrastructure label", func(gw *gwv1.Gateway) {
			gw.Spec.Infrastructure = &gwv1.GatewayInfrastructure{Labels: map[gwv1.LabelKey]gwv1.LabelValue{model.LabelHBONEQUIC: "enabled"}}
		}, true},
		{"label disabled", func(gw *gwv1.Gateway) { gw.Labels = map[string]string{model.LabelHBONEQUIC: "disabled"} }, false},
		{"infrastructure label disabled", func(gw *gwv1.Gateway) {
			gw.Spec.Infrastructure = &gwv1.GatewayInfrastructure{Labels: map[gwv1.LabelKey]gwv1.LabelValue{model.LabelHBONEQUIC: "disabled"}}
		}, false},
	} {
		gw := gateway(mesh)
		c.edit(gw)
		d := objects{cfg: &cfg, gw: gw}.deployment()
		ct := d.Spec.Template.Spec.Containers[0]
		wantLabel, wantArgs := "disabled", []string(nil)
		if c.quic {
			wantLabel, wantArgs = "enabled", []string{"--hbone-quic"}
		}
		if got := d.Spec.Template.Labels[model.LabelHBONEQUIC]; got != wantLabel {
			t.Errorf("%s: pod label %s=%q, want %q", c.name, model.LabelHBONEQUIC, got, wantLabel)
		}
		if !slices.Equal(ct.Args, wantArgs) {
			t.Errorf("%s: args %q, want %q", c.name, ct.Args, wantArgs)
		}
		if !slices.Equal(ct.Command, []string{defaultCommand}) {
			t.Errorf("%s: command %q", c.name, ct.Command)
		}
		var udp bool
		for _, p := range ct.Ports {
			udp = udp || (*p.Protocol == corev1.ProtocolUDP && *p.ContainerPort == MeshPort)
		}
		if udp != c.quic {
			t.Errorf("%s: UDP %d declared %v, want %v", c.name, MeshPort, udp, c.quic)
		}
		if sel := d.Spec.Selector.MatchLabels; len(sel) != 1 {
			t.Errorf("%s: selector %v: the QUIC label must not be in it (immutable)", c.name, sel)
		}
	}
}
