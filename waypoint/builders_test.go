package waypoint

import (
	"fmt"
	"net/netip"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Builders for the Envoy resources istiod-lite emits (see ENVOY.md).

const testVIP = "10.0.0.1"

func res(m proto.Message) Resource { return Resource{Version: "v1", Resource: m} }

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err)
	}
	return a
}

func chainName(port uint32, host string) string {
	return fmt.Sprintf("inbound-vip|%d|http|%s", port, host)
}

// httpChain serves vip:port with the route config of the same name; rbac
// filters go before the router.
func httpFC(vip string, port uint32, host string, rbac ...*rbacv3.RBAC) *listenerv3.FilterChain {
	return httpFCWith(vip, port, host, nil, rbac...)
}

// httpFCWith is httpFC with the HTTP connection manager tweaked.
func httpFCWith(vip string, port uint32, host string, tweak func(*hcmv3.HttpConnectionManager), rbac ...*rbacv3.RBAC) *listenerv3.FilterChain {
	name := chainName(port, host)
	var filters []*hcmv3.HttpFilter
	for _, r := range rbac {
		filters = append(filters, &hcmv3.HttpFilter{Name: "envoy.filters.http.rbac",
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&httprbacv3.RBAC{Rules: r})}})
	}
	filters = append(filters, &hcmv3.HttpFilter{Name: "envoy.filters.http.router",
		ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})}})
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: name,
			ConfigSource: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}}},
		HttpFilters: filters,
	}
	if tweak != nil {
		tweak(hcm)
	}
	return &listenerv3.FilterChain{
		Name: name,
		FilterChainMatch: &listenerv3.FilterChainMatch{
			PrefixRanges:    []*corev3.CidrRange{{AddressPrefix: vip, PrefixLen: wrapperspb.UInt32(32)}},
			DestinationPort: wrapperspb.UInt32(port),
		},
		Filters: []*listenerv3.Filter{{Name: "envoy.filters.network.http_connection_manager",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(hcm)}}},
	}
}

func tcpFC(vip string, port uint32, host, cluster string) *listenerv3.FilterChain {
	return &listenerv3.FilterChain{
		Name: fmt.Sprintf("inbound-vip|%d|tcp|%s", port, host),
		FilterChainMatch: &listenerv3.FilterChainMatch{
			PrefixRanges:    []*corev3.CidrRange{{AddressPrefix: vip, PrefixLen: wrapperspb.UInt32(32)}},
			DestinationPort: wrapperspb.UInt32(port),
		},
		Filters: []*listenerv3.Filter{{Name: "envoy.filters.network.tcp_proxy",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&tcpproxyv3.TcpProxy{StatPrefix: cluster,
				ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster}})}}},
	}
}

func listener(chains ...*listenerv3.FilterChain) *listenerv3.Listener {
	return &listenerv3.Listener{Name: "main_internal", FilterChains: chains}
}

func routeConfig(name string, routes ...*routev3.Route) *routev3.RouteConfiguration {
	return &routev3.RouteConfiguration{Name: name, VirtualHosts: []*routev3.VirtualHost{{
		Name: name, Domains: []string{"*"}, Routes: routes}}}
}

func prefixMatch(p string) *routev3.RouteMatch {
	return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: p}}
}

func toCluster(match *routev3.RouteMatch, cluster string, tweak ...func(*routev3.RouteAction)) *routev3.Route {
	a := &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}
	for _, f := range tweak {
		f(a)
	}
	return &routev3.Route{Name: "r-" + cluster, Match: match, Action: &routev3.Route_Route{Route: a}}
}

func weighted(match *routev3.RouteMatch, ws map[string]uint32, tweak ...func(*routev3.RouteAction)) *routev3.Route {
	var cs []*routev3.WeightedCluster_ClusterWeight
	for _, n := range sortedKeys(ws) {
		cs = append(cs, &routev3.WeightedCluster_ClusterWeight{Name: n, Weight: wrapperspb.UInt32(ws[n])})
	}
	a := &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{Clusters: cs}}}
	for _, f := range tweak {
		f(a)
	}
	return &routev3.Route{Name: "weighted", Match: match, Action: &routev3.Route_Route{Route: a}}
}

func sortedKeys(m map[string]uint32) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	for i := range ks {
		for j := i + 1; j < len(ks); j++ {
			if ks[j] < ks[i] {
				ks[i], ks[j] = ks[j], ks[i]
			}
		}
	}
	return ks
}

func timeout(d time.Duration) func(*routev3.RouteAction) {
	return func(a *routev3.RouteAction) { a.Timeout = durationpb.New(d) }
}

func retries(on string, n uint32, perTry time.Duration) func(*routev3.RouteAction) {
	return func(a *routev3.RouteAction) {
		a.RetryPolicy = &routev3.RetryPolicy{RetryOn: on, NumRetries: wrapperspb.UInt32(n),
			RetryBackOff: &routev3.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(time.Millisecond), MaxInterval: durationpb.New(5 * time.Millisecond)},
			RetryHostPredicate: []*routev3.RetryPolicy_RetryHostPredicate{{Name: "envoy.retry_host_predicates.previous_hosts",
				ConfigType: &routev3.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: mustAny(&wrapperspb.StringValue{})}}},
			HostSelectionRetryMaxAttempts: 5}
		if perTry > 0 {
			a.RetryPolicy.PerTryTimeout = durationpb.New(perTry)
		}
	}
}

func clusterName(host string) string { return "outbound|80||" + host }

func edsCluster(name string, tweak ...func(*clusterv3.Cluster)) *clusterv3.Cluster {
	c := &clusterv3.Cluster{Name: name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{ServiceName: name,
			EdsConfig: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}},
		ConnectTimeout: durationpb.New(time.Second)}
	for _, f := range tweak {
		f(c)
	}
	return c
}

func circuitBreakers(conns, pending, requests, retries uint32) func(*clusterv3.Cluster) {
	return func(c *clusterv3.Cluster) {
		c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
			MaxConnections: wrapperspb.UInt32(conns), MaxPendingRequests: wrapperspb.UInt32(pending),
			MaxRequests: wrapperspb.UInt32(requests), MaxRetries: wrapperspb.UInt32(retries)}}}
	}
}

func protocolOptions(h2 bool, maxReqPerConn uint32) func(*clusterv3.Cluster) {
	return func(c *clusterv3.Cluster) {
		o := &upstreamhttpv3.HttpProtocolOptions{}
		if maxReqPerConn > 0 {
			o.CommonHttpProtocolOptions = &corev3.HttpProtocolOptions{MaxRequestsPerConnection: wrapperspb.UInt32(maxReqPerConn)}
		}
		ec := &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{}
		if h2 {
			ec.ProtocolConfig = &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}
		} else {
			ec.ProtocolConfig = &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}}
		}
		o.UpstreamProtocolOptions = &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: ec}
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: mustAny(o)}
	}
}

func outlier(consec uint32, interval, base time.Duration, maxPct uint32) func(*clusterv3.Cluster) {
	return func(c *clusterv3.Cluster) {
		c.OutlierDetection = &clusterv3.OutlierDetection{Consecutive_5Xx: wrapperspb.UInt32(consec),
			EnforcingConsecutive_5Xx: wrapperspb.UInt32(100), Interval: durationpb.New(interval),
			BaseEjectionTime: durationpb.New(base), MaxEjectionPercent: wrapperspb.UInt32(maxPct),
			EnforcingSuccessRate: wrapperspb.UInt32(0)}
	}
}

// ep is an endpoint; md is its filter_metadata["ambit"].
type ep struct {
	addr netip.AddrPort
	md   map[string]any
}

func cla(name string, eps ...ep) *endpointv3.ClusterLoadAssignment {
	var les []*endpointv3.LbEndpoint
	for _, e := range eps {
		le := &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
				Address: e.addr.Addr().String(), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(e.addr.Port())}}}}}},
			HealthStatus: corev3.HealthStatus_HEALTHY}
		if e.md != nil {
			s, err := structpb.NewStruct(e.md)
			if err != nil {
				panic(err)
			}
			le.Metadata = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"ambit": s}}
		}
		les = append(les, le)
	}
	return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: les}}}
}

func exact(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
}

func prefixSM(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: s}}
}

// simple is one HTTP chain on testVIP:80 for host, routing "/" to one
// cluster of the given backends.
func simple(host string, routes []*routev3.Route, clusters map[string][]ep, ctweak ...func(*clusterv3.Cluster)) []Resource {
	rs := []Resource{res(listener(httpFC(testVIP, 80, host))), res(routeConfig(chainName(80, host), routes...))}
	for _, n := range sortedKeysEP(clusters) {
		rs = append(rs, res(edsCluster(n, ctweak...)), res(cla(n, clusters[n]...)))
	}
	return rs
}

func sortedKeysEP(m map[string][]ep) []string {
	w := map[string]uint32{}
	for k := range m {
		w[k] = 0
	}
	return sortedKeys(w)
}
