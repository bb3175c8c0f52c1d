package ambitctl

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	// the Envoy types a waypoint's config holds (typed_config of filters),
	// registered for protojson
	_ "github.com/ambit-mesh/ambit/istiod-lite/envoy"
)

// waypointPodLabel selects a waypoint's pods by Gateway name
// (istiod-lite/deployer).
const waypointPodLabel = "gateway.networking.k8s.io/gateway-name"

// The JSON of the waypoint's admin API (waypoint/admin.go).
type (
	wpConfigDump struct {
		Identity     string `json:"identity"`
		LastRejected string `json:"last_rejected,omitempty"`
		Resources    []struct {
			Version  string          `json:"version"`
			Resource json.RawMessage `json:"resource"`
		} `json:"resources"`
	}
	wpHost struct {
		Address      string `json:"address"`
		Identity     string `json:"identity,omitempty"`
		HBONEPort    uint16 `json:"hbonePort,omitempty"`
		Workload     string `json:"workload,omitempty"`
		Healthy      bool   `json:"healthy"`
		EjectedUntil string `json:"ejectedUntil,omitempty"`
		Ejections    int    `json:"ejections"`
		Active       int64  `json:"activeRequests"`
		Conns        int64  `json:"connections"`
	}
	wpCluster struct {
		Name            string   `json:"name"`
		LB              string   `json:"lbPolicy"`
		MaxConnections  int64    `json:"maxConnections"`
		MaxPending      int64    `json:"maxPendingRequests"`
		MaxRequests     int64    `json:"maxRequests"`
		MaxRetries      int64    `json:"maxRetries"`
		ActiveRequests  int64    `json:"activeRequests"`
		PendingRequests int64    `json:"pendingRequests"`
		ActiveRetries   int64    `json:"activeRetries"`
		Connections     int64    `json:"connections"`
		OverflowRq      uint64   `json:"upstreamRqPendingOverflow"`
		OverflowMaxRq   uint64   `json:"upstreamRqOverflow"`
		OverflowRetry   uint64   `json:"upstreamRqRetryOverflow"`
		Ejections       uint64   `json:"outlierEjectionsTotal"`
		Hosts           []wpHost `json:"hosts"`
	}
)

// waypointConfig is a waypoint's config, decoded.
type waypointConfig struct {
	Identity     string
	LastRejected string
	Version      string
	Listeners    []*listener.Listener
	Routes       []*route.RouteConfiguration
	Clusters     []*clusterv3.Cluster
	Endpoints    []*endpoint.ClusterLoadAssignment
	Runtime      []wpCluster // from /clusters
}

var proxyConfigTypes = []string{"all", "clusters", "endpoints", "listeners", "routes"}

type proxyConfigFlags struct {
	proxyTarget
	waypoint string
	out      outputFlag
}

func newProxyConfigCommand(g *globalFlags) *cobra.Command {
	f := &proxyConfigFlags{}
	cmd := &cobra.Command{
		Use:   "proxy-config routes|clusters|endpoints|listeners|all [WAYPOINT_POD]",
		Short: "Show a waypoint's Envoy config: listeners, routes, clusters, endpoints with ejection state",
		Long: `proxy-config reads a waypoint's admin API (port 15000, localhost in its pod):
the listeners, route configurations and clusters istiod-lite sent it (xDS),
and its endpoints with health, outlier ejections and circuit-breaker counters.

In a cluster it port-forwards through the API server to a waypoint pod (the
one named, else one of the Gateway --waypoint in -n). With --address it
reads host:port directly.`,
		Example: `  # routes of the waypoint "waypoint" of namespace shop
  ambitctl proxy-config routes --waypoint waypoint -n shop

  # endpoints with ejection state, as JSON
  ambitctl proxy-config endpoints --waypoint waypoint -n shop -o json

  # a waypoint run on a host or in local mode
  ambitctl proxy-config all --address 127.0.0.1:15000`,
		Args:      cobra.RangeArgs(1, 2),
		ValidArgs: proxyConfigTypes,
		RunE: func(cmd *cobra.Command, args []string) error {
			pod := ""
			if len(args) == 2 {
				pod = args[1]
			}
			return runProxyConfig(cmd.Context(), cmd.OutOrStdout(), g, f, args[0], pod)
		},
	}
	f.register(cmd, "waypoint's", "15000")
	cmd.Flags().StringVar(&f.waypoint, "waypoint", "", "the waypoint (Gateway) whose pod to read, in -n's namespace")
	f.out.register(cmd)
	return cmd
}

func (f *proxyConfigFlags) open(ctx context.Context, g *globalFlags, pod string) (*admin, error) {
	if f.address != "" {
		if pod != "" || f.waypoint != "" {
			return nil, fmt.Errorf("--address reads one proxy directly: give no pod name and no --waypoint with it")
		}
		return directAdmin(f.address)
	}
	if pod == "" && f.waypoint == "" {
		return nil, fmt.Errorf("which waypoint? give its pod name, --waypoint NAME (with -n), or --address host:port")
	}
	c, err := g.cluster()
	if err != nil {
		return nil, err
	}
	p, err := c.pickPod(ctx, "waypoint "+f.waypoint, c.namespace, waypointPodLabel+"="+f.waypoint, pod, "")
	if err != nil {
		return nil, err
	}
	a, err := c.podAdmin(ctx, p, proxyAdminPort)
	if err != nil {
		return nil, err
	}
	a.what = "waypoint " + a.what
	return a, nil
}

func runProxyConfig(ctx context.Context, out io.Writer, g *globalFlags, f *proxyConfigFlags, typ, pod string) error {
	if !slices.Contains(proxyConfigTypes, typ) {
		return fmt.Errorf("unknown config type %q: use one of %s", typ, strings.Join(proxyConfigTypes, ", "))
	}
	if err := f.out.validate(); err != nil {
		return err
	}
	a, err := f.open(ctx, g, pod)
	if err != nil {
		return err
	}
	defer a.close()
	wc, dump, err := readWaypointConfig(ctx, a, typ)
	if err != nil {
		return err
	}
	if f.out.format == "json" || f.out.format == "yaml" {
		return structuredWaypointConfig(out, &f.out, typ, wc, dump)
	}
	if wc.LastRejected != "" {
		fmt.Fprintf(out, "LAST REJECTED CONFIG: %s\n\n", wc.LastRejected)
	}
	switch typ {
	case "listeners":
		return printListeners(out, wc)
	case "routes":
		return printRoutes(out, wc)
	case "clusters":
		return printClusters(out, wc)
	case "endpoints":
		return printEndpoints(out, wc)
	}
	fmt.Fprintf(out, "IDENTITY: %s\nVERSION: %s\n", wc.Identity, wc.Version)
	for _, s := range []struct {
		title string
		print func(io.Writer, *waypointConfig) error
	}{{"LISTENERS", printListeners}, {"ROUTES", printRoutes}, {"CLUSTERS", printClusters}, {"ENDPOINTS", printEndpoints}} {
		fmt.Fprintf(out, "\n%s\n", s.title)
		if err := s.print(out, wc); err != nil {
			return err
		}
	}
	return nil
}

// readWaypointConfig reads /config_dump and, for clusters and endpoints,
// /clusters.
func readWaypointConfig(ctx context.Context, a *admin, typ string) (*waypointConfig, *wpConfigDump, error) {
	var d wpConfigDump
	if err := a.get(ctx, "/config_dump", &d); err != nil {
		return nil, nil, err
	}
	wc := &waypointConfig{Identity: d.Identity, LastRejected: d.LastRejected}
	versions := map[string]bool{}
	for _, r := range d.Resources {
		var any anypb.Any
		if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(r.Resource, &any); err != nil {
			return nil, nil, fmt.Errorf("%s: /config_dump: a resource ambitctl cannot read (a different ambit version?): %w", a.what, err)
		}
		m, err := any.UnmarshalNew()
		if err != nil {
			return nil, nil, fmt.Errorf("%s: /config_dump: %w", a.what, err)
		}
		versions[r.Version] = true
		switch x := m.(type) {
		case *listener.Listener:
			wc.Listeners = append(wc.Listeners, x)
		case *route.RouteConfiguration:
			wc.Routes = append(wc.Routes, x)
		case *clusterv3.Cluster:
			wc.Clusters = append(wc.Clusters, x)
		case *endpoint.ClusterLoadAssignment:
			wc.Endpoints = append(wc.Endpoints, x)
		}
	}
	wc.Version = strings.Join(slices.Sorted(maps.Keys(versions)), ",")
	if typ == "clusters" || typ == "endpoints" || typ == "all" {
		if err := a.get(ctx, "/clusters", &wc.Runtime); err != nil {
			return nil, nil, err
		}
	}
	return wc, &d, nil
}

// structuredWaypointConfig prints the resources of typ as Envoy's JSON
// (protojson), endpoints as the waypoint's runtime view.
func structuredWaypointConfig(out io.Writer, o *outputFlag, typ string, wc *waypointConfig, d *wpConfigDump) error {
	msgs := func(ms ...[]proto.Message) []json.RawMessage {
		res := []json.RawMessage{}
		for _, l := range ms {
			for _, m := range l {
				b, err := protojson.Marshal(m)
				if err == nil {
					res = append(res, b)
				}
			}
		}
		return res
	}
	var v any
	switch typ {
	case "listeners":
		v = msgs(asMessages(wc.Listeners))
	case "routes":
		v = msgs(asMessages(wc.Routes))
	case "clusters":
		v = map[string]any{"clusters": msgs(asMessages(wc.Clusters)), "runtime": wc.Runtime}
	case "endpoints":
		v = map[string]any{"clusterLoadAssignments": msgs(asMessages(wc.Endpoints)), "clusters": wc.Runtime}
	default:
		v = map[string]any{"configDump": d, "clusters": wc.Runtime}
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("json: %w", err)
	}
	_, err = o.raw(out, raw)
	return err
}

func asMessages[T proto.Message](l []T) []proto.Message {
	out := make([]proto.Message, len(l))
	for i, m := range l {
		out[i] = m
	}
	return out
}

func printListeners(out io.Writer, wc *waypointConfig) error {
	rows := [][]string{}
	for _, l := range wc.Listeners {
		addr := "internal"
		if sa := l.GetAddress().GetSocketAddress(); sa != nil {
			addr = sa.GetAddress() + ":" + strconv.Itoa(int(sa.GetPortValue()))
		}
		for _, fc := range l.GetFilterChains() {
			rows = append(rows, append([]string{l.GetName(), addr}, filterChainRow(fc)...))
		}
		if fc := l.GetDefaultFilterChain(); fc != nil {
			r := filterChainRow(fc)
			r[1] = "(default) " + r[1]
			rows = append(rows, append([]string{l.GetName(), addr}, r...))
		}
		if len(l.GetFilterChains()) == 0 && l.GetDefaultFilterChain() == nil {
			rows = append(rows, []string{l.GetName(), addr, "", "", "", ""})
		}
	}
	return printTable(out, []string{"LISTENER", "ADDRESS", "CHAIN", "MATCH", "FILTERS", "DESTINATION"}, rows)
}

// filterChainRow is CHAIN, MATCH, FILTERS, DESTINATION of one chain.
func filterChainRow(fc *listener.FilterChain) []string {
	var match []string
	m := fc.GetFilterChainMatch()
	for _, r := range m.GetPrefixRanges() {
		match = append(match, r.GetAddressPrefix()+"/"+strconv.Itoa(int(r.GetPrefixLen().GetValue())))
	}
	if p := m.GetDestinationPort(); p != nil {
		match = append(match, "port "+strconv.Itoa(int(p.GetValue())))
	}
	var filters []string
	dest := ""
	for _, f := range fc.GetFilters() {
		filters = append(filters, shortFilterName(f.GetName()))
		m, err := f.GetTypedConfig().UnmarshalNew()
		if err != nil {
			continue
		}
		switch x := m.(type) {
		case *hcm.HttpConnectionManager:
			if rds := x.GetRds(); rds != nil {
				dest = "route " + rds.GetRouteConfigName()
			} else if rc := x.GetRouteConfig(); rc != nil {
				dest = "route " + rc.GetName() + " (inline)"
			}
		case *tcpproxy.TcpProxy:
			if c := x.GetCluster(); c != "" {
				dest = "cluster " + c
			} else if wcs := x.GetWeightedClusters(); wcs != nil {
				var cs []string
				for _, c := range wcs.GetClusters() {
					cs = append(cs, c.GetName()+"="+strconv.Itoa(int(c.GetWeight())))
				}
				dest = "clusters " + strings.Join(cs, ",")
			}
		}
	}
	return []string{fc.GetName(), strings.Join(match, ","), strings.Join(filters, ","), dest}
}

func shortFilterName(n string) string {
	n = strings.TrimPrefix(n, "envoy.filters.network.")
	return strings.TrimPrefix(n, "envoy.filters.http.")
}

func printRoutes(out io.Writer, wc *waypointConfig) error {
	rows := [][]string{}
	for _, rc := range wc.Routes {
		for _, vh := range rc.GetVirtualHosts() {
			domains := vh.GetDomains()
			if len(domains) > 3 {
				domains = append(slices.Clone(domains[:3]), fmt.Sprintf("+%d more", len(vh.GetDomains())-3))
			}
			for _, r := range vh.GetRoutes() {
				rows = append(rows, []string{rc.GetName(), vh.GetName(), strings.Join(domains, ","), routeMatch(r.GetMatch()), routeAction(r)})
			}
		}
	}
	return printTable(out, []string{"ROUTE CONFIG", "VIRTUAL HOST", "DOMAINS", "MATCH", "ACTION"}, rows)
}

func routeMatch(m *route.RouteMatch) string {
	var s []string
	switch p := m.GetPathSpecifier().(type) {
	case *route.RouteMatch_Prefix:
		s = append(s, p.Prefix+"*")
	case *route.RouteMatch_Path:
		s = append(s, p.Path)
	case *route.RouteMatch_PathSeparatedPrefix:
		s = append(s, p.PathSeparatedPrefix+"/*")
	case *route.RouteMatch_SafeRegex:
		s = append(s, "~"+p.SafeRegex.GetRegex())
	}
	for _, h := range m.GetHeaders() {
		v := h.GetStringMatch().GetExact()
		if v == "" {
			v = "(match)"
		}
		s = append(s, h.GetName()+"="+v)
	}
	for _, q := range m.GetQueryParameters() {
		s = append(s, "?"+q.GetName())
	}
	return strings.Join(s, " ")
}

func routeAction(r *route.Route) string {
	switch a := r.GetAction().(type) {
	case *route.Route_Route:
		ra := a.Route
		s := ""
		switch c := ra.GetClusterSpecifier().(type) {
		case *route.RouteAction_Cluster:
			s = c.Cluster
		case *route.RouteAction_WeightedClusters:
			var cs []string
			for _, wc := range c.WeightedClusters.GetClusters() {
				cs = append(cs, fmt.Sprintf("%s %d%%", wc.GetName(), wc.GetWeight().GetValue()))
			}
			s = strings.Join(cs, ", ")
		}
		if t := ra.GetTimeout(); t != nil && t.AsDuration() > 0 {
			s += " timeout " + t.AsDuration().String()
		}
		if rp := ra.GetRetryPolicy(); rp != nil {
			s += fmt.Sprintf(" retries %d", rp.GetNumRetries().GetValue())
		}
		return s
	case *route.Route_Redirect:
		return "redirect " + a.Redirect.GetHostRedirect() + a.Redirect.GetPathRedirect()
	case *route.Route_DirectResponse:
		return "respond " + strconv.Itoa(int(a.DirectResponse.GetStatus()))
	}
	return ""
}

func printClusters(out io.Writer, wc *waypointConfig) error {
	rt := map[string]wpCluster{}
	for _, c := range wc.Runtime {
		rt[c.Name] = c
	}
	rows := [][]string{}
	for _, c := range wc.Clusters {
		typ := c.GetType().String()
		if c.GetType() == clusterv3.Cluster_EDS {
			typ = "EDS"
		}
		r := rt[c.GetName()]
		healthy := 0
		for _, h := range r.Hosts {
			if h.Healthy {
				healthy++
			}
		}
		od := ""
		if o := c.GetOutlierDetection(); o != nil {
			od = fmt.Sprintf("%d 5xx/%s", o.GetConsecutive_5Xx().GetValue(), o.GetInterval().AsDuration())
		}
		rows = append(rows, []string{c.GetName(), typ, r.LB, fmt.Sprintf("%d/%d", healthy, len(r.Hosts)),
			limit(r.MaxConnections) + "/" + limit(r.MaxPending) + "/" + limit(r.MaxRequests) + "/" + limit(r.MaxRetries),
			strconv.FormatInt(r.ActiveRequests, 10), strconv.FormatUint(r.OverflowRq+r.OverflowMaxRq+r.OverflowRetry, 10),
			od, strconv.FormatUint(r.Ejections, 10)})
	}
	return printTable(out, []string{"CLUSTER", "TYPE", "LB", "HEALTHY", "MAX CONN/PEND/RQ/RETRY", "ACTIVE RQ", "OVERFLOWS", "OUTLIER", "EJECTIONS"}, rows)
}

// limit prints a circuit-breaker threshold; Envoy's "no limit" (2^32-1)
// is "max".
func limit(v int64) string {
	if v >= 1<<32-1 {
		return "max"
	}
	return strconv.FormatInt(v, 10)
}

func printEndpoints(out io.Writer, wc *waypointConfig) error {
	rows := [][]string{}
	for _, c := range wc.Runtime {
		for _, h := range c.Hosts {
			state := "HEALTHY"
			if !h.Healthy {
				state = "EJECTED until " + h.EjectedUntil
			}
			addr := h.Address
			if h.HBONEPort != 0 {
				addr += " (HBONE " + strconv.Itoa(int(h.HBONEPort)) + ")"
			}
			rows = append(rows, []string{c.Name, addr, h.Workload, h.Identity, state, strconv.Itoa(h.Ejections),
				strconv.FormatInt(h.Active, 10), strconv.FormatInt(h.Conns, 10)})
		}
	}
	return printTable(out, []string{"CLUSTER", "ENDPOINT", "WORKLOAD", "IDENTITY", "STATE", "EJECTIONS", "ACTIVE RQ", "CONNS"}, rows)
}
