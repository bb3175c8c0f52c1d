package translate

import (
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/model"
)

// Objects is the input of translation: every object ambit reads, keyed by
// "<namespace>/<name>" (namespaces by name), with the indexes translation
// needs. The registry owns it and mutates it with Set and Delete between
// translations; translation only reads it. Not safe for concurrent use.
type Objects struct {
	Namespaces            map[string]*corev1.Namespace
	Pods                  map[string]*corev1.Pod
	Services              map[string]*corev1.Service
	EndpointSlices        map[string]*discoveryv1.EndpointSlice
	Gateways              map[string]*gwv1.Gateway
	HTTPRoutes            map[string]*gwv1.HTTPRoute
	GRPCRoutes            map[string]*gwv1.GRPCRoute
	DestinationRules      map[string]*networkingv1.DestinationRule
	AuthorizationPolicies map[string]*security.AuthorizationPolicy
	PeerAuthentications   map[string]*security.PeerAuthentication
	// Nodes are read for their labels only (model.LabelHBONEQUIC), by name.
	Nodes map[string]*corev1.Node

	podsByNS     map[string]map[string]*corev1.Pod                // namespace -> key -> pod
	podsByNode   map[string]map[string]*corev1.Pod                // node name -> key -> pod
	servicesByNS map[string]map[string]*corev1.Service            // namespace -> key -> service
	slicesBySvc  map[string]map[string]*discoveryv1.EndpointSlice // service key -> slice key -> slice
	servicesByIP map[string]map[string]bool                       // cluster IP -> service keys
}

// NewObjects returns an empty set.
func NewObjects() *Objects {
	return &Objects{
		Namespaces:            map[string]*corev1.Namespace{},
		Pods:                  map[string]*corev1.Pod{},
		Services:              map[string]*corev1.Service{},
		EndpointSlices:        map[string]*discoveryv1.EndpointSlice{},
		Gateways:              map[string]*gwv1.Gateway{},
		HTTPRoutes:            map[string]*gwv1.HTTPRoute{},
		GRPCRoutes:            map[string]*gwv1.GRPCRoute{},
		DestinationRules:      map[string]*networkingv1.DestinationRule{},
		AuthorizationPolicies: map[string]*security.AuthorizationPolicy{},
		PeerAuthentications:   map[string]*security.PeerAuthentication{},
		Nodes:                 map[string]*corev1.Node{},
		podsByNS:              map[string]map[string]*corev1.Pod{},
		podsByNode:            map[string]map[string]*corev1.Pod{},
		servicesByNS:          map[string]map[string]*corev1.Service{},
		slicesBySvc:           map[string]map[string]*discoveryv1.EndpointSlice{},
		servicesByIP:          map[string]map[string]bool{},
	}
}

// Key returns the "<namespace>/<name>" key of an object.
func Key(namespace, name string) string {
	if namespace == "" {
		return name
	}
	return namespace + "/" + name
}

// Set inserts or replaces obj (one of the types of Objects' fields) and
// returns the Changes it makes. Other types are ignored.
func (o *Objects) Set(obj any) Changes {
	var ch Changes
	switch v := obj.(type) {
	case *corev1.Namespace:
		o.Namespaces[v.Name] = v
		ch.Namespaces = []string{v.Name}
	case *corev1.Pod:
		k := Key(v.Namespace, v.Name)
		if old := o.Pods[k]; old != nil && old.Spec.NodeName != "" {
			delIndex(o.podsByNode, old.Spec.NodeName, k)
		}
		o.Pods[k] = v
		addIndex(o.podsByNS, v.Namespace, k, v)
		if v.Spec.NodeName != "" {
			addIndex(o.podsByNode, v.Spec.NodeName, k, v)
		}
		ch.Pods = []string{k}
	case *corev1.Node:
		old := o.Nodes[v.Name]
		o.Nodes[v.Name] = v
		if old == nil || nodeQUIC(old) != nodeQUIC(v) {
			ch.Pods = o.nodePods(v.Name)
		}
	case *corev1.Service:
		k := Key(v.Namespace, v.Name)
		ch.Services = o.serviceNeighbours(k)
		o.unindexServiceIPs(k)
		o.Services[k] = v
		addIndex(o.servicesByNS, v.Namespace, k, v)
		for _, ip := range serviceIPs(v) {
			if o.servicesByIP[ip] == nil {
				o.servicesByIP[ip] = map[string]bool{}
			}
			o.servicesByIP[ip][k] = true
		}
		ch.Services = append(ch.Services, o.serviceNeighbours(k)...)
	case *discoveryv1.EndpointSlice:
		k := Key(v.Namespace, v.Name)
		if old := o.EndpointSlices[k]; old != nil {
			if sk := sliceService(old); sk != "" {
				delIndex(o.slicesBySvc, sk, k)
				ch.Services = append(ch.Services, sk)
			}
		}
		o.EndpointSlices[k] = v
		if sk := sliceService(v); sk != "" {
			addIndex(o.slicesBySvc, sk, k, v)
			ch.Services = append(ch.Services, sk)
		}
	case *gwv1.Gateway:
		o.Gateways[Key(v.Namespace, v.Name)] = v
		ch.Full = true
	case *gwv1.HTTPRoute:
		k := Key(v.Namespace, v.Name)
		o.HTTPRoutes[k] = v
		ch.HTTPRoutes = []string{k}
	case *gwv1.GRPCRoute:
		k := Key(v.Namespace, v.Name)
		o.GRPCRoutes[k] = v
		ch.GRPCRoutes = []string{k}
	case *networkingv1.DestinationRule:
		k := Key(v.Namespace, v.Name)
		o.DestinationRules[k] = v
		ch.DestinationRules = []string{k}
	case *security.AuthorizationPolicy:
		k := Key(v.Namespace, v.Name)
		o.AuthorizationPolicies[k] = v
		ch.AuthorizationPolicies = []string{k}
	case *security.PeerAuthentication:
		k := Key(v.Namespace, v.Name)
		o.PeerAuthentications[k] = v
		ch.PeerAuthentications = []string{k}
	}
	return ch
}

// Delete removes the object of obj's type with key (as Key builds it) and
// returns the Changes it makes. obj may be a zero value of the type.
func (o *Objects) Delete(obj any, key string) Changes {
	var ch Changes
	switch obj.(type) {
	case *corev1.Namespace:
		delete(o.Namespaces, key)
		ch.Namespaces = []string{key}
	case *corev1.Pod:
		if p := o.Pods[key]; p != nil {
			delIndex(o.podsByNS, p.Namespace, key)
			if p.Spec.NodeName != "" {
				delIndex(o.podsByNode, p.Spec.NodeName, key)
			}
		}
		delete(o.Pods, key)
		ch.Pods = []string{key}
	case *corev1.Node:
		if old := o.Nodes[key]; old != nil {
			delete(o.Nodes, key)
			if nodeQUIC(old) {
				ch.Pods = o.nodePods(key)
			}
		}
	case *corev1.Service:
		ch.Services = o.serviceNeighbours(key)
		o.unindexServiceIPs(key)
		if s := o.Services[key]; s != nil {
			delIndex(o.servicesByNS, s.Namespace, key)
		}
		delete(o.Services, key)
	case *discoveryv1.EndpointSlice:
		if old := o.EndpointSlices[key]; old != nil {
			if sk := sliceService(old); sk != "" {
				delIndex(o.slicesBySvc, sk, key)
				ch.Services = []string{sk}
			}
		}
		delete(o.EndpointSlices, key)
	case *gwv1.Gateway:
		delete(o.Gateways, key)
		ch.Full = true
	case *gwv1.HTTPRoute:
		delete(o.HTTPRoutes, key)
		ch.HTTPRoutes = []string{key}
	case *gwv1.GRPCRoute:
		delete(o.GRPCRoutes, key)
		ch.GRPCRoutes = []string{key}
	case *networkingv1.DestinationRule:
		delete(o.DestinationRules, key)
		ch.DestinationRules = []string{key}
	case *security.AuthorizationPolicy:
		delete(o.AuthorizationPolicies, key)
		ch.AuthorizationPolicies = []string{key}
	case *security.PeerAuthentication:
		delete(o.PeerAuthentications, key)
		ch.PeerAuthentications = []string{key}
	}
	return ch
}

// nodePods returns the keys of the pods on node name.
func (o *Objects) nodePods(name string) []string {
	var out []string
	for k := range o.podsByNode[name] {
		out = append(out, k)
	}
	return out
}

// nodeQUIC reports whether node n advertises HBONE over QUIC for its pods
// (model.LabelHBONEQUIC=enabled): its pods' translation depends on it.
func nodeQUIC(n *corev1.Node) bool {
	return n != nil && n.Labels[model.LabelHBONEQUIC] == "enabled"
}

// serviceNeighbours returns key and the keys of services sharing one of its
// cluster IPs (whose conflict resolution its change can flip).
func (o *Objects) serviceNeighbours(key string) []string {
	out := []string{key}
	if s := o.Services[key]; s != nil {
		for _, ip := range serviceIPs(s) {
			for k := range o.servicesByIP[ip] {
				if k != key {
					out = append(out, k)
				}
			}
		}
	}
	return out
}

func (o *Objects) unindexServiceIPs(key string) {
	s := o.Services[key]
	if s == nil {
		return
	}
	for _, ip := range serviceIPs(s) {
		delete(o.servicesByIP[ip], key)
		if len(o.servicesByIP[ip]) == 0 {
			delete(o.servicesByIP, ip)
		}
	}
}

func serviceIPs(s *corev1.Service) []string {
	ips := s.Spec.ClusterIPs
	if len(ips) == 0 && s.Spec.ClusterIP != "" {
		ips = []string{s.Spec.ClusterIP}
	}
	out := ips[:0:0]
	for _, ip := range ips {
		if ip != "" && ip != corev1.ClusterIPNone {
			out = append(out, ip)
		}
	}
	return out
}

func sliceService(s *discoveryv1.EndpointSlice) string {
	if n := s.Labels[discoveryv1.LabelServiceName]; n != "" {
		return Key(s.Namespace, n)
	}
	return ""
}

func addIndex[T any](idx map[string]map[string]T, outer, inner string, v T) {
	m := idx[outer]
	if m == nil {
		m = map[string]T{}
		idx[outer] = m
	}
	m[inner] = v
}

func delIndex[T any](idx map[string]map[string]T, outer, inner string) {
	if m := idx[outer]; m != nil {
		delete(m, inner)
		if len(m) == 0 {
			delete(idx, outer)
		}
	}
}

// Changes names the objects that changed since the last translation (keys as
// in Objects). Full asks for a full rebuild (a waypoint Gateway changed).
type Changes struct {
	Full                  bool
	Namespaces            []string
	Pods                  []string
	Services              []string
	HTTPRoutes            []string
	GRPCRoutes            []string
	DestinationRules      []string
	AuthorizationPolicies []string
	PeerAuthentications   []string
}

// Merge adds c2 to c.
func (c *Changes) Merge(c2 Changes) {
	c.Full = c.Full || c2.Full
	c.Namespaces = append(c.Namespaces, c2.Namespaces...)
	c.Pods = append(c.Pods, c2.Pods...)
	c.Services = append(c.Services, c2.Services...)
	c.HTTPRoutes = append(c.HTTPRoutes, c2.HTTPRoutes...)
	c.GRPCRoutes = append(c.GRPCRoutes, c2.GRPCRoutes...)
	c.DestinationRules = append(c.DestinationRules, c2.DestinationRules...)
	c.AuthorizationPolicies = append(c.AuthorizationPolicies, c2.AuthorizationPolicies...)
	c.PeerAuthentications = append(c.PeerAuthentications, c2.PeerAuthentications...)
}

// Empty reports whether c names nothing.
func (c *Changes) Empty() bool {
	return !c.Full && len(c.Namespaces)+len(c.Pods)+len(c.Services)+len(c.HTTPRoutes)+
		len(c.GRPCRoutes)+len(c.DestinationRules)+
		len(c.AuthorizationPolicies)+len(c.PeerAuthentications) == 0
}
