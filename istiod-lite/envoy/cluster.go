package envoy

import (
	"math"
	"slices"
	"strings"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ambit-mesh/ambit/model"
)

// Istio's defaults for clusters.
const (
	DefaultConnectTimeout     = 10 * time.Second // mesh connectTimeout
	defaultInterval           = 10 * time.Second
	defaultBaseEjectionTime   = 30 * time.Second
	defaultMaxEjectionPercent = 10
	defaultConsecutive5xx     = 5
	httpProtocolOptionsKey    = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)

// ads is the config source of RDS and EDS: the ADS stream.
func ads() *core.ConfigSource {
	return &core.ConfigSource{
		ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
		ResourceApiVersion:    core.ApiVersion_V3,
	}
}

// makeCluster returns the EDS cluster of a service port with its
// DestinationRule's settings (dr may be nil), mapped as Istio maps them.
func makeCluster(name string, port model.ServicePort, dr *model.DestinationRule) *cluster.Cluster {
	var tp model.TrafficPolicy
	if dr != nil {
		tp = dr.ForPort(port.Port)
	}
	cp := tp.ConnectionPool
	if cp == nil {
		cp = &model.ConnectionPool{}
	}
	connect := DefaultConnectTimeout
	if cp.ConnectTimeout > 0 {
		connect = cp.ConnectTimeout
	}
	c := &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
		EdsClusterConfig:     &cluster.Cluster_EdsClusterConfig{EdsConfig: ads(), ServiceName: name},
		ConnectTimeout:       durationpb.New(connect),
		LbPolicy:             makeLBPolicy(tp.LoadBalancer),
		CircuitBreakers:      makeCircuitBreakers(cp),
		OutlierDetection:     makeOutlierDetection(tp.OutlierDetection),
		TypedExtensionProtocolOptions: map[string]*anypb.Any{
			httpProtocolOptionsKey: mustAny(makeHTTPProtocolOptions(port, cp)),
		},
	}
	return c
}

func makeLBPolicy(lb string) cluster.Cluster_LbPolicy {
	switch lb {
	case model.LBLeastRequest:
		return cluster.Cluster_LEAST_REQUEST // power of two choices (Envoy's default choice_count)
	case model.LBRandom:
		return cluster.Cluster_RANDOM
	}
	return cluster.Cluster_ROUND_ROBIN
}

// makeCircuitBreakers maps connectionPool limits; an unset limit is
// MaxUint32 (Istio's default: no limit), not Envoy's 1024.
func makeCircuitBreakers(cp *model.ConnectionPool) *cluster.CircuitBreakers {
	limit := func(v int32) *wrapperspb.UInt32Value {
		if v <= 0 {
			return wrapperspb.UInt32(math.MaxUint32)
		}
		return wrapperspb.UInt32(uint32(v))
	}
	return &cluster.CircuitBreakers{Thresholds: []*cluster.CircuitBreakers_Thresholds{{
		Priority:           core.RoutingPriority_DEFAULT,
		MaxConnections:     limit(cp.MaxConnections),
		MaxPendingRequests: limit(cp.MaxPendingRequests),
		MaxRequests:        limit(cp.MaxRequests),
		MaxRetries:         limit(cp.MaxRetries),
	}}}
}

// makeOutlierDetection maps outlierDetection as Istio does: consecutive
// 5xx and gateway errors enforced at 100 % when set (5xx defaults to 5),
// success-rate ejection off, Istio's interval, base ejection time and
// maximum ejection percentage defaults. nil when unset.
func makeOutlierDetection(od *model.OutlierDetection) *cluster.OutlierDetection {
	if od == nil {
		return nil
	}
	enforce := func(v uint32) *wrapperspb.UInt32Value {
		if v > 0 {
			return wrapperspb.UInt32(100)
		}
		return wrapperspb.UInt32(0)
	}
	out := &cluster.OutlierDetection{
		Interval:                           durationpb.New(orDefault(od.Interval, defaultInterval)),
		BaseEjectionTime:                   durationpb.New(orDefault(od.BaseEjectionTime, defaultBaseEjectionTime)),
		MaxEjectionPercent:                 wrapperspb.UInt32(defaultMaxEjectionPercent),
		EnforcingSuccessRate:               wrapperspb.UInt32(0),
		EnforcingConsecutiveGatewayFailure: wrapperspb.UInt32(0),
	}
	if od.MaxEjectionPercent > 0 {
		out.MaxEjectionPercent = wrapperspb.UInt32(uint32(od.MaxEjectionPercent))
	}
	n5xx := uint32(defaultConsecutive5xx)
	if od.Consecutive5xx != nil {
		n5xx = *od.Consecutive5xx
	}
	out.Consecutive_5Xx = wrapperspb.UInt32(n5xx)
	out.EnforcingConsecutive_5Xx = enforce(n5xx)
	if g := od.ConsecutiveGatewayErrors; g != nil {
		out.ConsecutiveGatewayFailure = wrapperspb.UInt32(*g)
		out.EnforcingConsecutiveGatewayFailure = enforce(*g)
	}
	return out
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// makeHTTPProtocolOptions sets the upstream HTTP version from the port's
// protocol (HTTP/2 for http2/grpc/h2c, HTTP/1.1 for http, else the
// downstream's) and the pool's idle timeout and requests per connection.
func makeHTTPProtocolOptions(port model.ServicePort, cp *model.ConnectionPool) *upstreamhttp.HttpProtocolOptions {
	o := &upstreamhttp.HttpProtocolOptions{}
	if cp.IdleTimeout > 0 || cp.MaxRequestsPerConnection > 0 {
		o.CommonHttpProtocolOptions = &core.HttpProtocolOptions{}
		if cp.IdleTimeout > 0 {
			o.CommonHttpProtocolOptions.IdleTimeout = durationpb.New(cp.IdleTimeout)
		}
		if cp.MaxRequestsPerConnection > 0 {
			o.CommonHttpProtocolOptions.MaxRequestsPerConnection = wrapperspb.UInt32(uint32(cp.MaxRequestsPerConnection))
		}
	}
	switch portProtocol(port) {
	case protoHTTP2:
		o.UpstreamProtocolOptions = &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &core.Http2ProtocolOptions{}},
		}}
	case protoHTTP:
		o.UpstreamProtocolOptions = &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &core.Http1ProtocolOptions{}},
		}}
	default:
		o.UpstreamProtocolOptions = &upstreamhttp.HttpProtocolOptions_UseDownstreamProtocolConfig{UseDownstreamProtocolConfig: &upstreamhttp.HttpProtocolOptions_UseDownstreamHttpConfig{
			HttpProtocolOptions:  &core.Http1ProtocolOptions{},
			Http2ProtocolOptions: &core.Http2ProtocolOptions{},
		}}
	}
	return o
}

// Port protocols, from appProtocol or the port name's prefix (Istio's
// convention).
const (
	protoUnknown = iota
	protoHTTP
	protoHTTP2
	protoTCP
)

// A port's Protocol is "TCP" (Kubernetes' protocol) unless it has an
// appProtocol; that default says nothing, so the name decides then.
func portProtocol(p model.ServicePort) int {
	if p.Protocol != "" && p.Protocol != "TCP" {
		if r := protocolOf(strings.ToLower(p.Protocol)); r != protoUnknown {
			return r
		}
	}
	name := strings.ToLower(p.Name)
	if i := strings.IndexByte(name, '-'); i > 0 {
		name = name[:i]
	}
	return protocolOf(name)
}

func protocolOf(s string) int {
	switch s {
	case "http", "http1", "http/1.1":
		return protoHTTP
	case "http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c":
		return protoHTTP2
	case "tcp", "tls", "https", "mongo", "mysql", "redis", "kubernetes.io/ws", "kubernetes.io/wss":
		return protoTCP
	}
	return protoUnknown
}

// makeEndpoints returns the endpoints of a service port: podIP:targetPort
// of each workload, healthy when ready, with its identity, HBONE port and
// HBONE over QUIC advertisement (hbone_quic, with the pod's node) in
// filter_metadata["ambit"] (waypoint/ENVOY.md). Workloads whose target
// port is unknown (a named port not resolved) are left out.
func makeEndpoints(s *model.Snapshot, name string, svc *model.Service, port model.ServicePort) *endpoint.ClusterLoadAssignment {
	cla := &endpoint.ClusterLoadAssignment{ClusterName: name}
	var lbs []*endpoint.LbEndpoint
	for _, ep := range svc.Endpoints {
		w := s.Workloads[ep.WorkloadUID]
		if w == nil || len(w.Addresses) == 0 {
			continue
		}
		tp := port.TargetPort
		if p, ok := ep.Ports[port.Port]; ok {
			tp = p
		}
		if tp == 0 {
			continue
		}
		lbs = append(lbs, makeLbEndpoint(w, tp))
	}
	slices.SortFunc(lbs, func(a, b *endpoint.LbEndpoint) int {
		x, y := a.GetEndpoint().GetAddress().GetSocketAddress(), b.GetEndpoint().GetAddress().GetSocketAddress()
		if c := strings.Compare(x.GetAddress(), y.GetAddress()); c != 0 {
			return c
		}
		return int(x.GetPortValue()) - int(y.GetPortValue())
	})
	if len(lbs) > 0 {
		cla.Endpoints = []*endpoint.LocalityLbEndpoints{{LbEndpoints: lbs}}
	}
	return cla
}

// makePodEndpoints returns the one endpoint of a workload port.
func makePodEndpoints(name string, w *model.Workload, port uint16) *endpoint.ClusterLoadAssignment {
	return &endpoint.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpoint.LocalityLbEndpoints{{
		LbEndpoints: []*endpoint.LbEndpoint{makeLbEndpoint(w, port)},
	}}}
}

func makeLbEndpoint(w *model.Workload, targetPort uint16) *endpoint.LbEndpoint {
	health := core.HealthStatus_HEALTHY
	if !w.Ready {
		health = core.HealthStatus_UNHEALTHY
	}
	str := structpb.NewStringValue
	md := &structpb.Struct{Fields: map[string]*structpb.Value{
		"identity":           str(w.Identity().String()),
		"workload":           str(cmpOr(w.WorkloadName, w.Name)),
		"namespace":          str(w.Namespace),
		"canonical_service":  str(w.CanonicalName),
		"canonical_revision": str(w.CanonicalRevision),
	}}
	if w.ClusterID != "" {
		md.Fields["cluster"] = str(w.ClusterID) // destination_cluster at the waypoint
	}
	if w.Enrolled {
		md.Fields["hbone_port"] = structpb.NewNumberValue(model.PortHBONE)
		if w.QUIC { // its ztunnel also serves HBONE over HTTP/3 (the pod's, namespace's or Node's ambit.dev/hbone-quic)
			md.Fields["hbone_quic"] = structpb.NewBoolValue(true)
			if w.Node != "" { // a waypoint on the same node dials HTTP/2: UDP to a local pod's 15008 is dropped
				md.Fields["node"] = str(w.Node)
			}
		}
	}
	return &endpoint.LbEndpoint{
		HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
			Address: socketAddress(w.Addresses[0].String(), uint32(targetPort)),
		}},
		HealthStatus: health,
		Metadata:     &core.Metadata{FilterMetadata: map[string]*structpb.Struct{"ambit": md}},
	}
}

func socketAddress(addr string, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Address:       addr,
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
