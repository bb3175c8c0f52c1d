package envoy

import (
	"fmt"

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
	match := &listener.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(sp.Port))}
	for _, vip := range svc.VIPs {
		match.PrefixRanges = append(match.PrefixRanges, &core.CidrRange{AddressPrefix: vip.String(), PrefixLen: wrapperspb.UInt32(uint32(vip.BitLen()))})
	}
	deny, allow := b.policiesFor(svc)
	if !http {
		name := fmt.Sprintf("inbound-vip|%d|tcp|%s", sp.Port, svc.Hostname)
		cl, _ := b.useCluster(svc.Key(), sp.Port)
		var filters []*listener.Filter
		for _, rb := range []*rbacRules{makeRBAC(model.ActionDeny, deny, true), makeRBAC(model.ActionAllow, allow, true)} {
			if rb != nil {
				filters = append(filters, &listener.Filter{Name: filterNetRBAC, ConfigType: &listener.Filter_TypedConfig{
					TypedConfig: mustAny(&rbacnet.RBAC{StatPrefix: name, Rules: rb.rules}),
				}})
			}
		}
		filters = append(filters, &listener.Filter{Name: filterTCPProxy, ConfigType: &listener.Filter_TypedConfig{
			TypedConfig: mustAny(&tcpproxy.TcpProxy{StatPrefix: name, ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: cl}}),
		}})
		return &listener.FilterChain{Name: name, FilterChainMatch: match, Filters: filters}, nil, nil
	}
	name := fmt.Sprintf("inbound-vip|%d|http|%s", sp.Port, svc.Hostname)
	rc := b.makeRouteConfig(name, svc, sp, routes)
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
	chain := &listener.FilterChain{Name: name, FilterChainMatch: match, Filters: []*listener.Filter{{
		Name: filterHCM, ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(m)},
	}}}
	return chain, rc, nil
}

// policiesFor returns the waypoint policies that apply to a service (those
// targeting the waypoint's Gateway or the service), DENY and ALLOW, by
// key.
func (b *builder) policiesFor(svc *model.Service) (deny, allow []*model.WaypointPolicy) {
	for _, p := range b.policies {
		applies := false
		for _, t := range p.Targets {
			switch t.Kind {
			case "Gateway":
				applies = applies || (p.Namespace == b.wp.Namespace && t.Name == b.wp.Name)
			case "Service":
				applies = applies || (p.Namespace == svc.Namespace && t.Name == svc.Name)
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
