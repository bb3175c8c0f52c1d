package workload

import (
	"fmt"
	"net/netip"

	"github.com/ambit-mesh/ambit/model"
)

// Type URLs of the resources.
const (
	TypeURLPrefix          = "type.googleapis.com/"
	WorkloadType           = TypeURLPrefix + "ambit.workload.v1.Workload"
	ServiceType            = TypeURLPrefix + "ambit.workload.v1.Service"
	AuthorizationType      = TypeURLPrefix + "ambit.workload.v1.Authorization"
	PeerAuthenticationType = TypeURLPrefix + "ambit.workload.v1.PeerAuthentication"
)

// TypeURLs lists every type a ztunnel subscribes to, in subscription order.
var TypeURLs = []string{WorkloadType, ServiceType, AuthorizationType, PeerAuthenticationType}

func addrBytes(a netip.Addr) []byte { return a.Unmap().AsSlice() }

func toAddr(b []byte) (netip.Addr, error) {
	a, ok := netip.AddrFromSlice(b)
	if !ok {
		return netip.Addr{}, fmt.Errorf("address of %d bytes", len(b))
	}
	return a.Unmap(), nil
}

func addrs(as []netip.Addr) [][]byte {
	if len(as) == 0 {
		return nil
	}
	out := make([][]byte, len(as))
	for i, a := range as {
		out[i] = addrBytes(a)
	}
	return out
}

func toAddrs(bs [][]byte) ([]netip.Addr, error) {
	if len(bs) == 0 {
		return nil, nil
	}
	out := make([]netip.Addr, len(bs))
	for i, b := range bs {
		a, err := toAddr(b)
		if err != nil {
			return nil, err
		}
		out[i] = a
	}
	return out, nil
}

func nilIfEmpty[K comparable, V any](m map[K]V) map[K]V {
	if len(m) == 0 {
		return nil
	}
	return m
}

// FromWorkload converts a model workload.
func FromWorkload(w *model.Workload) *Workload {
	out := &Workload{
		Uid: w.UID, Name: w.Name, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount,
		TrustDomain: w.TrustDomain, Node: w.Node, Addresses: addrs(w.Addresses), Labels: nilIfEmpty(w.Labels),
		Ready: w.Ready, Waypoint: fromWaypoint(w.Waypoint), CanonicalName: w.CanonicalName,
		CanonicalRevision: w.CanonicalRevision, WorkloadName: w.WorkloadName, ClusterId: w.ClusterID,
		HboneQuic: w.QUIC, WaypointBypass: w.WaypointBypass,
	}
	if w.Enrolled {
		out.TunnelProtocol = TunnelProtocol_HBONE
	}
	return out
}

// ToWorkload converts to the model; it fails on a malformed address.
func ToWorkload(w *Workload) (*model.Workload, error) {
	as, err := toAddrs(w.GetAddresses())
	if err != nil {
		return nil, fmt.Errorf("workload %s: %w", w.GetUid(), err)
	}
	wp, err := toWaypoint(w.GetWaypoint())
	if err != nil {
		return nil, fmt.Errorf("workload %s: %w", w.GetUid(), err)
	}
	if w.GetUid() == "" {
		return nil, fmt.Errorf("workload without uid")
	}
	return &model.Workload{
		UID: w.GetUid(), Name: w.GetName(), Namespace: w.GetNamespace(), ServiceAccount: w.GetServiceAccount(),
		TrustDomain: w.GetTrustDomain(), Node: w.GetNode(), Addresses: as, Labels: nilIfEmpty(w.GetLabels()),
		Enrolled: w.GetTunnelProtocol() == TunnelProtocol_HBONE, Ready: w.GetReady(), Waypoint: wp,
		CanonicalName: w.GetCanonicalName(), CanonicalRevision: w.GetCanonicalRevision(),
		WorkloadName: w.GetWorkloadName(), ClusterID: w.GetClusterId(), QUIC: w.GetHboneQuic(),
		WaypointBypass: w.GetWaypointBypass(),
	}, nil
}

func fromWaypoint(w *model.WaypointRef) *GatewayAddress {
	if w == nil {
		return nil
	}
	g := &GatewayAddress{Name: w.Name, Namespace: w.Namespace}
	if w.Address.IsValid() {
		g.Address = addrBytes(w.Address.Addr())
		g.HbonePort = uint32(w.Address.Port())
	}
	return g
}

func toWaypoint(g *GatewayAddress) (*model.WaypointRef, error) {
	if g == nil {
		return nil, nil
	}
	w := &model.WaypointRef{Name: g.GetName(), Namespace: g.GetNamespace()}
	if len(g.GetAddress()) > 0 {
		a, err := toAddr(g.GetAddress())
		if err != nil {
			return nil, fmt.Errorf("waypoint %s: %w", g.GetName(), err)
		}
		port := g.GetHbonePort()
		if port == 0 {
			port = model.PortHBONE
		}
		if port > 65535 {
			return nil, fmt.Errorf("waypoint %s: port %d", g.GetName(), port)
		}
		w.Address = netip.AddrPortFrom(a, uint16(port))
	}
	return w, nil
}

// ServiceName is the xDS resource name of a service: model.Service.Key().
func ServiceName(s *Service) string { return s.GetNamespace() + "/" + s.GetHostname() }

// FromService converts a model service.
func FromService(s *model.Service) *Service {
	out := &Service{Name: s.Name, Namespace: s.Namespace, Hostname: s.Hostname, Vips: addrs(s.VIPs), Waypoint: fromWaypoint(s.Waypoint)}
	for _, p := range s.Ports {
		out.Ports = append(out.Ports, &Port{Name: p.Name, ServicePort: uint32(p.Port), TargetPort: uint32(p.TargetPort), Protocol: p.Protocol})
	}
	for _, e := range s.Endpoints {
		ep := &Endpoint{WorkloadUid: e.WorkloadUID}
		if len(e.Ports) > 0 {
			ep.Ports = make(map[uint32]uint32, len(e.Ports))
			for k, v := range e.Ports {
				ep.Ports[uint32(k)] = uint32(v)
			}
		}
		out.Endpoints = append(out.Endpoints, ep)
	}
	return out
}

func port16(p uint32) (uint16, error) {
	if p > 65535 {
		return 0, fmt.Errorf("port %d out of range", p)
	}
	return uint16(p), nil
}

// ToService converts to the model.
func ToService(s *Service) (*model.Service, error) {
	vips, err := toAddrs(s.GetVips())
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", s.GetHostname(), err)
	}
	wp, err := toWaypoint(s.GetWaypoint())
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", s.GetHostname(), err)
	}
	out := &model.Service{Name: s.GetName(), Namespace: s.GetNamespace(), Hostname: s.GetHostname(), VIPs: vips, Waypoint: wp}
	for _, p := range s.GetPorts() {
		sp, err1 := port16(p.GetServicePort())
		tp, err2 := port16(p.GetTargetPort())
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("service %s: bad port %d->%d", s.GetHostname(), p.GetServicePort(), p.GetTargetPort())
		}
		out.Ports = append(out.Ports, model.ServicePort{Name: p.GetName(), Port: sp, TargetPort: tp, Protocol: p.GetProtocol()})
	}
	for _, e := range s.GetEndpoints() {
		ep := model.Endpoint{WorkloadUID: e.GetWorkloadUid()}
		if len(e.GetPorts()) > 0 {
			ep.Ports = make(map[uint16]uint16, len(e.GetPorts()))
			for k, v := range e.GetPorts() {
				kk, err1 := port16(k)
				vv, err2 := port16(v)
				if err1 != nil || err2 != nil {
					return nil, fmt.Errorf("service %s: bad endpoint port %d->%d", s.GetHostname(), k, v)
				}
				ep.Ports[kk] = vv
			}
		}
		out.Endpoints = append(out.Endpoints, ep)
	}
	return out, nil
}

func fromPrefixes(ps []netip.Prefix) []*Prefix {
	var out []*Prefix
	for _, p := range ps {
		out = append(out, &Prefix{Address: addrBytes(p.Addr()), Length: uint32(p.Bits())})
	}
	return out
}

func toPrefixes(ps []*Prefix) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, p := range ps {
		a, err := toAddr(p.GetAddress())
		if err != nil {
			return nil, err
		}
		if int(p.GetLength()) > a.BitLen() {
			return nil, fmt.Errorf("prefix length %d", p.GetLength())
		}
		out = append(out, netip.PrefixFrom(a, int(p.GetLength())))
	}
	return out, nil
}

func ports32(ps []uint16) []uint32 {
	var out []uint32
	for _, p := range ps {
		out = append(out, uint32(p))
	}
	return out
}

func ports16(ps []uint32) ([]uint16, error) {
	var out []uint16
	for _, p := range ps {
		q, err := port16(p)
		if err != nil {
			return nil, err
		}
		out = append(out, q)
	}
	return out, nil
}

// FromPolicy converts a model policy.
func FromPolicy(p *model.Policy) *Authorization {
	out := &Authorization{Name: p.Name, Namespace: p.Namespace, Selector: nilIfEmpty(p.Selector), MeshWide: p.MeshWide}
	if p.Action == model.ActionDeny {
		out.Action = Action_DENY
	}
	for _, r := range p.Rules {
		pr := &Rule{}
		for _, s := range r.From {
			pr.From = append(pr.From, &Source{
				Principals: s.Principals, NotPrincipals: s.NotPrincipals, Namespaces: s.Namespaces, NotNamespaces: s.NotNamespaces,
				IpBlocks: fromPrefixes(s.IPBlocks), NotIpBlocks: fromPrefixes(s.NotIPBlocks),
			})
		}
		for _, t := range r.To {
			pr.To = append(pr.To, &Target{Ports: ports32(t.Ports), NotPorts: ports32(t.NotPorts)})
		}
		out.Rules = append(out.Rules, pr)
	}
	return out
}

// ToPolicy converts to the model. Rules is never nil.
func ToPolicy(a *Authorization) (*model.Policy, error) {
	p := &model.Policy{Name: a.GetName(), Namespace: a.GetNamespace(), Selector: nilIfEmpty(a.GetSelector()), MeshWide: a.GetMeshWide(), Rules: []model.Rule{}}
	switch a.GetAction() {
	case Action_ALLOW:
		p.Action = model.ActionAllow
	case Action_DENY:
		p.Action = model.ActionDeny
	default:
		return nil, fmt.Errorf("policy %s/%s: unknown action %d", a.GetNamespace(), a.GetName(), a.GetAction())
	}
	for _, r := range a.GetRules() {
		var mr model.Rule
		for _, s := range r.GetFrom() {
			ips, err := toPrefixes(s.GetIpBlocks())
			if err != nil {
				return nil, fmt.Errorf("policy %s/%s: %w", a.GetNamespace(), a.GetName(), err)
			}
			notIPs, err := toPrefixes(s.GetNotIpBlocks())
			if err != nil {
				return nil, fmt.Errorf("policy %s/%s: %w", a.GetNamespace(), a.GetName(), err)
			}
			mr.From = append(mr.From, model.Source{
				Principals: s.GetPrincipals(), NotPrincipals: s.GetNotPrincipals(), Namespaces: s.GetNamespaces(),
				NotNamespaces: s.GetNotNamespaces(), IPBlocks: ips, NotIPBlocks: notIPs,
			})
		}
		for _, t := range r.GetTo() {
			ps, err1 := ports16(t.GetPorts())
			nps, err2 := ports16(t.GetNotPorts())
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("policy %s/%s: bad port", a.GetNamespace(), a.GetName())
			}
			mr.To = append(mr.To, model.Target{Ports: ps, NotPorts: nps})
		}
		p.Rules = append(p.Rules, mr)
	}
	return p, nil
}

// FromPeerAuthn converts a model PeerAuthentication.
func FromPeerAuthn(p *model.PeerAuthentication) *PeerAuthentication {
	out := &PeerAuthentication{Name: p.Name, Namespace: p.Namespace, Selector: nilIfEmpty(p.Selector), MeshWide: p.MeshWide}
	switch p.Mode {
	case model.MTLSStrict:
		out.Mode = MTLSMode_STRICT
	case model.MTLSPermissive:
		out.Mode = MTLSMode_PERMISSIVE
	case model.MTLSDisable:
		out.Mode = MTLSMode_DISABLE
	}
	return out
}

// ToPeerAuthn converts to the model.
func ToPeerAuthn(p *PeerAuthentication) (*model.PeerAuthentication, error) {
	out := &model.PeerAuthentication{Name: p.GetName(), Namespace: p.GetNamespace(), Selector: nilIfEmpty(p.GetSelector()), MeshWide: p.GetMeshWide()}
	switch p.GetMode() {
	case MTLSMode_UNSET:
		out.Mode = model.MTLSUnset
	case MTLSMode_STRICT:
		out.Mode = model.MTLSStrict
	case MTLSMode_PERMISSIVE:
		out.Mode = model.MTLSPermissive
	case MTLSMode_DISABLE:
		out.Mode = model.MTLSDisable
	default:
		return nil, fmt.Errorf("peer authentication %s/%s: unknown mode %d", p.GetNamespace(), p.GetName(), p.GetMode())
	}
	return out, nil
}
