package ztunnel

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/model"
)

// bindings is what the inbound path needs of one config snapshot, indexed
// once per snapshot instead of scanning every service per connection: which
// waypoints bind a (pod IP, target port) through a service, and the services
// by hostname. It is immutable once built.
type bindings struct {
	snap *model.Snapshot
	// byTarget: service-bound targets of the workloads the index was built
	// for, <pod IP>:<target port> -> the waypoints of the services that have
	// that pod as an endpoint and that port as a target port (no duplicates).
	byTarget map[netip.AddrPort][]*model.WaypointRef
	// byHost: services by hostname (for the forwarded host of a tunnel).
	byHost map[string]*model.Service
}

// buildBindings indexes snap for the workloads keep accepts (nil: all).
func buildBindings(snap *model.Snapshot, keep func(*model.Workload) bool) *bindings {
	b := &bindings{
		snap:     snap,
		byTarget: map[netip.AddrPort][]*model.WaypointRef{},
		byHost:   make(map[string]*model.Service, len(snap.Services)),
	}
	for _, svc := range snap.Services {
		b.byHost[svc.Hostname] = svc
		if svc.Waypoint == nil {
			continue
		}
		var only []*model.WaypointRef // shared by the targets svc alone binds (cap 1: an append copies)
		for _, ep := range svc.Endpoints {
			w := snap.Workloads[ep.WorkloadUID]
			if w == nil || (keep != nil && !keep(w)) {
				continue
			}
			for _, sp := range svc.Ports {
				port := endpointPort(sp, ep)
				for _, a := range w.Addresses {
					k := netip.AddrPortFrom(a.Unmap(), port)
					switch cur := b.byTarget[k]; {
					case cur == nil:
						if only == nil {
							only = []*model.WaypointRef{svc.Waypoint}
						}
						b.byTarget[k] = only
					case !slices.ContainsFunc(cur, func(o *model.WaypointRef) bool { return sameWaypoint(o, svc.Waypoint) }):
						b.byTarget[k] = append(cur, svc.Waypoint)
					}
				}
			}
		}
	}
	return b
}

// endpointPort is the port a service port targets on endpoint ep: the
// endpoint's own mapping, else the service's target port, else the port.
// Resolve sends service traffic to that port.
func endpointPort(sp model.ServicePort, ep model.Endpoint) uint16 {
	if p := ep.Ports[sp.Port]; p != 0 {
		return p
	}
	if sp.TargetPort != 0 {
		return sp.TargetPort
	}
	return sp.Port
}

func sameWaypoint(a, b *model.WaypointRef) bool {
	return a.Namespace == b.Namespace && a.Name == b.Name
}

// waypointsFor returns the waypoints that bind target (<pod IP>:<port> of
// w): w's own (workload-bound) and those of the services that send to that
// port of w (service-bound), unless w opts out of the latter
// (Workload.WaypointBypass, Istio's behaviour). Nil means target is not
// waypoint-bound.
func (b *bindings) waypointsFor(w *model.Workload, target netip.AddrPort) []*model.WaypointRef {
	var svcBound []*model.WaypointRef
	if !w.WaypointBypass {
		svcBound = b.byTarget[netip.AddrPortFrom(target.Addr().Unmap(), target.Port())]
	}
	if w.Waypoint == nil {
		return svcBound
	}
	out := []*model.WaypointRef{w.Waypoint}
	for _, wp := range svcBound {
		if !sameWaypoint(wp, w.Waypoint) {
			out = append(out, wp)
		}
	}
	return out
}

// waypointIdentityFor is the identity a waypoint presents to w's ztunnel:
// Istio's convention (and ambit's deployer's), the service account named
// after the waypoint's Gateway in its namespace, in w's trust domain. Zero
// if the reference has no name.
func waypointIdentityFor(w *model.Workload, wp *model.WaypointRef) spiffeid.ID {
	id, err := identity.Workload(w.Identity().TrustDomain(), wp.Namespace, wp.Name)
	if err != nil {
		return spiffeid.ID{}
	}
	return id
}

// checkBypass enforces "no bypass by default": a connection to target on w
// that is waypoint-bound is accepted only from one of the binding waypoints'
// identities (peer; zero for plaintext, which is never accepted). It returns
// "" when the connection may proceed (to the normal L4 authorization), else
// the reason for refusing it. A binding waypoint without an address changes
// nothing: only its identity would be accepted, and it is not running, so
// the target fails closed.
func (b *bindings) checkBypass(w *model.Workload, target netip.AddrPort, peer spiffeid.ID) string {
	wps := b.waypointsFor(w, target)
	if len(wps) == 0 {
		return ""
	}
	if !peer.IsZero() {
		for _, wp := range wps {
			if id := waypointIdentityFor(w, wp); !id.IsZero() && id == peer {
				return ""
			}
		}
	}
	return bypassReason(target, wps)
}

func bypassReason(target netip.AddrPort, wps []*model.WaypointRef) string {
	names := make([]string, len(wps))
	var missing []string
	for i, wp := range wps {
		names[i] = wp.Namespace + "/" + wp.Name
		if !wp.Resolved() {
			missing = append(missing, names[i])
		}
	}
	var s string
	if len(wps) == 1 {
		s = fmt.Sprintf("waypoint bypass: %s is bound to waypoint %s; only its identity may connect directly", target, names[0])
	} else {
		s = fmt.Sprintf("waypoint bypass: %s is bound to waypoints %s; only their identities may connect directly", target, strings.Join(names, ", "))
	}
	if len(missing) > 0 {
		s += fmt.Sprintf(" (waypoint %s has no address: failing closed)", strings.Join(missing, ", "))
	}
	return s
}

// snapshot returns the current config snapshot and its bindings index,
// building the index if the snapshot changed since the last build. The
// index is always the snapshot's own: callers use the returned snapshot.
func (p *Proxy) snapshot() (*model.Snapshot, *bindings) {
	snap := p.cfg.Store.Load()
	if b := p.bind.Load(); b != nil && b.snap == snap {
		return snap, b
	}
	p.bindMu.Lock()
	defer p.bindMu.Unlock()
	snap = p.cfg.Store.Load() // the newest, so that an older index never replaces a newer one
	if b := p.bind.Load(); b != nil && b.snap == snap {
		return snap, b
	}
	var b *bindings
	if old := p.bind.Load(); old != nil && sameMap(old.snap.Services, snap.Services) && sameMap(old.snap.Workloads, snap.Workloads) {
		// A change to other resources (policies, say): model.Snapshot.Apply
		// shares the maps it does not touch, and the index depends on these two only.
		b = &bindings{snap: snap, byTarget: old.byTarget, byHost: old.byHost}
	} else {
		b = buildBindings(snap, p.cfg.isLocal)
	}
	p.bind.Store(b)
	return snap, b
}

// sameMap reports whether a and b are the same map (not merely equal).
func sameMap[K comparable, V any](a, b map[K]V) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}
