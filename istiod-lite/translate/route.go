package translate

import (
	"time"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/model"
)

// route translates an HTTPRoute for waypoints; nil when it is rejected (a
// backend that does not exist, an unsupported backend kind, a bad timeout).
func (t *translator) route(r *gwv1.HTTPRoute) *model.HTTPRoute {
	const kind = "HTTPRoute"
	out := &model.HTTPRoute{Name: r.Name, Namespace: r.Namespace}
	for _, p := range r.Spec.ParentRefs {
		rp := model.RouteParent{Kind: "Gateway", Namespace: r.Namespace, Name: string(p.Name)}
		if p.Kind != nil {
			rp.Kind = string(*p.Kind)
		}
		if p.Namespace != nil {
			rp.Namespace = string(*p.Namespace)
		}
		if p.Port != nil {
			rp.Port = uint16(*p.Port)
		}
		out.Parents = append(out.Parents, rp)
	}
	for _, h := range r.Spec.Hostnames {
		out.Hostnames = append(out.Hostnames, string(h))
	}
	out.Rules = []model.HTTPRouteRule{}
	for i, rule := range r.Spec.Rules {
		mr := model.HTTPRouteRule{}
		if rule.Timeouts != nil && rule.Timeouts.Request != nil {
			d, err := time.ParseDuration(string(*rule.Timeouts.Request))
			if err != nil {
				t.report(kind, r.Namespace, r.Name, ReasonInvalidRoute, "rules[%d].timeouts.request: %v", i, err)
				return nil
			}
			mr.Timeout = d
		}
		for _, m := range rule.Matches {
			hm := model.HTTPMatch{}
			if m.Path != nil {
				hm.PathType = string(gwv1.PathMatchPathPrefix)
				if m.Path.Type != nil {
					hm.PathType = string(*m.Path.Type)
				}
				hm.Path = "/"
				if m.Path.Value != nil {
					hm.Path = *m.Path.Value
				}
			}
			if m.Method != nil {
				hm.Method = string(*m.Method)
			}
			for _, h := range m.Headers {
				if h.Type != nil && *h.Type != gwv1.HeaderMatchExact {
					t.report(kind, r.Namespace, r.Name, ReasonUnsupported, "rules[%d]: header match type %s is not supported", i, *h.Type)
					return nil
				}
				if hm.Headers == nil {
					hm.Headers = map[string]string{}
				}
				hm.Headers[string(h.Name)] = h.Value
			}
			mr.Matches = append(mr.Matches, hm)
		}
		for _, b := range rule.BackendRefs {
			if (b.Group != nil && *b.Group != "") || (b.Kind != nil && *b.Kind != "Service") {
				t.report(kind, r.Namespace, r.Name, ReasonUnsupported, "rules[%d]: backendRef %s is not a Service", i, b.Name)
				return nil
			}
			ns := r.Namespace
			if b.Namespace != nil {
				ns = string(*b.Namespace)
			}
			if t.o.Services[Key(ns, string(b.Name))] == nil {
				t.report(kind, r.Namespace, r.Name, ReasonBackendNotFound, "rules[%d]: backend Service %s does not exist", i, Key(ns, string(b.Name)))
				return nil
			}
			if b.Port == nil {
				t.report(kind, r.Namespace, r.Name, ReasonInvalidRoute, "rules[%d]: backendRef %s has no port", i, b.Name)
				return nil
			}
			w := int32(1)
			if b.Weight != nil {
				w = *b.Weight
			}
			mr.Backends = append(mr.Backends, model.WeightedBackend{
				Service: ns + "/" + string(b.Name) + "." + ns + ".svc." + t.opts.DomainSuffix,
				Port:    uint16(*b.Port),
				Weight:  w,
			})
		}
		out.Rules = append(out.Rules, mr)
	}
	return out
}
