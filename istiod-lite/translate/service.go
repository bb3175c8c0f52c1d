package translate

import (
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/ambit-mesh/ambit/model"
)

// service translates the Service with key k (nil when it is not one the mesh
// routes: ExternalName, or rejected).
func (t *translator) service(k string) *model.Service {
	s := t.o.Services[k]
	if s == nil || s.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	const kind = "Service"
	var vips []netip.Addr
	for _, ip := range serviceIPs(s) {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			t.report(kind, s.Namespace, s.Name, ReasonInvalidService, "cluster IP %q is not an IP address", ip)
			return nil
		}
		vips = append(vips, a.Unmap())
	}
	// An address claimed by several services goes to the oldest; the others
	// are left out until the conflict is resolved.
	for _, ip := range serviceIPs(s) {
		for other := range t.o.servicesByIP[ip] {
			if o := t.o.Services[other]; o != nil && other != k && olderFirst(o, s) < 0 {
				t.report(kind, s.Namespace, s.Name, ReasonAddressConflict, "cluster IP %s is already used by Service %s", ip, other)
				return nil
			}
		}
	}
	type pk struct {
		port  int32
		proto corev1.Protocol
	}
	seen := map[pk]string{}
	var ports []model.ServicePort
	for _, p := range s.Spec.Ports {
		proto := p.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		if prev, dup := seen[pk{p.Port, proto}]; dup {
			t.report(kind, s.Namespace, s.Name, ReasonPortConflict, "port %d/%s is declared twice (%q and %q)", p.Port, proto, prev, p.Name)
			return nil
		}
		seen[pk{p.Port, proto}] = p.Name
		if p.Port <= 0 || p.Port > 65535 {
			t.report(kind, s.Namespace, s.Name, ReasonInvalidService, "port %d is out of range", p.Port)
			return nil
		}
		if proto != corev1.ProtocolTCP {
			continue // the mesh carries TCP only
		}
		sp := model.ServicePort{Name: p.Name, Port: uint16(p.Port), Protocol: string(proto)}
		if p.AppProtocol != nil {
			sp.Protocol = *p.AppProtocol
		}
		if p.TargetPort.IntVal > 0 && p.TargetPort.IntVal <= 65535 && p.TargetPort.StrVal == "" {
			sp.TargetPort = uint16(p.TargetPort.IntVal)
		} else if p.TargetPort.StrVal == "" {
			sp.TargetPort = uint16(p.Port)
		}
		ports = append(ports, sp)
	}
	ns := t.o.Namespaces[s.Namespace]
	var nsLabels map[string]string
	if ns != nil {
		nsLabels = ns.Labels
	}
	out := &model.Service{
		Name:      s.Name,
		Namespace: s.Namespace,
		Hostname:  s.Name + "." + s.Namespace + ".svc." + t.opts.DomainSuffix,
		VIPs:      vips,
		Ports:     ports,
	}
	if slicesOf := t.o.slicesBySvc[k]; len(slicesOf) > 0 {
		out.Endpoints = t.sliceEndpoints(s, ports, slicesOf)
	} else {
		out.Endpoints = t.selectorEndpoints(s, ports)
	}
	if t.isWaypoint(s.Namespace, s.Name) {
		return out // a waypoint's own Service does not go through a waypoint
	}
	if name, wns, explicit := useWaypoint(s.Labels, s.Namespace, nsLabels); name != "" {
		out.Waypoint = t.waypoint(kind, s.Namespace, s.Name, wns, name, true, explicit)
	}
	return out
}

// endpointPorts maps service ports to this endpoint's target ports where they
// differ from the service's TargetPort (named target ports, always).
func endpointPorts(svc *corev1.Service, ports []model.ServicePort, resolve func(svcPort corev1.ServicePort) uint16) map[uint16]uint16 {
	var m map[uint16]uint16
	for _, sp := range svc.Spec.Ports {
		i := slices.IndexFunc(ports, func(p model.ServicePort) bool { return int32(p.Port) == sp.Port })
		if i < 0 {
			continue
		}
		tp := resolve(sp)
		if tp == 0 || tp == ports[i].TargetPort {
			continue
		}
		if m == nil {
			m = map[uint16]uint16{}
		}
		m[ports[i].Port] = tp
	}
	return m
}

func (t *translator) selectorEndpoints(s *corev1.Service, ports []model.ServicePort) []model.Endpoint {
	if len(s.Spec.Selector) == 0 {
		return nil
	}
	var eps []model.Endpoint
	for _, p := range t.candidates(s.Namespace, s.Spec.Selector) {
		if !selectorMatches(s.Spec.Selector, p.Labels) || !isWorkload(p) {
			continue
		}
		eps = append(eps, model.Endpoint{
			WorkloadUID: WorkloadUID(t.opts.ClusterID, p.Namespace, p.Name),
			Ports: endpointPorts(s, ports, func(sp corev1.ServicePort) uint16 {
				if sp.TargetPort.StrVal == "" {
					return 0
				}
				return namedPort(p, sp.TargetPort.StrVal)
			}),
		})
	}
	slices.SortFunc(eps, func(a, b model.Endpoint) int { return strings.Compare(a.WorkloadUID, b.WorkloadUID) })
	return eps
}

func (t *translator) sliceEndpoints(s *corev1.Service, ports []model.ServicePort, sl map[string]*discoveryv1.EndpointSlice) []model.Endpoint {
	seen := map[string]bool{}
	var eps []model.Endpoint
	for _, k := range sortedKeys(sl) {
		slice := sl[k]
		for _, e := range slice.Endpoints {
			if e.TargetRef == nil || e.TargetRef.Kind != "Pod" {
				continue
			}
			ns := e.TargetRef.Namespace
			if ns == "" {
				ns = slice.Namespace
			}
			p := t.o.Pods[Key(ns, e.TargetRef.Name)]
			if p == nil || !isWorkload(p) {
				continue
			}
			uid := WorkloadUID(t.opts.ClusterID, p.Namespace, p.Name)
			if seen[uid] {
				continue
			}
			seen[uid] = true
			eps = append(eps, model.Endpoint{
				WorkloadUID: uid,
				Ports: endpointPorts(s, ports, func(sp corev1.ServicePort) uint16 {
					for _, ep := range slice.Ports {
						if ep.Port != nil && ep.Name != nil && *ep.Name == sp.Name && *ep.Port > 0 && *ep.Port <= 65535 {
							return uint16(*ep.Port)
						}
					}
					return 0
				}),
			})
		}
	}
	slices.SortFunc(eps, func(a, b model.Endpoint) int { return strings.Compare(a.WorkloadUID, b.WorkloadUID) })
	return eps
}

// isWorkload mirrors workload(): the pod becomes a model workload.
func isWorkload(p *corev1.Pod) bool {
	return !p.Spec.HostNetwork && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed &&
		(p.Status.PodIP != "" || len(p.Status.PodIPs) > 0)
}

func namedPort(p *corev1.Pod, name string) uint16 {
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name == name && cp.ContainerPort > 0 && cp.ContainerPort <= 65535 {
				return uint16(cp.ContainerPort)
			}
		}
	}
	return 0
}

// candidates returns the pods of ns that carry one (the rarest) of sel's
// label pairs: a superset of the pods sel matches. The per-namespace index
// is built on first use and lives as long as the translator (one Build or
// Update), so a build costs O(pods + matches), not O(services × pods).
func (t *translator) candidates(ns string, sel map[string]string) []*corev1.Pod {
	if t.labelIndex == nil {
		t.labelIndex = map[string]map[string][]*corev1.Pod{}
	}
	idx, ok := t.labelIndex[ns]
	if !ok {
		idx = map[string][]*corev1.Pod{}
		for _, p := range t.o.podsByNS[ns] {
			for k, v := range p.Labels {
				idx[k+"="+v] = append(idx[k+"="+v], p)
			}
		}
		t.labelIndex[ns] = idx
	}
	var best []*corev1.Pod
	first := true
	for k, v := range sel {
		c := idx[k+"="+v]
		if first || len(c) < len(best) {
			best, first = c, false
		}
	}
	return best
}
