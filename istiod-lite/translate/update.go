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
	existenceChanged := false
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
			existenceChanged = existenceChanged || old == nil
		}
	}
	routes := set(ch.HTTPRoutes)
	if existenceChanged {
		for k := range o.HTTPRoutes {
			routes[k] = true
		}
	}
	for k := range routes {
		var r *model.HTTPRoute
		if obj := o.HTTPRoutes[k]; obj != nil {
			r = t.route(obj)
		}
		if old := prev.HTTPRoutes[k]; r == nil && old != nil {
			d.RemovedHTTPRoutes = append(d.RemovedHTTPRoutes, k)
		} else if r != nil && !reflect.DeepEqual(r, old) {
			d.HTTPRoutes = append(d.HTTPRoutes, r)
		}
	}
	for k := range set(ch.AuthorizationPolicies) {
		var p *model.Policy
		if obj := o.AuthorizationPolicies[k]; obj != nil {
			p = t.policy(obj)
		}
		if old := prev.Policies[k]; p == nil && old != nil {
			d.RemovedPolicies = append(d.RemovedPolicies, k)
		} else if p != nil && !reflect.DeepEqual(p, old) {
			d.Policies = append(d.Policies, p)
		}
	}
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

// Diff returns the delta that turns prev into next. Values are compared by
// pointer first, then deeply.
func Diff(prev, next *model.Snapshot) *model.Delta {
	d := &model.Delta{}
	d.Workloads, d.RemovedWorkloads = diffMap(prev.Workloads, next.Workloads)
	d.Services, d.RemovedServices = diffMap(prev.Services, next.Services)
	d.Policies, d.RemovedPolicies = diffMap(prev.Policies, next.Policies)
	d.PeerAuthn, d.RemovedPeerAuthn = diffMap(prev.PeerAuthn, next.PeerAuthn)
	d.HTTPRoutes, d.RemovedHTTPRoutes = diffMap(prev.HTTPRoutes, next.HTTPRoutes)
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
