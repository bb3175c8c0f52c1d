// Package envoy builds the Envoy v3 resources (LDS, RDS, CDS, EDS) of one
// waypoint from the model: a pure function, golden-tested, whose output is the
// subset of Envoy that waypoint/ENVOY.md lists and the waypoint implements.
//
// Layout (names as istiod's waypoint config):
//   - one listener, main_internal, with a filter chain per (service VIP set,
//     port) of the services bound to the waypoint: HTTP chains
//     (inbound-vip|<port>|http|<host>) carry an HTTP connection manager with
//     the RBAC filters of the waypoint's L7 policies and an RDS route config
//     of the same name; TCP chains (inbound-vip|<port>|tcp|<host>) a TCP proxy,
//     after a network RBAC filter when policies apply;
//   - a route config per HTTP chain: the GAMMA routes attached to the
//     service (HTTPRoute and GRPCRoute), in Gateway API precedence order, or
//     a default route to the service itself with Istio's default retries;
//   - an EDS cluster outbound|<port>||<host> per service port reached (the
//     bound services' ports, route backends and mirrors), with its
//     DestinationRule's settings mapped as Istio maps them;
//   - its endpoints: podIP:targetPort, with the pod's identity and HBONE port
//     in filter_metadata["ambit"].
package envoy

import (
	"cmp"
	"fmt"
	"slices"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"github.com/ambit-mesh/ambit/model"
)

// Resources are one waypoint's Envoy resources.
type Resources struct {
	Listeners []*listener.Listener
	Routes    []*route.RouteConfiguration
	Clusters  []*cluster.Cluster
	Endpoints []*endpoint.ClusterLoadAssignment
}

// Waypoint is the key of a waypoint: its Gateway's namespace and name.
type Waypoint struct {
	Namespace string
	Name      string
}

// Names.
const (
	ListenerName = "main_internal"
)

// ClusterName is the name of the cluster of a service port.
func ClusterName(port uint16, hostname string) string {
	return fmt.Sprintf("outbound|%d||%s", port, hostname)
}

// ForWaypoint returns the resources of waypoint wp in snapshot s: the
// services bound to it, their routes, clusters and endpoints, and its L7
// policies. It is pure: the same snapshot gives the same resources, in a
// stable order.
func ForWaypoint(s *model.Snapshot, wp Waypoint) (*Resources, error) {
	if s == nil {
		return nil, fmt.Errorf("envoy: no snapshot")
	}
	b := newBuilder(s, wp)
	var chains []*listener.FilterChain
	var routes []*route.RouteConfiguration
	for _, svc := range b.boundServices() {
		for _, sp := range sortedPorts(svc.Ports) {
			c, rc, err := b.makeChain(svc, sp)
			if err != nil {
				return nil, fmt.Errorf("envoy: service %s port %d: %w", svc.Key(), sp.Port, err)
			}
			if c == nil {
				continue
			}
			chains = append(chains, c)
			if rc != nil {
				routes = append(routes, rc)
			}
		}
	}
	for _, w := range b.boundWorkloads() {
		for _, pp := range b.workloadPorts(w) {
			c, rc := b.makePodChain(w, pp)
			chains = append(chains, c)
			if rc != nil {
				routes = append(routes, rc)
			}
		}
	}
	out := &Resources{Listeners: []*listener.Listener{makeListener(chains)}, Routes: routes}
	for _, name := range sortedKeys(b.clusters) {
		ref := b.clusters[name]
		if ref.pod != nil {
			out.Clusters = append(out.Clusters, makeCluster(name, ref.port, nil))
			out.Endpoints = append(out.Endpoints, makePodEndpoints(name, ref.pod, ref.port.Port))
			continue
		}
		out.Clusters = append(out.Clusters, makeCluster(name, ref.port, b.destinationRule(ref.svc)))
		out.Endpoints = append(out.Endpoints, makeEndpoints(s, name, ref.svc, ref.port))
	}
	return out, nil
}

// builder holds one ForWaypoint call's state.
type builder struct {
	s        *model.Snapshot
	wp       Waypoint
	clusters map[string]clusterRef // the clusters routes and chains name

	// indexes of s, built once
	routes   map[string][]*model.HTTPRoute     // "<ns>/<service name>" -> routes with an accepted parentRef to it, by kind and key
	policies []*model.WaypointPolicy           // by key
	drs      map[string]*model.DestinationRule // Service.Key() -> its rule (the first by key)
	podPorts map[string][]model.ServicePort    // workload UID -> its ports; built on first use
}

func newBuilder(s *model.Snapshot, wp Waypoint) *builder {
	b := &builder{s: s, wp: wp, clusters: map[string]clusterRef{}, routes: map[string][]*model.HTTPRoute{}, drs: map[string]*model.DestinationRule{}}
	for _, m := range []map[string]*model.HTTPRoute{s.HTTPRoutes, s.GRPCRoutes} {
		for _, k := range sortedKeys(m) {
			r := m[k]
			seen := map[string]bool{}
			for i := range r.Parents {
				p := &r.Parents[i]
				if key := p.Namespace + "/" + p.Name; p.Kind == "Service" && p.Accepted() && !seen[key] {
					seen[key] = true
					b.routes[key] = append(b.routes[key], r)
				}
			}
		}
	}
	for _, k := range sortedKeys(s.WaypointPolicies) {
		b.policies = append(b.policies, s.WaypointPolicies[k])
	}
	for _, k := range sortedKeys(s.DestinationRules) {
		dr := s.DestinationRules[k]
		if b.drs[dr.Service] == nil {
			b.drs[dr.Service] = dr
		}
	}
	return b
}

// clusterRef is what a cluster reaches: a service port, or (pod set) one
// workload's port.
type clusterRef struct {
	svc  *model.Service
	pod  *model.Workload
	port model.ServicePort
}

// boundServices returns the services bound to the waypoint, by key.
func (b *builder) boundServices() []*model.Service {
	var out []*model.Service
	for _, svc := range b.s.Services {
		if w := svc.Waypoint; w != nil && w.Name == b.wp.Name && w.Namespace == b.wp.Namespace && len(svc.VIPs) > 0 {
			out = append(out, svc)
		}
	}
	slices.SortFunc(out, func(a, b *model.Service) int { return cmp.Compare(a.Key(), b.Key()) })
	return out
}

// boundWorkloads returns the workloads bound to the waypoint (for
// traffic addressed to their own IPs: waypoint-for workload or all), by
// UID.
func (b *builder) boundWorkloads() []*model.Workload {
	var out []*model.Workload
	for _, w := range b.s.Workloads {
		if r := w.Waypoint; r != nil && r.Name == b.wp.Name && r.Namespace == b.wp.Namespace && len(w.Addresses) > 0 {
			out = append(out, w)
		}
	}
	slices.SortFunc(out, func(a, b *model.Workload) int { return cmp.Compare(a.UID, b.UID) })
	return out
}

// workloadPorts returns the ports a bound workload serves: the target
// ports of the services it backs (the model has no container ports), each
// with the service port's name and protocol (the first service by key
// wins), by port.
func (b *builder) workloadPorts(w *model.Workload) []model.ServicePort {
	if b.podPorts == nil {
		b.podPorts = map[string][]model.ServicePort{}
		for _, k := range sortedKeys(b.s.Services) {
			svc := b.s.Services[k]
			for _, ep := range svc.Endpoints {
				for _, sp := range svc.Ports {
					tp := sp.TargetPort
					if p, ok := ep.Ports[sp.Port]; ok {
						tp = p
					}
					if tp == 0 || slices.ContainsFunc(b.podPorts[ep.WorkloadUID], func(p model.ServicePort) bool { return p.Port == tp }) {
						continue
					}
					b.podPorts[ep.WorkloadUID] = append(b.podPorts[ep.WorkloadUID], model.ServicePort{Name: sp.Name, Port: tp, TargetPort: tp, Protocol: sp.Protocol})
				}
			}
		}
	}
	return sortedPorts(b.podPorts[w.UID])
}

// useCluster records the cluster of a service port and returns its name;
// ok is false when the service or port is not in the model.
func (b *builder) useCluster(svcKey string, port uint16) (string, bool) {
	svc := b.s.Services[svcKey]
	if svc == nil {
		return "", false
	}
	for _, sp := range svc.Ports {
		if sp.Port == port {
			name := ClusterName(port, svc.Hostname)
			b.clusters[name] = clusterRef{svc: svc, port: sp}
			return name, true
		}
	}
	return "", false
}

// destinationRule returns the DestinationRule of a service: the first by
// key when several name it.
func (b *builder) destinationRule(svc *model.Service) *model.DestinationRule {
	return b.drs[svc.Key()]
}

func sortedPorts(ps []model.ServicePort) []model.ServicePort {
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b model.ServicePort) int { return cmp.Compare(a.Port, b.Port) })
	return out
}

func sortedKeys[T any](m map[string]T) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
