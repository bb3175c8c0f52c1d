package envoy

import (
	"fmt"
	"net/netip"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttp "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnet "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ambit-mesh/ambit/model"
)

// Filter names.
const (
	filterHCM      = "envoy.filters.network.http_connection_manager"
	filterTCPProxy = "envoy.filters.network.tcp_proxy"
	filterNetRBAC  = "envoy.filters.network.rbac"
	filterRBAC     = "envoy.filters.http.rbac"
	filterRouter   = "envoy.filters.http.router"
)

func makeListener(chains []*listener.FilterChain) *listener.Listener {
	return &listener.Listener{
		Name:         ListenerName,
		Address:      socketAddress("0.0.0.0", model.PortHBONE),
		FilterChains: chains,
	}
}

// makeChain returns the filter chain of a bound service port, and its
// route config when it is an HTTP chain. A port is HTTP when its protocol
// says so or a route attaches to it; TCP otherwise.
func (b *builder) makeChain(svc *model.Service, sp model.ServicePort) (*listener.FilterChain, *route.RouteConfiguration, error) {
	routes := b.attachedRoutes(svc, sp.Port)
	proto := portProtocol(sp)
	http := proto == protoHTTP || proto == protoHTTP2 || (proto == protoUnknown && len(routes) > 0)
	deny, allow := b.policiesFor(svc)
	cl, _ := b.useCluster(svc.Key(), sp.Port)
	if !http {
		name := fmt.Sprintf("inbound-vip|%d|tcp|%s", sp.Port, svc.Hostname)
		return makeTCPChain(name, svc.VIPs, sp.Port, cl, deny, allow), nil, nil
	}
	name := fmt.Sprintf("inbound-vip|%d|http|%s", sp.Port, svc.Hostname)
	var rc *route.RouteConfiguration
	if len(routes) == 0 {
		rc = makeDefaultRouteConfig(name, cl)
	} else {
		rc = b.makeRouteConfig(name, routes)
	}
	return makeHTTPChain(name, svc.VIPs, sp.Port, deny, allow), rc, nil
}

// makePodChain returns the filter chain of a bound workload's port (a
// target port of a service it backs; pod-addressed traffic, waypoint-for
// workload or all), and its route config when it is HTTP: a default route
// to the pod itself. Only policies targeting the waypoint's Gateway apply.
func (b *builder) makePodChain(w *model.Workload, pp model.ServicePort) (*listener.FilterChain, *route.RouteConfiguration) {
	deny, allow := b.policiesFor(nil)
	addr := w.Addresses[0].String()
	cl := ClusterName(pp.Port, addr)
	b.clusters[cl] = clusterRef{pod: w, port: pp}
	name := fmt.Sprintf("inbound-pod|%d|%s", pp.Port, addr)
	proto := portProtocol(pp)
	if proto != protoHTTP && proto != protoHTTP2 {
		return makeTCPChain(name, w.Addresses, pp.Port, cl, deny, allow), nil
	}
	return makeHTTPChain(name, w.Addresses, pp.Port, deny, allow), makeDefaultRouteConfig(name, cl)
}

func makeChainMatch(addrs []netip.Addr, port uint16) *listener.FilterChainMatch {
	match := &listener.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(port))}
	for _, a := range addrs {
		match.PrefixRanges = append(match.PrefixRanges, &core.CidrRange{AddressPrefix: a.String(), PrefixLen: wrapperspb.UInt32(uint32(a.BitLen()))})
	}
	return match
}

// makeTCPChain: network RBAC filters (DENY, then ALLOW) and a TCP proxy.
func makeTCPChain(name string, addrs []netip.Addr, port uint16, cluster string, deny, allow []*model.WaypointPolicy) *listener.FilterChain {
	var filters []*listener.Filter
	for _, rb := range []*rbacRules{makeRBAC(model.ActionDeny, deny, true), makeRBAC(model.ActionAllow, allow, true)} {
		if rb != nil {
			filters = append(filters, &listener.Filter{Name: filterNetRBAC, ConfigType: &listener.Filter_TypedConfig{
				TypedConfig: mustAny(&rbacnet.RBAC{StatPrefix: name, Rules: rb.rules}),
			}})
		}
	}
	filters = append(filters, &listener.Filter{Name: filterTCPProxy, ConfigType: &listener.Filter_TypedConfig{
		TypedConfig: mustAny(&tcpproxy.TcpProxy{StatPrefix: name, ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: cluster}}),
	}})
	return &listener.FilterChain{Name: name, FilterChainMatch: makeChainMatch(addrs, port), Filters: filters}
}

// makeHTTPChain: an HTTP connection manager with the RDS route config of
// the chain's name, RBAC filters (DENY, then ALLOW) and the router.
func makeHTTPChain(name string, addrs []netip.Addr, port uint16, deny, allow []*model.WaypointPolicy) *listener.FilterChain {
	var httpFilters []*hcm.HttpFilter
	for _, rb := range []*rbacRules{makeRBAC(model.ActionDeny, deny, false), makeRBAC(model.ActionAllow, allow, false)} {
		if rb != nil {
			httpFilters = append(httpFilters, &hcm.HttpFilter{Name: filterRBAC, ConfigType: &hcm.HttpFilter_TypedConfig{
				TypedConfig: mustAny(&rbachttp.RBAC{Rules: rb.rules}),
			}})
		}
	}
	httpFilters = append(httpFilters, &hcm.HttpFilter{Name: filterRouter, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})}})
	m := &hcm.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{
			ConfigSource: ads(), RouteConfigName: name,
		}},
		HttpFilters: httpFilters,
	}
	return &listener.FilterChain{Name: name, FilterChainMatch: makeChainMatch(addrs, port), Filters: []*listener.Filter{{
		Name: filterHCM, ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(m)},
	}}}
}

// policiesFor returns the waypoint policies that apply to a service (those
// targeting the waypoint's Gateway or the service; svc nil: the Gateway
// only), DENY and ALLOW, by key.
func (b *builder) policiesFor(svc *model.Service) (deny, allow []*model.WaypointPolicy) {
	for _, p := range b.policies {
		applies := false
		for _, t := range p.Targets {
			switch t.Kind {
			case "Gateway":
				applies = applies || (p.Namespace == b.wp.Namespace && t.Name == b.wp.Name)
			case "Service":
				applies = applies || (svc != nil && p.Namespace == svc.Namespace && t.Name == svc.Name)
			}
		}
		if !applies {
			continue
		}
		if p.Action == model.ActionDeny {
			deny = append(deny, p)
		} else {
			allow = append(allow, p)
		}
	}
	return deny, allow
}

// mustAny wraps m; it cannot fail for the generated Envoy types used here.
func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(fmt.Sprintf("envoy: wrapping %T: %v", m, err))
	}
	return a
}
