package xds

import (
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/model"
)

// deps are the parts of a model one waypoint's Envoy resources were built
// from (what envoy.ForWaypoint reads for it), so that a model change that
// touches none of them skips that waypoint's rebuild: the resources would
// be the same. It errs on the side of rebuilding: any WaypointPolicy or
// Waypoint change counts for every waypoint, and so does a change the
// store's delta log no longer holds.
type deps struct {
	wp auth.WaypointRef
	// services: bound to the waypoint, or a route's backend or mirror
	// (by Service.Key(), whether or not in the model).
	services map[string]bool
	// bound: the bound services' "<namespace>/<name>" (route parents).
	bound map[string]bool
	// touching: services with an endpoint on a bound workload (they give
	// its ports).
	touching map[string]bool
	// workloads: bound, or an endpoint of a service in services (by UID,
	// whether or not in the model).
	workloads map[string]bool
	// boundWorkloads: bound to the waypoint (by UID).
	boundWorkloads map[string]bool
	// httpRoutes, grpcRoutes: attached to a bound service (by key).
	httpRoutes, grpcRoutes map[string]bool
	// destinationRules: for a service in services (by key).
	destinationRules map[string]bool
}

func boundTo(r *model.WaypointRef, wp auth.WaypointRef) bool {
	return r != nil && r.Name == wp.Name && r.Namespace == wp.Namespace
}

// depsOf returns what wp's resources are built from in s.
func depsOf(s *model.Snapshot, wp auth.WaypointRef) *deps {
	d := &deps{
		wp: wp, services: map[string]bool{}, bound: map[string]bool{}, touching: map[string]bool{},
		workloads: map[string]bool{}, boundWorkloads: map[string]bool{},
		httpRoutes: map[string]bool{}, grpcRoutes: map[string]bool{}, destinationRules: map[string]bool{},
	}
	for k, svc := range s.Services {
		if boundTo(svc.Waypoint, wp) {
			d.services[k] = true
			d.bound[svc.Namespace+"/"+svc.Name] = true
		}
	}
	for _, rs := range []struct {
		routes map[string]*model.HTTPRoute
		keys   map[string]bool
	}{{s.HTTPRoutes, d.httpRoutes}, {s.GRPCRoutes, d.grpcRoutes}} {
		for k, r := range rs.routes {
			if !d.attached(r) {
				continue
			}
			rs.keys[k] = true
			for _, rule := range r.Rules {
				for _, b := range rule.Backends {
					d.services[b.Service] = true
				}
				for _, m := range rule.Mirrors {
					d.services[m.Service] = true
				}
			}
		}
	}
	for k := range d.services {
		if svc := s.Services[k]; svc != nil {
			for _, ep := range svc.Endpoints {
				d.workloads[ep.WorkloadUID] = true
			}
		}
	}
	for uid, w := range s.Workloads {
		if boundTo(w.Waypoint, wp) {
			d.workloads[uid] = true
			d.boundWorkloads[uid] = true
		}
	}
	if len(d.boundWorkloads) > 0 {
		for k, svc := range s.Services {
			if d.touches(svc) {
				d.touching[k] = true
			}
		}
	}
	for k, dr := range s.DestinationRules {
		if d.services[dr.Service] {
			d.destinationRules[k] = true
		}
	}
	return d
}

// attached reports whether r has a parent that is a bound service (any
// condition: a parent's acceptance is part of what the route gives).
func (d *deps) attached(r *model.HTTPRoute) bool {
	for i := range r.Parents {
		if p := &r.Parents[i]; p.Kind == "Service" && d.bound[p.Namespace+"/"+p.Name] {
			return true
		}
	}
	return false
}

// touches reports whether svc has an endpoint on a bound workload.
func (d *deps) touches(svc *model.Service) bool {
	for _, ep := range svc.Endpoints {
		if d.boundWorkloads[ep.WorkloadUID] {
			return true
		}
	}
	return false
}

// affectedBy reports whether any of ds may change the waypoint's
// resources.
func (d *deps) affectedBy(ds []*model.Delta) bool {
	for _, delta := range ds {
		if d.affectedByOne(delta) {
			return true
		}
	}
	return false
}

func (d *deps) affectedByOne(x *model.Delta) bool {
	if len(x.WaypointPolicies)+len(x.RemovedWaypointPolicies)+len(x.Waypoints)+len(x.RemovedWaypoints) > 0 {
		return true
	}
	for _, svc := range x.Services {
		// Its old version was read, or its new one would be: newly bound,
		// or newly an endpoint's service of a bound workload.
		if k := svc.Key(); d.services[k] || d.touching[k] || boundTo(svc.Waypoint, d.wp) || d.touches(svc) {
			return true
		}
	}
	for _, k := range x.RemovedServices {
		if d.services[k] || d.touching[k] {
			return true
		}
	}
	for _, w := range x.Workloads {
		if d.workloads[w.UID] || boundTo(w.Waypoint, d.wp) {
			return true
		}
	}
	for _, uid := range x.RemovedWorkloads {
		if d.workloads[uid] {
			return true
		}
	}
	for _, rs := range []struct {
		upserts []*model.HTTPRoute
		removed []string
		keys    map[string]bool
	}{{x.HTTPRoutes, x.RemovedHTTPRoutes, d.httpRoutes}, {x.GRPCRoutes, x.RemovedGRPCRoutes, d.grpcRoutes}} {
		for _, r := range rs.upserts {
			if rs.keys[r.Key()] || d.attached(r) {
				return true
			}
		}
		for _, k := range rs.removed {
			if rs.keys[k] {
				return true
			}
		}
	}
	for _, dr := range x.DestinationRules {
		if d.destinationRules[dr.Key()] || d.services[dr.Service] {
			return true
		}
	}
	for _, k := range x.RemovedDestinationRules {
		if d.destinationRules[k] {
			return true
		}
	}
	// Policies and PeerAuthn are the ztunnels' (L4): a waypoint does not
	// read them.
	return false
}
