package ambitctl

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/bpf"
	"github.com/ambit-mesh/ambit/model"
)

// ztunnelSelector selects the ztunnel pods (manifests/ztunnel.yaml).
const ztunnelSelector = "app=ztunnel"

// The JSON of ztunnel's admin API (ztunnel/admin.go).
type (
	ztWorkload struct {
		model.Workload
		Identity string `json:"identity"`
		Local    bool   `json:"local"`
	}
	ztPolicies struct {
		AuthorizationPolicies []model.Policy             `json:"authorizationPolicies"`
		PeerAuthentications   []model.PeerAuthentication `json:"peerAuthentications"`
	}
	ztConn struct {
		ID            uint64 `json:"id"`
		Direction     string `json:"direction"`
		Via           string `json:"via"`
		Src           string `json:"src"`
		Dst           string `json:"dst"`
		Upstream      string `json:"upstream,omitempty"`
		Route         string `json:"route,omitempty"`
		SrcPrincipal  string `json:"srcPrincipal"`
		DstPrincipal  string `json:"dstPrincipal"`
		Service       string `json:"service,omitempty"`
		Established   bool   `json:"established"`
		BytesReceived int64  `json:"bytesReceived"`
		BytesSent     int64  `json:"bytesSent"`
		Age           string `json:"age"`
	}
	ztDump struct {
		Node         string          `json:"node"`
		Workloads    []ztWorkload    `json:"workloads"`
		Services     []model.Service `json:"services"`
		Policies     ztPolicies      `json:"policies"`
		Certificates []ztCert        `json:"certificates"`
		Connections  []ztConn        `json:"connections"`
	}
)

// ztunnelConfigTypes are ztunnel-config's arguments and their admin paths.
var ztunnelConfigTypes = map[string]string{
	"workloads":    "/debug/workloads",
	"services":     "/debug/services",
	"policies":     "/debug/policies",
	"certificates": "/debug/certificates",
	"connections":  "/debug/connections",
	"capture":      "/debug/capture",
	"all":          "/debug/config_dump",
}

type ztunnelConfigFlags struct {
	proxyTarget
	out outputFlag
}

func newZtunnelConfigCommand(g *globalFlags) *cobra.Command {
	f := &ztunnelConfigFlags{}
	cmd := &cobra.Command{
		Use:   "ztunnel-config workloads|services|policies|certificates|connections|capture|all [ZTUNNEL_POD]",
		Short: "Show what a ztunnel knows: workloads, services, policies, certificates, connections, capture",
		Long: `ztunnel-config reads a ztunnel's admin API (port 15000, localhost in its
pod): the workloads and services of its config, the authorization and peer
authentication policies, the certificates of its node's identities with their
expiry, its live connections with the bytes moved so far, and its eBPF
capture: the pods captured on their veths, the pods skipped and why, the
programs' counters, and whether the node's guard is on.

In a cluster it port-forwards through the API server to a ztunnel pod (the
one named, else the one on --node, else the first running one). With
--address it reads host:port directly (a host, or a local-mode mesh).`,
		Example: `  # the workloads the ztunnel on node worker-1 knows
  ambitctl ztunnel-config workloads --node worker-1

  # certificates and live connections of one ztunnel pod, as YAML
  ambitctl ztunnel-config certificates ztunnel-x7k2p -o yaml
  ambitctl ztunnel-config connections ztunnel-x7k2p

  # a ztunnel run on a host or in local mode
  ambitctl ztunnel-config all --address 127.0.0.1:15000`,
		Args:      cobra.RangeArgs(1, 2),
		ValidArgs: slices.Sorted(maps.Keys(ztunnelConfigTypes)),
		RunE: func(cmd *cobra.Command, args []string) error {
			pod := ""
			if len(args) == 2 {
				pod = args[1]
			}
			return runZtunnelConfig(cmd.Context(), cmd.OutOrStdout(), g, f, args[0], pod)
		},
	}
	f.register(cmd, "ztunnel's", "15000")
	cmd.Flags().StringVar(&f.node, "node", "", "read the ztunnel of this node")
	f.out.register(cmd)
	return cmd
}

// openZtunnel reaches the admin API the flags choose.
func (t *proxyTarget) openZtunnel(ctx context.Context, g *globalFlags, pod string) (*admin, error) {
	if t.address != "" {
		if pod != "" || t.node != "" {
			return nil, fmt.Errorf("--address reads one proxy directly: give no pod name and no --node with it")
		}
		return directAdmin(t.address)
	}
	c, err := g.cluster()
	if err != nil {
		return nil, err
	}
	p, err := c.pickPod(ctx, "ztunnel", controlPlaneNamespace, ztunnelSelector, pod, t.node)
	if err != nil {
		return nil, err
	}
	a, err := c.podAdmin(ctx, p, proxyAdminPort)
	if err != nil {
		return nil, err
	}
	a.what = "ztunnel " + a.what + " (node " + p.Spec.NodeName + ")"
	return a, nil
}

func runZtunnelConfig(ctx context.Context, out io.Writer, g *globalFlags, f *ztunnelConfigFlags, typ, pod string) error {
	path, ok := ztunnelConfigTypes[typ]
	if !ok {
		return fmt.Errorf("unknown config type %q: use one of %s", typ, strings.Join(slices.Sorted(maps.Keys(ztunnelConfigTypes)), ", "))
	}
	if err := f.out.validate(); err != nil {
		return err
	}
	a, err := f.openZtunnel(ctx, g, pod)
	if err != nil {
		return err
	}
	defer a.close()
	var raw json.RawMessage
	if err := a.get(ctx, path, &raw); err != nil {
		return err
	}
	if done, err := f.out.raw(out, raw); done {
		return err
	}
	switch typ {
	case "workloads":
		var ws []ztWorkload
		if err := decode(a, path, raw, &ws); err != nil {
			return err
		}
		return printZtWorkloads(out, ws)
	case "services":
		var ss []model.Service
		if err := decode(a, path, raw, &ss); err != nil {
			return err
		}
		var ws []ztWorkload // for the endpoints' readiness
		if err := a.get(ctx, ztunnelConfigTypes["workloads"], &ws); err != nil {
			return err
		}
		return printZtServices(out, ss, ws)
	case "policies":
		var ps ztPolicies
		if err := decode(a, path, raw, &ps); err != nil {
			return err
		}
		return printZtPolicies(out, ps)
	case "certificates":
		var cs []ztCert
		if err := decode(a, path, raw, &cs); err != nil {
			return err
		}
		return printZtCerts(out, cs)
	case "connections":
		var cs []ztConn
		if err := decode(a, path, raw, &cs); err != nil {
			return err
		}
		return printZtConns(out, cs)
	case "capture":
		var c ztCapture
		if err := decode(a, path, raw, &c); err != nil {
			return err
		}
		return printZtCapture(out, c)
	}
	var d ztDump
	if err := decode(a, path, raw, &d); err != nil {
		return err
	}
	sections := []struct {
		title string
		print func() error
	}{
		{"WORKLOADS", func() error { return printZtWorkloads(out, d.Workloads) }},
		{"SERVICES", func() error { return printZtServices(out, d.Services, d.Workloads) }},
		{"POLICIES", func() error { return printZtPolicies(out, d.Policies) }},
		{"CERTIFICATES", func() error { return printZtCerts(out, d.Certificates) }},
		{"CONNECTIONS", func() error { return printZtConns(out, d.Connections) }},
	}
	node := d.Node
	if node == "" {
		node = "(every workload is local)"
	}
	fmt.Fprintf(out, "NODE: %s\n", node)
	for _, s := range sections {
		fmt.Fprintf(out, "\n%s\n", s.title)
		if err := s.print(); err != nil {
			return err
		}
	}
	return nil
}

func decode(a *admin, path string, raw json.RawMessage, v any) error {
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("%s: GET %s: not the expected JSON (a different ambit version?): %w", a.what, path, err)
	}
	return nil
}

// raw prints an admin API's JSON as it came (json) or as YAML; it reports
// false for table output.
func (o *outputFlag) raw(w io.Writer, raw json.RawMessage) (bool, error) {
	switch o.format {
	case "json":
		var v any
		if err := json.Unmarshal(raw, &v); err != nil {
			return true, fmt.Errorf("json: %w", err)
		}
		return o.structured(w, v)
	case "yaml":
		b, err := yaml.JSONToYAML(raw)
		if err != nil {
			return true, fmt.Errorf("yaml: %w", err)
		}
		_, err = w.Write(b)
		return true, err
	}
	return false, nil
}

func waypointName(w *model.WaypointRef) string {
	if w == nil {
		return ""
	}
	s := w.Namespace + "/" + w.Name
	if !w.Resolved() {
		s += " (unresolved)"
	}
	return s
}

func joinAddrs[T fmt.Stringer](as []T) string {
	var s []string
	for _, a := range as {
		s = append(s, a.String())
	}
	return strings.Join(s, ",")
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func printZtWorkloads(out io.Writer, ws []ztWorkload) error {
	rows := [][]string{}
	for _, w := range ws {
		proto := "TCP"
		if w.Enrolled {
			proto = "HBONE"
		}
		rows = append(rows, []string{w.Namespace, w.Name, joinAddrs(w.Addresses), w.Node, waypointName(w.Waypoint), proto,
			yesNo(w.Ready), yesNo(w.Local), w.Identity})
	}
	return printTable(out, []string{"NAMESPACE", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL", "READY", "LOCAL", "IDENTITY"}, rows)
}

func printZtServices(out io.Writer, ss []model.Service, ws []ztWorkload) error {
	ready := map[string]bool{}
	for _, w := range ws {
		ready[w.UID] = w.Ready
	}
	rows := [][]string{}
	for _, s := range ss {
		var ports []string
		for _, p := range s.Ports {
			ps := strconv.Itoa(int(p.Port))
			if p.TargetPort != 0 && p.TargetPort != p.Port {
				ps += ">" + strconv.Itoa(int(p.TargetPort))
			}
			if p.Protocol != "" {
				ps += "/" + p.Protocol
			}
			ports = append(ports, ps)
		}
		n := 0
		for _, e := range s.Endpoints {
			if ready[e.WorkloadUID] {
				n++
			}
		}
		rows = append(rows, []string{s.Namespace, s.Name, s.Hostname, joinAddrs(s.VIPs), strings.Join(ports, ","),
			waypointName(s.Waypoint), fmt.Sprintf("%d/%d", n, len(s.Endpoints))})
	}
	return printTable(out, []string{"NAMESPACE", "NAME", "HOSTNAME", "VIP", "PORTS", "WAYPOINT", "ENDPOINTS"}, rows)
}

func selectorString(sel map[string]string, meshWide bool) string {
	switch {
	case meshWide:
		return "mesh-wide"
	case len(sel) == 0:
		return "namespace"
	}
	var s []string
	for _, k := range slices.Sorted(maps.Keys(sel)) {
		s = append(s, k+"="+sel[k])
	}
	return strings.Join(s, ",")
}

func printZtPolicies(out io.Writer, ps ztPolicies) error {
	rows := [][]string{}
	for _, p := range ps.AuthorizationPolicies {
		rows = append(rows, []string{"AuthorizationPolicy", p.Namespace, p.Name, selectorString(p.Selector, p.MeshWide),
			string(p.Action), strconv.Itoa(len(p.Rules)) + " rules"})
	}
	for _, p := range ps.PeerAuthentications {
		rows = append(rows, []string{"PeerAuthentication", p.Namespace, p.Name, selectorString(p.Selector, p.MeshWide),
			"mTLS " + string(p.Mode), ""})
	}
	return printTable(out, []string{"KIND", "NAMESPACE", "NAME", "SCOPE", "ACTION/MODE", "RULES"}, rows)
}

// ztCapture is ztunnel's /debug/capture.
type ztCapture struct {
	Enabled bool       `json:"enabled"`
	Status  bpf.Status `json:"status"`
}

func printZtCapture(out io.Writer, c ztCapture) error {
	if !c.Enabled {
		_, err := fmt.Fprintln(out, "CAPTURE: off (this ztunnel runs without eBPF capture: --capture not given)")
		return err
	}
	s := c.Status
	st := s.Stats
	fmt.Fprintf(out, "CAPTURE: on (pinned in %s)\nGUARD: %s\n", s.PinPath, s.Guard)
	fmt.Fprintf(out, "COUNTERS: outbound %d, inbound %d, hbone %d, segments to ztunnel's sockets %d, refused %d, dropped %d\n\n",
		st.Outbound, st.Inbound, st.HBONE, st.Socket, st.Refused, st.Dropped)
	rows := [][]string{}
	for _, ip := range slices.Sorted(maps.Keys(s.Pods)) {
		rows = append(rows, []string{ip, s.Pods[ip]})
	}
	if err := printTable(out, []string{"CAPTURED ADDRESS", "HOST VETH"}, rows); err != nil {
		return err
	}
	if len(s.Skipped) == 0 {
		return nil
	}
	rows = [][]string{}
	for _, pod := range slices.Sorted(maps.Keys(s.Skipped)) {
		rows = append(rows, []string{pod, s.Skipped[pod]})
	}
	fmt.Fprintln(out)
	return printTable(out, []string{"SKIPPED POD", "WHY"}, rows)
}

func printZtConns(out io.Writer, cs []ztConn) error {
	slices.SortFunc(cs, func(a, b ztConn) int { return cmp.Compare(a.ID, b.ID) })
	rows := [][]string{}
	for _, c := range cs {
		state := "ESTABLISHED"
		if !c.Established {
			state = "CONNECTING"
		}
		rows = append(rows, []string{c.Direction, c.Via, c.Route, c.Src, c.Dst, c.Upstream, c.SrcPrincipal, c.DstPrincipal, c.Service,
			state, strconv.FormatInt(c.BytesReceived, 10), strconv.FormatInt(c.BytesSent, 10), c.Age})
	}
	return printTable(out, []string{"DIRECTION", "VIA", "ROUTE", "SOURCE", "DESTINATION", "UPSTREAM", "SRC IDENTITY", "DST IDENTITY",
		"SERVICE", "STATE", "BYTES IN", "BYTES OUT", "AGE"}, rows)
}
