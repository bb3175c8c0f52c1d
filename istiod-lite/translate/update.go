package translate

import (
	"reflect"
	"strings"

	"github.com/ambit-mesh/ambit/model"
)

// Update re-translates only what ch names (and what depends on it) and
// returns the delta that turns prev (the snapshot the last translation of o
// produced) into the translation of o now, with the problems of the objects
// it re-translated. Unchanged resources keep prev's pointers, so a one-pod
// change costs one workload and the services that select it. Update(o,
// Build(o₀).Snapshot, ch) applied to prev equals Build(o) (tested).
func Update(o *Objects, prev *model.Snapshot, ch Changes, opts Options) (*model.Delta, []Problem) {
	opts = opts.withDefaults()
	full := ch.Full
	for _, k := range ch.Services {
		full = full || o.Gateways[k] != nil // a waypoint's Service: its address
	}
	if full {
		r := Build(o, opts)
		return Diff(prev, r.Snapshot), r.Problems
	}
	t := translator{o: o, opts: opts}
	d := &model.Delta{}

	pods := set(ch.Pods)
	svcs := set(ch.Services)
	for _, ns := range ch.Namespaces {
		for k := range o.podsByNS[ns] {
			pods[k] = true
		}
		for k := range o.servicesByNS[ns] {
			svcs[k] = true
		}
		// workloads of pods that are gone are handled by their own events
	}
	for k := range pods {
		ns, name, _ := strings.Cut(k, "/")
		uid := WorkloadUID(opts.ClusterID, ns, name)
		var w *model.Workload
		if p := o.Pods[k]; p != nil {
			w = t.workload(p)
			for sk, s := range o.servicesByNS[ns] {
				if !svcs[sk] && selectorMatches(s.Spec.Selector, p.Labels) {
					svcs[sk] = true
				}
			}
		}
		// services whose endpoints had this workload
		for sk, s := range o.servicesByNS[ns] {
			if svcs[sk] {
				continue
			}
			if old := prev.Services[ns+"/"+s.Name+"."+ns+".svc."+opts.DomainSuffix]; old != nil {
				for _, e := range old.Endpoints {
					if e.WorkloadUID == uid {
						svcs[sk] = true
						break
					}
				}
			}
		}
		old := prev.Workloads[uid]
		switch {
		case w == nil && old != nil:
			d.RemovedWorkloads = append(d.RemovedWorkloads, uid)
		case w != nil && !reflect.DeepEqual(w, old):
			d.Workloads = append(d.Workloads, w)
		}
	}
	existenceChanged := false // a service appeared, went, or changed its ports (route status)
	for k := range svcs {
		ns, name, _ := strings.Cut(k, "/")
		mk := ns + "/" + name + "." + ns + ".svc." + opts.DomainSuffix
		s := t.service(k)
		old := prev.Services[mk]
		switch {
		case s == nil && old != nil:
			d.RemovedServices = append(d.RemovedServices, mk)
			existenceChanged = true
		case s != nil && !reflect.DeepEqual(s, old):
			d.Services = append(d.Services, s)
			existenceChanged = existenceChanged || old == nil || !reflect.DeepEqual(s.Ports, old.Ports)
		}
	}
	routes, grpcRoutes := set(ch.HTTPRoutes), set(ch.GRPCRoutes)
	if existenceChanged {
		for k := range o.HTTPRoutes {
			routes[k] = true
		}
		for k := range o.GRPCRoutes {
			grpcRoutes[k] = true
		}
	}
	d.HTTPRoutes, d.RemovedHTTPRoutes = updateKeys(routes, o.HTTPRoutes, prev.HTTPRoutes, t.route)
	d.GRPCRoutes, d.RemovedGRPCRoutes = updateKeys(grpcRoutes, o.GRPCRoutes, prev.GRPCRoutes, t.grpcRoute)
	d.DestinationRules, d.RemovedDestinationRules = updateKeys(set(ch.DestinationRules), o.DestinationRules, prev.DestinationRules, t.destinationRule)
	d.Policies, d.RemovedPolicies = updateKeys(set(ch.AuthorizationPolicies), o.AuthorizationPolicies, prev.Policies, t.policy)
	wps := set(ch.AuthorizationPolicies)
	if existenceChanged { // a Service target may have appeared or gone: status
		for k, ap := range o.AuthorizationPolicies {
			if len(ap.Spec.TargetRefs) > 0 || ap.Spec.TargetRef != nil {
				wps[k] = true
			}
		}
	}
	d.WaypointPolicies, d.RemovedWaypointPolicies = updateKeys(wps, o.AuthorizationPolicies, prev.WaypointPolicies, t.waypointPolicy)
	for k := range set(ch.PeerAuthentications) {
		var p *model.PeerAuthentication
		if obj := o.PeerAuthentications[k]; obj != nil {
			p = t.peerAuthn(obj)
		}
		if old := prev.PeerAuthn[k]; p == nil && old != nil {
			d.RemovedPeerAuthn = append(d.RemovedPeerAuthn, k)
		} else if p != nil && !reflect.DeepEqual(p, old) {
			d.PeerAuthn = append(d.PeerAuthn, p)
		}
	}
	return d, t.problems
}

// updateKeys re-translates the objects with keys ks (model keys equal object
// keys) and returns the upserts and removals that change prev.
func updateKeys[O any, M any](ks map[string]bool, objs map[string]*O, prev map[string]*M, tr func(*O) *M) (upserts []*M, removed []string) {
	for k := range ks {
		var m *M
		if obj := objs[k]; obj != nil {
			m = tr(obj)
		}
		if old := prev[k]; m == nil && old != nil {
			removed = append(removed, k)
		} else if m != nil && !reflect.DeepEqual(m, old) {
			upserts = append(upserts, m)
		}
	}
	return upserts, removed
}

// Diff returns the delta that turns prev into next. Values are compared by
// pointer first, then deeply.
func Diff(prev, next *model.Snapshot) *model.Delta {
	d := &model.Delta{}
	d.Workloads, d.RemovedWorkloads = diffMap(prev.Workloads, next.Workloads)
	d.Services, d.RemovedServices = diffMap(prev.Services, next.Services)
	d.Policies, d.RemovedPolicies = diffMap(prev.Policies, next.Policies)
	d.PeerAuthn, d.RemovedPeerAuthn = diffMap(prev.PeerAuthn, next.PeerAuthn)
	d.HTTPRoutes, d.RemovedHTTPRoutes = diffMap(prev.HTTPRoutes, next.HTTPRoutes)
	d.GRPCRoutes, d.RemovedGRPCRoutes = diffMap(prev.GRPCRoutes, next.GRPCRoutes)
	d.DestinationRules, d.RemovedDestinationRules = diffMap(prev.DestinationRules, next.DestinationRules)
	d.WaypointPolicies, d.RemovedWaypointPolicies = diffMap(prev.WaypointPolicies, next.WaypointPolicies)
	d.Waypoints, d.RemovedWaypoints = diffMap(prev.Waypoints, next.Waypoints)
	return d
}

func diffMap[T any](prev, next map[string]*T) (upserts []*T, removed []string) {
	for k, v := range next {
		if o, ok := prev[k]; !ok || (o != v && !reflect.DeepEqual(o, v)) {
			upserts = append(upserts, v)
		}
	}
	for k := range prev {
		if _, ok := next[k]; !ok {
			removed = append(removed, k)
		}
	}
	return upserts, removed
}

func set(ks []string) map[string]bool {
	m := make(map[string]bool, len(ks))
	for _, k := range ks {
		m[k] = true
	}
	return m
}
