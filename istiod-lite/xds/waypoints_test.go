package xds

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/envoy"
	"github.com/ambit-mesh/ambit/model"
)

// The waypoints of these tests: east/wp and west/wp, with secrets
// secret("east/wp") and secret("west/wp") (see hosts).
var (
	eastWP = auth.WaypointRef{Namespace: "east", Name: "wp"}
	westWP = auth.WaypointRef{Namespace: "west", Name: "wp"}
)

// Knobs: workloads with these names in a waypoint's namespace change what
// testWaypointResources builds (they are not endpoints).
const (
	knobBuildError   = "knob-build-error"  // the build fails
	knobPanic        = "knob-panic"        // the build panics
	knobInvalid      = "knob-invalid"      // the listener's HTTP connection manager has no stat_prefix
	knobInconsistent = "knob-inconsistent" // the route configuration the listener names is missing
	knobTimeout      = "knob-timeout"      // the cluster's connect timeout is 2 s instead of 1 s
)

// testWaypointResources stands in for envoy.ForWaypoint (another package's
// translation): a pure function of the model, with one listener, route,
// cluster and endpoint set per waypoint, named after it, whose endpoints are
// the workloads in the waypoint's namespace.
func testWaypointResources(m *model.Snapshot, wp envoy.Waypoint) (*envoy.Resources, error) {
	knobs := map[string]bool{}
	var eps []*endpoint.LbEndpoint
	var uids []string
	for uid, w := range m.Workloads {
		if w.Namespace != wp.Namespace {
			continue
		}
		if strings.HasPrefix(w.Name, "knob-") {
			knobs[w.Name] = true
			continue
		}
		uids = append(uids, uid)
	}
	slices.Sort(uids)
	for _, uid := range uids {
		eps = append(eps, &endpoint.LbEndpoint{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
			Address: &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
				Address: m.Workloads[uid].Addresses[0].String(), PortSpecifier: &core.SocketAddress_PortValue{PortValue: 8080},
			}}},
		}}})
	}
	if knobs[knobPanic] {
		panic("translation bug")
	}
	if knobs[knobBuildError] {
		return nil, fmt.Errorf("waypoint %s/%s: cannot translate", wp.Namespace, wp.Name)
	}
	name := wp.Namespace + "-" + wp.Name
	clusterName := "outbound|80||svc." + name
	routeName := "inbound-vip|80|http|svc." + name
	timeout := time.Second
	if knobs[knobTimeout] {
		timeout = 2 * time.Second
	}
	routerAny, _ := anypb.New(&router.Router{})
	manager := &hcm.HttpConnectionManager{
		StatPrefix:     routeName,
		RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{RouteConfigName: routeName, ConfigSource: &core.ConfigSource{ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}}}}},
		HttpFilters:    []*hcm.HttpFilter{{Name: "envoy.filters.http.router", ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: routerAny}}},
	}
	if knobs[knobInvalid] {
		manager.StatPrefix = ""
	}
	managerAny, _ := anypb.New(manager)
	r := &envoy.Resources{
		Listeners: []*listener.Listener{{
			Name: "main_internal-" + name,
			FilterChains: []*listener.FilterChain{{
				Name:    routeName,
				Filters: []*listener.Filter{{Name: "envoy.filters.network.http_connection_manager", ConfigType: &listener.Filter_TypedConfig{TypedConfig: managerAny}}},
			}},
		}},
		Routes: []*route.RouteConfiguration{{
			Name: routeName,
			VirtualHosts: []*route.VirtualHost{{Name: routeName, Domains: []string{"*"}, Routes: []*route.Route{{
				Match:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
				Action: &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: clusterName}}},
			}}}},
		}},
		Clusters: []*cluster.Cluster{{
			Name:                 clusterName,
			ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
			EdsClusterConfig:     &cluster.Cluster_EdsClusterConfig{ServiceName: clusterName, EdsConfig: &core.ConfigSource{ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}}}},
			ConnectTimeout:       durationpb.New(timeout),
		}},
		Endpoints: []*endpoint.ClusterLoadAssignment{{ClusterName: clusterName, Endpoints: []*endpoint.LocalityLbEndpoints{{LbEndpoints: eps}}}},
	}
	if knobs[knobInconsistent] {
		r.Routes = nil
	}
	return r, nil
}

// newWaypointServer serves store with testWaypointResources over TLS,
// requiring the test credentials (hosts and waypoints).
func newWaypointServer(t *testing.T, ctx context.Context, store *model.Store) (*Server, string) {
	t.Helper()
	s := New(store, nil)
	s.BuildWaypoint = testWaypointResources
	addr, stop := serve(t, ctx, s, "")
	t.Cleanup(stop)
	return s, addr
}

// adsClient wraps a raw Delta ADS stream (go-control-plane's generated
// client) with the test's bookkeeping.
type adsClient struct {
	t  *testing.T
	st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
}

func newADSClient(t *testing.T, ctx context.Context, addr, token string) *adsClient {
	return &adsClient{t: t, st: adsStream(t, ctx, addr, token)}
}

func (c *adsClient) send(req *discovery.DeltaDiscoveryRequest) {
	c.t.Helper()
	if err := c.st.Send(req); err != nil && err != io.EOF {
		c.t.Fatal(err)
	}
}

// subscribeAll subscribes, wildcard, to the four Envoy types as a waypoint
// pod named proxyID of cluster "<ns>/<name>" and returns the first response
// of each, by type URL.
func (c *adsClient) subscribeAll(proxyID, clusterName string) map[string]*discovery.DeltaDiscoveryResponse {
	c.t.Helper()
	for i, typ := range EnvoyTypeURLs {
		req := &discovery.DeltaDiscoveryRequest{TypeUrl: typ, ResourceNamesSubscribe: []string{"*"}}
		if i == 0 {
			req.Node = &core.Node{Id: proxyID, Cluster: clusterName}
		}
		c.send(req)
	}
	out := map[string]*discovery.DeltaDiscoveryResponse{}
	for range EnvoyTypeURLs {
		resp := c.recv()
		out[resp.GetTypeUrl()] = resp
	}
	return out
}

func (c *adsClient) recv() *discovery.DeltaDiscoveryResponse {
	c.t.Helper()
	resp, err := c.st.Recv()
	if err != nil {
		c.t.Fatal(err)
	}
	return resp
}

func (c *adsClient) ack(resp *discovery.DeltaDiscoveryResponse) {
	c.t.Helper()
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()})
}

func (c *adsClient) nack(resp *discovery.DeltaDiscoveryResponse, msg string) {
	c.t.Helper()
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce(), ErrorDetail: &status.Status{Code: int32(codes.InvalidArgument), Message: msg}})
}

func names(resp *discovery.DeltaDiscoveryResponse) []string {
	var out []string
	for _, r := range resp.GetResources() {
		out = append(out, r.GetName())
	}
	slices.Sort(out)
	return out
}

func endpointsIn(t *testing.T, resp *discovery.DeltaDiscoveryResponse) int {
	t.Helper()
	if resp.GetTypeUrl() != resource.EndpointType || len(resp.GetResources()) != 1 {
		t.Fatalf("want one ClusterLoadAssignment, got %s %v", resp.GetTypeUrl(), names(resp))
	}
	var cla endpoint.ClusterLoadAssignment
	if err := resp.GetResources()[0].GetResource().UnmarshalTo(&cla); err != nil {
		t.Fatal(err)
	}
	return len(cla.GetEndpoints()[0].GetLbEndpoints())
}

func pod(ns, name string, ip string) *model.Workload {
	return &model.Workload{UID: "test/" + ns + "/" + name, Name: name, Namespace: ns, Addresses: []netip.Addr{netip.MustParseAddr(ip)}}
}

func waypointStatus(s *Server, wp auth.WaypointRef) WaypointStatus {
	return s.waypoints.Status()[wp.String()]
}

// storeVersion returns the store's current version as the waypoint
// generator writes it.
func storeVersion(store *model.Store) string {
	_, v := store.LoadVersion()
	return strconv.FormatUint(v, 10)
}

// A waypoint caller, over real gRPC and TLS, gets its own waypoint's Envoy
// resources (whatever xDS node id it sends) and nothing of another
// waypoint's; a model change reaches it as the one resource that changed,
// and not a waypoint whose resources it leaves alone. proxy-status shows
// waypoint streams with their kind.
func TestWaypointGetsOnlyItsEnvoyResources(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", "a", "10.9.0.1"), pod("west", "b", "10.9.1.1"), pod("west", "c", "10.9.1.2")}})
	s, addr := newWaypointServer(t, ctx, store)

	east := newADSClient(t, ctx, addr, secret(eastWP.String()))
	// It names the other waypoint's pod as its node id: that selects nothing.
	first := east.subscribeAll("wp-west-0", "")
	want := map[string][]string{
		resource.ListenerType: {"main_internal-east-wp"},
		resource.RouteType:    {"inbound-vip|80|http|svc.east-wp"},
		resource.ClusterType:  {"outbound|80||svc.east-wp"},
		resource.EndpointType: {"outbound|80||svc.east-wp"},
	}
	for typ, w := range want {
		if got := names(first[typ]); !slices.Equal(got, w) {
			t.Errorf("%s: got %v, want %v", shortType(typ), got, w)
		}
	}
	if n := endpointsIn(t, first[resource.EndpointType]); n != 1 {
		t.Fatalf("east/wp: %d endpoints, want 1", n)
	}
	west := newADSClient(t, ctx, addr, secret(westWP.String()))
	westFirst := west.subscribeAll("wp-west-0", westWP.String())
	if n := endpointsIn(t, westFirst[resource.EndpointType]); n != 2 || names(westFirst[resource.ClusterType])[0] != "outbound|80||svc.west-wp" {
		t.Fatalf("west/wp: %d endpoints, clusters %v", n, names(westFirst[resource.ClusterType]))
	}
	for _, r := range first {
		east.ack(r)
	}
	for _, r := range westFirst {
		west.ack(r)
	}

	// A pod in east: east/wp gets the new endpoints, and only them.
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", "d", "10.9.0.2")}})
	resp := east.recv()
	if n := endpointsIn(t, resp); n != 2 {
		t.Fatalf("after the change: %d endpoints, want 2", n)
	}
	east.ack(resp)

	// Then one in west: the next thing west/wp receives is its own change
	// (nothing was sent to it for east's).
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("west", "e", "10.9.1.3")}})
	if n := endpointsIn(t, west.recv()); n != 3 {
		t.Fatalf("west/wp: %d endpoints, want 3", n)
	}

	eventually(t, "east/wp SYNCED on every type", func() bool {
		for _, st := range s.Status() {
			if st.Waypoint != eastWP.String() {
				continue
			}
			ok := st.Kind == "waypoint" && st.Caller == "waypoint east/wp" && st.ProxyID == "wp-west-0"
			for _, typ := range EnvoyTypeURLs {
				ok = ok && st.Types[typ] != nil && st.Types[typ].Sync() == "SYNCED"
			}
			return ok
		}
		return false
	})
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest("GET", "/debug/proxy-status", nil))
	body := rec.Body.String()
	for _, w := range []string{`"kind": "waypoint"`, `"waypoint": "east/wp"`, `"east/wp": {`, `"west/wp": {`, `"version": "` + storeVersion(store) + `"`} {
		if !strings.Contains(body, w) {
			t.Errorf("proxy-status lacks %s:\n%s", w, body)
		}
	}

	// The last stream of a waypoint gone, its snapshot goes.
	if err := west.st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "west/wp forgotten", func() bool {
		_, ok := s.waypoints.Status()[westWP.String()]
		return !ok
	})
}

// testCallers authenticates by a table (a stand-in for kinds the local
// credentials file cannot declare), else as hosts does.
type testCallers map[string]*auth.Caller

func (c testCallers) Authenticate(ctx context.Context, token string) (*auth.Caller, error) {
	if caller, ok := c[token]; ok {
		cc := *caller
		return &cc, nil
	}
	return hosts.Authenticate(ctx, token)
}

// Each kind of caller may subscribe only to its own types; every other
// combination is PermissionDenied, with a message that says why.
func TestXDSAuthorizationPerKind(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	var logs logBuffer
	s := New(store, slog.New(slog.NewTextHandler(&logs, nil)))
	s.BuildWaypoint = testWaypointResources
	callers := testCallers{
		"workload-token-0123456789": {Kind: auth.Workload, Name: "pod east/app-0", Node: "node-1"},
		"operator-token-0123456789": {Kind: auth.Operator, Name: "operator alice"},
	}
	addr, stop := serveWith(t, ctx, s, "", grpc.ChainStreamInterceptor(s.RequireAuthentication(callers)))
	defer stop()

	first := func(token string, req *discovery.DeltaDiscoveryRequest) error {
		c := newADSClient(t, ctx, addr, token)
		c.send(req)
		_, err := c.st.Recv()
		return err
	}
	wantDenied := func(what string, err error, msg ...string) {
		t.Helper()
		wantCode(t, what, err, codes.PermissionDenied)
		for _, m := range msg {
			if !strings.Contains(err.Error(), m) {
				t.Errorf("%s: %q lacks %q", what, err, m)
			}
		}
	}
	wild := func(node, typ string) *discovery.DeltaDiscoveryRequest {
		return &discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: node}, TypeUrl: typ, ResourceNamesSubscribe: []string{"*"}}
	}

	wantDenied("node proxy asks for clusters", first(secret("node-1"), wild("node-1", resource.ClusterType)), "host node-1 is a node proxy", resource.ClusterType)
	wantDenied("node proxy asks for listeners", first(secret("node-1"), wild("node-1", resource.ListenerType)), "node proxy")
	wantDenied("waypoint asks for workloads", first(secret(eastWP.String()), wild("wp-0", workload.WorkloadType)), "waypoint east/wp is a waypoint", workload.WorkloadType)
	wantDenied("waypoint asks for services", first(secret(eastWP.String()), wild("wp-0", workload.ServiceType)), "waypoint")
	wantDenied("waypoint asks for secrets", first(secret(eastWP.String()), wild("wp-0", resource.SecretType)), resource.SecretType)
	wantDenied("waypoint claims another waypoint's cluster", first(secret(eastWP.String()), &discovery.DeltaDiscoveryRequest{
		Node: &core.Node{Id: "wp-0", Cluster: westWP.String()}, TypeUrl: resource.ClusterType, ResourceNamesSubscribe: []string{"*"},
	}), `may not claim cluster "west/wp"`)
	wantDenied("workload", first("workload-token-0123456789", wild("node-1", workload.WorkloadType)), "pod east/app-0 is a workload")
	wantDenied("workload asks for clusters", first("workload-token-0123456789", wild("node-1", resource.ClusterType)), "workload")
	wantDenied("operator", first("operator-token-0123456789", wild("", workload.WorkloadType)), "operator alice is a operator")
	if !logs.hasLine("xds client refused", `caller="host node-1"`, "code=PermissionDenied", "envoy.config.cluster.v3.Cluster") {
		t.Errorf("refusal not logged:\n%s", &logs)
	}

	// Later in a stream too: a waypoint that synced asks for workloads.
	c := newADSClient(t, ctx, addr, secret(eastWP.String()))
	c.subscribeAll("wp-0", eastWP.String())
	c.send(wild("", workload.WorkloadType))
	_, err := c.st.Recv()
	wantDenied("waypoint asks for workloads later", err, "waypoint")

	// A server that does not authenticate serves no Envoy types.
	open := New(store, nil)
	open.BuildWaypoint = testWaypointResources
	openAddr, stopOpen := serveWith(t, ctx, open, "")
	defer stopOpen()
	oc := newADSClient(t, ctx, openAddr, "")
	oc.send(wild("node-1", resource.ClusterType))
	_, err = oc.st.Recv()
	wantDenied("unauthenticated client asks for clusters", err, "an unauthenticated client")
}

// A version a waypoint NACKed is not sent to it again: not on the NACK, not
// when the model changes in a way that leaves that resource alone; a model
// change to the resource sends the new version.
func TestWaypointNACKNotResent(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	s, addr := newWaypointServer(t, ctx, store)
	c := newADSClient(t, ctx, addr, secret(eastWP.String()))
	for _, r := range c.subscribeAll("wp-0", eastWP.String()) {
		c.ack(r)
	}

	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", "a", "10.9.0.1")}})
	bad := c.recv()
	if n := endpointsIn(t, bad); n != 1 {
		t.Fatalf("%d endpoints", n)
	}
	c.nack(bad, "endpoint 10.9.0.1:8080: not for me")
	eventually(t, "the NACK in proxy-status", func() bool {
		for _, st := range s.Status() {
			if ts := st.Types[resource.EndpointType]; ts != nil && ts.Sync() == "NACKED" && strings.Contains(ts.NackError, "not for me") {
				return true
			}
		}
		return false
	})

	// A change elsewhere in the model: east/wp is rebuilt, to the same
	// resources.
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("west", "b", "10.9.1.1")}})
	v := storeVersion(store)
	eventually(t, "the rebuild", func() bool { return waypointStatus(s, eastWP).Version == v })
	// A change of east/wp's cluster only: the next response is that
	// cluster. Had the NACKed endpoints been re-sent (on the NACK or on a
	// rebuild), they would have come first on this stream.
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", knobTimeout, "10.9.0.99")}})
	resp := c.recv()
	if resp.GetTypeUrl() != resource.ClusterType {
		t.Fatalf("got %s %v, want the changed Cluster", shortType(resp.GetTypeUrl()), names(resp))
	}
	c.ack(resp)
	// A change of the endpoints sends their new version.
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", "c", "10.9.0.2")}})
	if n := endpointsIn(t, c.recv()); n != 2 {
		t.Fatalf("%d endpoints, want 2", n)
	}
	for _, st := range s.Status() {
		if ts := st.Types[resource.EndpointType]; st.Waypoint == eastWP.String() && ts.Responses != 3 {
			t.Errorf("%d endpoint responses, want 3 (first, NACKed, new)", ts.Responses)
		}
	}
}

// A snapshot that cannot be built, holds an invalid resource (deep in a
// listener's typed config) or is inconsistent is not published: the
// waypoint keeps the last good one, and proxy-status says why.
func TestWaypointBadSnapshotNotPublished(t *testing.T) {
	for _, tc := range []struct {
		knob, err string
	}{
		{knobBuildError, "cannot translate"},
		{knobPanic, "build: panic: translation bug"},
		{knobInvalid, "invalid Listener \"main_internal-east-wp\": filter_chains[0].filters[0].typed_config: invalid HttpConnectionManager.StatPrefix"},
		{knobInconsistent, "inconsistent snapshot"},
	} {
		t.Run(tc.knob, func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			store := &model.Store{}
			store.Replace(meshSnapshot(t))
			s, addr := newWaypointServer(t, ctx, store)
			c := newADSClient(t, ctx, addr, secret(eastWP.String()))
			for _, r := range c.subscribeAll("wp-0", eastWP.String()) {
				c.ack(r)
			}
			good := waypointStatus(s, eastWP).Version

			knob := pod("east", tc.knob, "10.9.0.99")
			store.Apply(&model.Delta{Workloads: []*model.Workload{knob, pod("east", "a", "10.9.0.1")}})
			v := storeVersion(store)
			eventually(t, "the error in the status", func() bool {
				st := waypointStatus(s, eastWP)
				return st.ErrorVersion == v && strings.Contains(st.Error, tc.err) && st.Version == good && st.Failures == 1
			})
			rec := httptest.NewRecorder()
			s.ServeHTTP(rec, httptest.NewRequest("GET", "/debug/proxy-status", nil))
			if !strings.Contains(rec.Body.String(), `"errorVersion": "`+v+`"`) {
				t.Errorf("proxy-status lacks the error:\n%s", rec.Body.String())
			}

			// Fixed: the next response is the good snapshot's change (the
			// new endpoints); nothing of the bad one came before it.
			store.Apply(&model.Delta{RemovedWorkloads: []string{knob.UID}})
			if n := endpointsIn(t, c.recv()); n != 1 {
				t.Fatalf("%d endpoints, want 1", n)
			}
			if st := waypointStatus(s, eastWP); st.Error != "" || st.Version != storeVersion(store) {
				t.Errorf("status after the fix: %+v", st)
			}
		})
	}
}

// makeSnapshot's checks, on their own.
func TestMakeSnapshot(t *testing.T) {
	m := model.NewSnapshot([]*model.Workload{pod("east", "a", "10.9.0.1")}, nil, nil, nil)
	r, err := testWaypointResources(m, envoy.Waypoint{Namespace: "east", Name: "wp"})
	if err != nil {
		t.Fatal(err)
	}
	s, err := makeSnapshot("7", r)
	if err != nil {
		t.Fatal(err)
	}
	if s.GetVersion(resource.ClusterType) != "7" || len(s.GetResources(resource.EndpointType)) != 1 {
		t.Fatalf("snapshot: %+v", s)
	}
	if _, err := makeSnapshot("1", &envoy.Resources{}); err != nil {
		t.Fatalf("empty: %v", err)
	}
	for name, mutate := range map[string]func(r *envoy.Resources){
		"duplicate cluster":           func(r *envoy.Resources) { r.Clusters = append(r.Clusters, r.Clusters[0]) },
		"endpoints without a cluster": func(r *envoy.Resources) { r.Clusters = nil },
		"cluster without endpoints":   func(r *envoy.Resources) { r.Endpoints = nil },
		"unnamed endpoints":           func(r *envoy.Resources) { r.Endpoints[0].ClusterName = "" },
		"typed config of an unknown type": func(r *envoy.Resources) {
			r.Listeners[0].FilterChains[0].Filters[0].GetTypedConfig().TypeUrl = "type.googleapis.com/unknown.Type"
		},
	} {
		r, _ := testWaypointResources(m, envoy.Waypoint{Namespace: "east", Name: "wp"})
		mutate(r)
		if _, err := makeSnapshot("1", r); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
