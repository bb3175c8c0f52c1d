package deployer

import "testing"

// With SPIRESocketDir the waypoint takes its SVID from the node's SPIRE
// agent: IDENTITY=spire, the socket's path, the host directory mounted
// read-only; without it, none of that.
func TestWaypointSPIRE(t *testing.T) {
	cfg := New(Config{SPIRESocketDir: "/run/spire/sockets"}).cfg
	d := objects{cfg: &cfg, gw: gateway(mesh)}.deployment()
	spec := d.Spec.Template.Spec
	env := map[string]string{}
	for _, e := range spec.Containers[0].Env {
		if e.Value != nil {
			env[*e.Name] = *e.Value
		}
	}
	if env["IDENTITY"] != "spire" || env["SPIRE_SOCKET"] != "/run/spire/sockets/agent.sock" {
		t.Errorf("env %v", env)
	}
	var mounted, volume bool
	for _, m := range spec.Containers[0].VolumeMounts {
		mounted = mounted || (*m.Name == "spire-agent-socket" && *m.MountPath == "/run/spire/sockets" && *m.ReadOnly)
	}
	for _, v := range spec.Volumes {
		volume = volume || (*v.Name == "spire-agent-socket" && v.HostPath != nil && *v.HostPath.Path == "/run/spire/sockets")
	}
	if !mounted || !volume {
		t.Errorf("agent socket mounted %v, volume %v", mounted, volume)
	}

	plain := New(Config{}).cfg
	d = objects{cfg: &plain, gw: gateway(mesh)}.deployment()
	for _, e := range d.Spec.Template.Spec.Containers[0].Env {
		if *e.Name == "IDENTITY" || *e.Name == "SPIRE_SOCKET" {
			t.Errorf("CA mode waypoint has %s", *e.Name)
		}
	}
	for _, v := range d.Spec.Template.Spec.Volumes {
		if *v.Name == "spire-agent-socket" {
			t.Error("CA mode waypoint mounts the SPIRE socket")
		}
	}
}
