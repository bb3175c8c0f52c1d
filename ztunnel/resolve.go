package ztunnel

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/model"
)

// RouteKind says how an outbound connection is carried.
type RouteKind int

// Route kinds.
const (
	// RoutePassthrough: the destination is outside the mesh; plain TCP to it.
	RoutePassthrough RouteKind = iota
	// RouteDirect: the destination is a known workload that is not enrolled;
	// plain TCP to it.
	RouteDirect
	// RouteHBONE: an HBONE tunnel to Addr (<pod or waypoint IP>:15008).
	RouteHBONE
)

func (k RouteKind) String() string {
	switch k {
	case RoutePassthrough:
		return "passthrough"
	case RouteDirect:
		return "direct"
	case RouteHBONE:
		return "hbone"
	}
	return fmt.Sprintf("RouteKind(%d)", int(k))
}

// Route is the resolution of an outbound connection's original destination.
type Route struct {
	Kind RouteKind
	// Addr is where to connect: the destination itself for passthrough and
	// direct routes, <pod or waypoint IP>:15008 for HBONE.
	Addr netip.AddrPort
	// Target is the HBONE :authority: <pod IP>:<target port>, or the
	// original destination when tunnelling to a waypoint.
	Target netip.AddrPort
	// Peers are the identities the HBONE server may present.
	Peers []spiffeid.ID
	// Workload is the destination workload (nil for passthrough and when
	// the route goes to a waypoint).
	Workload *model.Workload
	// Service is the service the destination was addressed to, if any.
	Service *model.Service
	// Waypoint is set when the route goes to a waypoint.
	Waypoint *model.WaypointRef
}

// Resolution errors; the connection is closed.
var (
	ErrNoReadyEndpoint    = errors.New("no ready endpoint")
	ErrUnknownServicePort = errors.New("port not exposed by the service")
	ErrWaypointMissing    = errors.New("waypoint has no address")
)

// Resolve decides where an outbound connection from src (nil when unknown)
// to dst goes, over snap. A Service VIP is balanced over the service's ready
// endpoints (pick(n) chooses an index in [0, n); nil picks at random); a
// workload IP goes to that workload; a destination using a waypoint goes to
// the waypoint unless src is that waypoint; anything else passes through.
func Resolve(snap *model.Snapshot, src *model.Workload, dst netip.AddrPort, pick func(n int) int) (Route, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if svc := snap.ServiceByVIP(dst.Addr()); svc != nil {
		return resolveService(snap, src, svc, dst, pick)
	}
	w := snap.WorkloadByIP(dst.Addr())
	if w == nil {
		return Route{Kind: RoutePassthrough, Addr: dst, Target: dst}, nil
	}
	if w.Waypoint != nil && !isWaypoint(snap, src, w.Waypoint, w.Identity().TrustDomain()) {
		return waypointRoute(snap, w.Waypoint, w.Identity().TrustDomain(), dst, nil, pick)
	}
	return workloadRoute(w, dst, nil), nil
}

func resolveService(snap *model.Snapshot, src *model.Workload, svc *model.Service, dst netip.AddrPort, pick func(int) int) (Route, error) {
	i := slices.IndexFunc(svc.Ports, func(p model.ServicePort) bool { return p.Port == dst.Port() })
	if i < 0 {
		return Route{Service: svc}, fmt.Errorf("%w: %s port %d", ErrUnknownServicePort, svc.Hostname, dst.Port())
	}
	sp := svc.Ports[i]
	if svc.Waypoint != nil {
		td := serviceTrustDomain(snap, svc)
		if !isWaypoint(snap, src, svc.Waypoint, td) {
			return waypointRoute(snap, svc.Waypoint, td, dst, svc, pick)
		}
	}
	w, ep, ok := pickEndpoint(snap, svc, spiffeid.ID{}, pick)
	if !ok {
		return Route{Service: svc}, fmt.Errorf("%w: %s", ErrNoReadyEndpoint, svc.Hostname)
	}
	port := ep.Ports[sp.Port]
	if port == 0 {
		port = sp.TargetPort
	}
	if port == 0 {
		port = sp.Port
	}
	return workloadRoute(w, netip.AddrPortFrom(sameFamily(w.Addresses, dst.Addr()), port), svc), nil
}

// serviceTrustDomain is the trust domain of svc's endpoints (the first one
// the snapshot knows), else the default: the destination ztunnels check a
// waypoint's identity in their workload's trust domain (waypointIdentityFor).
func serviceTrustDomain(snap *model.Snapshot, svc *model.Service) spiffeid.TrustDomain {
	return endpointsOf(snap, svc).td
}

// pickEndpoint balances over svc's ready endpoints (pick(n) chooses an index
// in [0, n); nil picks at random); when want is not zero, only over those
// whose identity is want. ok is false when none is ready.
func pickEndpoint(snap *model.Snapshot, svc *model.Service, want spiffeid.ID, pick func(int) int) (w *model.Workload, ep model.Endpoint, ok bool) {
	ready := endpointsOf(snap, svc).ready
	n := len(ready)
	if !want.IsZero() {
		n = 0
		for _, r := range ready {
			if r.id == want {
				n++
			}
		}
	}
	if n == 0 {
		return nil, model.Endpoint{}, false
	}
	if pick == nil {
		pick = rand.IntN
	}
	k := pick(n)
	for _, r := range ready {
		if !want.IsZero() && r.id != want {
			continue
		}
		if k == 0 {
			return r.w, svc.Endpoints[r.i], true
		}
		k--
	}
	panic("pick out of range")
}

// serviceEndpoints is what a connection to a service needs of its
// endpoints, computed once per snapshot: the ready ones (those whose
// workload the snapshot knows, ready and with an address), in order, with
// their identities, and the service's trust domain (serviceTrustDomain).
type serviceEndpoints struct {
	ready []readyEndpoint
	td    spiffeid.TrustDomain
}

type readyEndpoint struct {
	i  int // in svc.Endpoints
	w  *model.Workload
	id spiffeid.ID
}

// endpointIndex is the serviceEndpoints of one snapshot's services, built
// as connections ask for them.
type endpointIndex struct {
	snap *model.Snapshot
	svcs sync.Map // *model.Service -> *serviceEndpoints
}

// endpoints is the newest snapshot's index: a process has one snapshot at
// a time (tests running several proxies with different snapshots only
// rebuild it more often).
var endpoints atomic.Pointer[endpointIndex]

func endpointsOf(snap *model.Snapshot, svc *model.Service) *serviceEndpoints {
	x := endpoints.Load()
	if x == nil || x.snap != snap {
		x = &endpointIndex{snap: snap}
		endpoints.Store(x)
	}
	if se, ok := x.svcs.Load(svc); ok {
		return se.(*serviceEndpoints)
	}
	se := &serviceEndpoints{td: identity.DefaultTrustDomain}
	tdSet := false
	for i, ep := range svc.Endpoints {
		w := snap.Workloads[ep.WorkloadUID]
		if w == nil {
			continue
		}
		id := w.Identity()
		if !tdSet {
			se.td, tdSet = id.TrustDomain(), true
		}
		if w.Ready && len(w.Addresses) > 0 {
			se.ready = append(se.ready, readyEndpoint{i: i, w: w, id: id})
		}
	}
	v, _ := x.svcs.LoadOrStore(svc, se)
	return v.(*serviceEndpoints)
}

// workloadRoute goes straight to w at target: HBONE when w is enrolled, plain
// TCP otherwise.
func workloadRoute(w *model.Workload, target netip.AddrPort, svc *model.Service) Route {
	if !w.Enrolled {
		return Route{Kind: RouteDirect, Addr: target, Target: target, Workload: w, Service: svc}
	}
	return Route{
		Kind:     RouteHBONE,
		Addr:     netip.AddrPortFrom(target.Addr(), model.PortHBONE),
		Target:   target,
		Peers:    []spiffeid.ID{w.Identity()},
		Workload: w,
		Service:  svc,
	}
}

// waypointRoute tunnels to the waypoint wp with dst as the authority; td is
// the trust domain of the destination (its workload's, or its service's
// endpoints'). When wp's address is a Service VIP (in a cluster, the
// Gateway's status address is its Service's cluster IP, which nothing here
// routes: ambit does not rely on kube-proxy), the tunnel goes to
// <pod IP>:15008 of one of that Service's ready endpoints that has the
// waypoint's identity (waypointVIPIdentity: any pod can join the Service by
// its labels, only the waypoint holds its service account), balanced as for
// any service, and requires that identity; with no such endpoint it fails
// closed, like an unresolved waypoint. A pod address (local mode) is dialled
// as it is.
func waypointRoute(snap *model.Snapshot, wp *model.WaypointRef, td spiffeid.TrustDomain, dst netip.AddrPort, svc *model.Service, pick func(int) int) (Route, error) {
	if !wp.Resolved() {
		return Route{Service: svc, Waypoint: wp}, fmt.Errorf("%w: %s/%s", ErrWaypointMissing, wp.Namespace, wp.Name)
	}
	addr, peer := wp.Address, waypointIdentity(snap, wp)
	if wsvc := snap.ServiceByVIP(wp.Address.Addr()); wsvc != nil {
		peer = waypointVIPIdentity(wp, td)
		if peer.IsZero() {
			return Route{Service: svc, Waypoint: wp}, fmt.Errorf("%w: %s/%s (no identity)", ErrWaypointMissing, wp.Namespace, wp.Name)
		}
		w, _, ok := pickEndpoint(snap, wsvc, peer, pick)
		if !ok {
			return Route{Service: svc, Waypoint: wp}, fmt.Errorf("%w: waypoint %s/%s (service %s, identity %s)",
				ErrNoReadyEndpoint, wp.Namespace, wp.Name, wsvc.Hostname, peer)
		}
		addr = netip.AddrPortFrom(sameFamily(w.Addresses, wp.Address.Addr().Unmap()), model.PortHBONE)
	}
	return Route{
		Kind:     RouteHBONE,
		Addr:     addr,
		Target:   dst,
		Peers:    []spiffeid.ID{peer},
		Service:  svc,
		Waypoint: wp,
	}, nil
}

// waypointIdentity is the identity of the waypoint's workload when the model
// knows it (a pod address, local mode), else waypointVIPIdentity in the
// default trust domain. (A waypoint addressed by its Service VIP is dialled
// at one of its pods holding waypointVIPIdentity: see waypointRoute.)
func waypointIdentity(snap *model.Snapshot, wp *model.WaypointRef) spiffeid.ID {
	if w := snap.WorkloadByIP(wp.Address.Addr()); w != nil {
		return w.Identity()
	}
	return waypointVIPIdentity(wp, identity.DefaultTrustDomain)
}

// waypointVIPIdentity is the identity the waypoint wp presents in trust
// domain td (zero means the default): Istio's convention and ambit's
// deployer's, the service account named after the Gateway, in its namespace.
// The destination ztunnel's no-bypass check accepts exactly this identity
// (waypointIdentityFor). Zero if the reference has no name.
func waypointVIPIdentity(wp *model.WaypointRef, td spiffeid.TrustDomain) spiffeid.ID {
	if td.IsZero() {
		td = identity.DefaultTrustDomain
	}
	id, err := identity.Workload(td, wp.Namespace, wp.Name)
	if err != nil {
		return spiffeid.ID{}
	}
	return id
}

// isWaypoint reports whether src is the waypoint wp, for a destination in
// trust domain td: its own traffic to the destination must not loop back to
// it. src is the waypoint when it holds wp's address or, when that address
// is a Service VIP, is one of that Service's endpoints and has the
// waypoint's identity (waypointVIPIdentity): another pod that joined the
// Service by its labels is not the waypoint.
func isWaypoint(snap *model.Snapshot, src *model.Workload, wp *model.WaypointRef, td spiffeid.TrustDomain) bool {
	if src == nil || !wp.Address.IsValid() {
		return false
	}
	a := wp.Address.Addr().Unmap()
	if slices.Contains(src.Addresses, a) {
		return true
	}
	wsvc := snap.ServiceByVIP(a)
	if wsvc == nil || !slices.ContainsFunc(wsvc.Endpoints, func(ep model.Endpoint) bool { return ep.WorkloadUID == src.UID }) {
		return false
	}
	id := waypointVIPIdentity(wp, td)
	return !id.IsZero() && src.Identity() == id
}

// sameFamily returns the first of addrs in like's family, else addrs[0].
func sameFamily(addrs []netip.Addr, like netip.Addr) netip.Addr {
	for _, a := range addrs {
		if a.Is4() == like.Is4() {
			return a
		}
	}
	return addrs[0]
}
