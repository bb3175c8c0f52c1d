// Package translate turns Kubernetes objects (or the same objects read from
// YAML files) into ambit's config model. It is pure: Build and Update read an
// Objects set and return model values and the Problems found, without I/O.
// Invalid objects are left out of the model and reported as Problems; the
// rest of the model is still built. Invalid policies and routes are the
// exception: they are kept in a form that fails closed (see policy,
// waypointPolicy and route.go), and routes carry their Gateway API status
// per parent (model.RouteParent.Conditions) for a status writer.
//
// The L7 model (routes, GRPCRoutes, DestinationRules, policies with
// targetRefs, waypoints) is for waypoints: istiod-lite/envoy builds each
// waypoint's Envoy resources from it.
package translate

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/telemetry"
)

// Defaults for Options.
const (
	DefaultClusterID     = "Kubernetes"
	DefaultDomainSuffix  = "cluster.local"
	DefaultRootNamespace = "ambit-system"
	WaypointClass        = "istio-waypoint"
	// LabelUseWaypointNamespace names the namespace of the waypoint that
	// istio.io/use-waypoint names, when it is not the object's own.
	LabelUseWaypointNamespace = "istio.io/use-waypoint-namespace"
)

// Options parameterize translation.
type Options struct {
	ClusterID     string // default DefaultClusterID
	TrustDomain   string // empty means identity.DefaultTrustDomain
	DomainSuffix  string // default DefaultDomainSuffix
	RootNamespace string // policies here are mesh-wide; default DefaultRootNamespace
}

func (o Options) withDefaults() Options {
	if o.ClusterID == "" {
		o.ClusterID = DefaultClusterID
	}
	if o.DomainSuffix == "" {
		o.DomainSuffix = DefaultDomainSuffix
	}
	if o.RootNamespace == "" {
		o.RootNamespace = DefaultRootNamespace
	}
	return o
}

// Problem is an object translation rejected or changed: the object (Kind,
// Namespace, Name), a CamelCase Reason (as in a Kubernetes Event) and a
// message.
type Problem struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	Reason    string `json:"reason"`
	Message   string `json:"message"`
}

func (p Problem) String() string {
	return fmt.Sprintf("%s %s: %s: %s", p.Kind, Key(p.Namespace, p.Name), p.Reason, p.Message)
}

// Reasons of Problems.
const (
	ReasonInvalidPolicy      = "InvalidPolicy"
	ReasonUnsupported        = "Unsupported"
	ReasonL7RuleIgnored      = "L7RuleNotEnforcedByZtunnel"
	ReasonPortConflict       = "PortConflict"
	ReasonAddressConflict    = "AddressConflict"
	ReasonWaypointNotFound   = "WaypointNotFound"
	ReasonWaypointNoAddress  = "WaypointHasNoAddress"
	ReasonWaypointWrongScope = "WaypointDoesNotAcceptTraffic"
	ReasonBackendNotFound    = "BackendNotFound"
	ReasonInvalidRoute       = "InvalidRoute"
	ReasonInvalidService     = "InvalidService"
)

// WorkloadUID is the model UID of a pod.
func WorkloadUID(clusterID, namespace, name string) string {
	if clusterID == "" {
		clusterID = DefaultClusterID
	}
	return clusterID + "/Pod/" + namespace + "/" + name
}

// Result is a translation's output: the snapshot and the problems found.
type Result struct {
	Snapshot *model.Snapshot
	Problems []Problem
}

// Build translates all of o.
func Build(o *Objects, opts Options) Result {
	opts = opts.withDefaults()
	t := translator{o: o, opts: opts}
	var ws []*model.Workload
	for _, k := range sortedKeys(o.Pods) {
		if w := t.workload(o.Pods[k]); w != nil {
			ws = append(ws, w)
		}
	}
	var svcs []*model.Service
	for _, k := range sortedKeys(o.Services) {
		if s := t.service(k); s != nil {
			svcs = append(svcs, s)
		}
	}
	var pols []*model.Policy
	for _, k := range sortedKeys(o.AuthorizationPolicies) {
		if p := t.policy(o.AuthorizationPolicies[k]); p != nil {
			pols = append(pols, p)
		}
	}
	var pas []*model.PeerAuthentication
	for _, k := range sortedKeys(o.PeerAuthentications) {
		if p := t.peerAuthn(o.PeerAuthentications[k]); p != nil {
			pas = append(pas, p)
		}
	}
	snap := model.NewSnapshot(ws, svcs, pols, pas)
	for _, k := range sortedKeys(o.HTTPRoutes) {
		if r := t.route(o.HTTPRoutes[k]); r != nil {
			snap.HTTPRoutes[r.Key()] = r
		}
	}
	for _, k := range sortedKeys(o.GRPCRoutes) {
		if r := t.grpcRoute(o.GRPCRoutes[k]); r != nil {
			snap.GRPCRoutes[r.Key()] = r
		}
	}
	for _, k := range sortedKeys(o.DestinationRules) {
		if d := t.destinationRule(o.DestinationRules[k]); d != nil {
			snap.DestinationRules[d.Key()] = d
		}
	}
	for _, k := range sortedKeys(o.AuthorizationPolicies) {
		if p := t.waypointPolicy(o.AuthorizationPolicies[k]); p != nil {
			snap.WaypointPolicies[p.Key()] = p
		}
	}
	for _, w := range t.waypoints() {
		snap.Waypoints[w.Key()] = w
	}
	return Result{Snapshot: snap, Problems: t.problems}
}

type translator struct {
	o          *Objects
	opts       Options
	problems   []Problem
	labelIndex map[string]map[string][]*corev1.Pod // namespace -> "key=value" -> pods; see candidates
}

func (t *translator) report(kind, ns, name, reason, format string, args ...any) {
	t.problems = append(t.problems, Problem{Kind: kind, Namespace: ns, Name: name, Reason: reason, Message: fmt.Sprintf(format, args...)})
}

// workload translates a pod; nil when the pod is not a workload (no IP yet,
// finished, or on the host network).
func (t *translator) workload(p *corev1.Pod) *model.Workload {
	if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return nil
	}
	var addrs []netip.Addr
	ips := p.Status.PodIPs
	if len(ips) == 0 && p.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	for _, ip := range ips {
		a, err := netip.ParseAddr(ip.IP)
		if err != nil {
			continue
		}
		addrs = append(addrs, a.Unmap())
	}
	if len(addrs) == 0 {
		return nil
	}
	ns := t.o.Namespaces[p.Namespace]
	var nsLabels map[string]string
	if ns != nil {
		nsLabels = ns.Labels
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	w := &model.Workload{
		UID:               WorkloadUID(t.opts.ClusterID, p.Namespace, p.Name),
		Name:              p.Name,
		Namespace:         p.Namespace,
		ServiceAccount:    sa,
		TrustDomain:       t.opts.TrustDomain,
		Node:              p.Spec.NodeName,
		Addresses:         addrs,
		Labels:            p.Labels,
		Enrolled:          model.Enrolled(nsLabels, p.Labels),
		Ready:             podReady(p),
		CanonicalName:     canonicalName(p),
		CanonicalRevision: canonicalRevision(p),
		WorkloadName:      workloadName(p),
		ClusterID:         t.opts.ClusterID,
		QUIC:              quicAdvertised(nsLabels, t.o.Nodes[p.Spec.NodeName], p.Labels),
		WaypointBypass:    model.WaypointBypassAllowed(nsLabels, p.Labels),
	}
	if gw := p.Labels["gateway.networking.k8s.io/gateway-name"]; gw != "" && t.isWaypoint(p.Namespace, gw) {
		// A waypoint advertises QUIC by the same labels as any pod (the
		// deployer labels its pods and passes --hbone-quic to match).
		return w // a waypoint's own pods do not go through a waypoint
	}
	if name, wns, fromPod := useWaypoint(p.Labels, p.Namespace, nsLabels); name != "" {
		w.Waypoint = t.waypoint("Pod", p.Namespace, p.Name, wns, name, false, fromPod)
	}
	return w
}

// quicAdvertised reports whether a pod advertises HBONE over QUIC
// (model.LabelHBONEQUIC): its own label decides ("enabled" or not), else its
// namespace's, else its node's (the node's ztunnel runs with --hbone-quic).
func quicAdvertised(nsLabels map[string]string, node *corev1.Node, podLabels map[string]string) bool {
	_, onPod := podLabels[model.LabelHBONEQUIC]
	_, onNS := nsLabels[model.LabelHBONEQUIC]
	if onPod || onNS {
		return model.QUICAdvertised(nsLabels, podLabels)
	}
	return nodeQUIC(node)
}

// useWaypoint returns the waypoint an object asks for: its own label, else its
// namespace's. "none" on the object opts out of the namespace's waypoint.
func useWaypoint(objLabels map[string]string, objNS string, nsLabels map[string]string) (name, ns string, explicit bool) {
	if v, ok := objLabels[model.LabelUseWaypoint]; ok {
		if v == "none" || v == "" {
			return "", "", false
		}
		ns := objNS
		if n := objLabels[LabelUseWaypointNamespace]; n != "" {
			ns = n
		}
		return v, ns, true
	}
	if v := nsLabels[model.LabelUseWaypoint]; v != "" && v != "none" {
		ns := objNS
		if n := nsLabels[LabelUseWaypointNamespace]; n != "" {
			ns = n
		}
		return v, ns, false
	}
	return "", "", false
}

// waypoint resolves a use-waypoint reference. A waypoint that does not exist
// or has no address yet resolves to a WaypointRef without an address, which
// fails closed (see model.WaypointRef). A waypoint whose istio.io/waypoint-for
// excludes this kind of traffic is not used (nil), as in Istio.
func (t *translator) waypoint(kind, ns, name, wns, wname string, forService, explicit bool) *model.WaypointRef {
	ref := &model.WaypointRef{Name: wname, Namespace: wns}
	gw := t.o.Gateways[Key(wns, wname)]
	if gw == nil || string(gw.Spec.GatewayClassName) != WaypointClass {
		t.report(kind, ns, name, ReasonWaypointNotFound, "waypoint %s (a Gateway of class %s) does not exist; traffic that needs it is dropped", Key(wns, wname), WaypointClass)
		return ref
	}
	scope := gw.Labels[model.LabelWaypointFor]
	if scope == "" {
		scope = "service"
	}
	accepts := scope == "all" || (forService && scope == "service") || (!forService && scope == "workload")
	if !accepts {
		if explicit {
			t.report(kind, ns, name, ReasonWaypointWrongScope, "waypoint %s has %s=%s; it is not used for this %s", Key(wns, wname), model.LabelWaypointFor, scope, strings.ToLower(kind))
		}
		return nil
	}
	if addr, ok := t.waypointAddress(wns, wname); ok {
		ref.Address = netip.AddrPortFrom(addr, model.PortHBONE)
		return ref
	}
	t.report(kind, ns, name, ReasonWaypointNoAddress, "waypoint %s has no address yet (no status address, no Service %s with a cluster IP); traffic that needs it is dropped", Key(wns, wname), wname)
	return ref
}

func (t *translator) isWaypoint(ns, name string) bool {
	gw := t.o.Gateways[Key(ns, name)]
	return gw != nil && string(gw.Spec.GatewayClassName) == WaypointClass
}

func (t *translator) waypointAddress(ns, name string) (netip.Addr, bool) {
	if gw := t.o.Gateways[Key(ns, name)]; gw != nil {
		for _, a := range gw.Status.Addresses {
			if a.Type == nil || *a.Type == "IPAddress" {
				if ip, err := netip.ParseAddr(a.Value); err == nil {
					return ip.Unmap(), true
				}
			}
		}
	}
	if s := t.o.Services[Key(ns, name)]; s != nil {
		for _, ip := range serviceIPs(s) {
			if a, err := netip.ParseAddr(ip); err == nil {
				return a.Unmap(), true
			}
		}
	}
	return netip.Addr{}, false
}

func podReady(p *corev1.Pod) bool {
	if p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// canonicalName and canonicalRevision are Istio's derivations from the
// pod's labels, the ones the proxies' telemetry uses.
func canonicalName(p *corev1.Pod) string {
	return telemetry.CanonicalService(p.Labels, workloadName(p))
}

func canonicalRevision(p *corev1.Pod) string {
	return telemetry.CanonicalRevision(p.Labels)
}

// workloadName is the owning controller's name: a ReplicaSet's pod-template
// hash is stripped to give the Deployment's.
func workloadName(p *corev1.Pod) string {
	for _, o := range p.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		if o.Kind == "ReplicaSet" {
			if h := p.Labels["pod-template-hash"]; h != "" {
				return strings.TrimSuffix(o.Name, "-"+h)
			}
		}
		return o.Name
	}
	return p.Name
}

func sortedKeys[T any](m map[string]T) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func selectorMatches(sel map[string]string, l map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if lv, ok := l[k]; !ok || lv != v {
			return false
		}
	}
	return true
}

func olderFirst(a, b *corev1.Service) int {
	if c := a.CreationTimestamp.Compare(b.CreationTimestamp.Time); c != 0 {
		return c
	}
	return cmp.Compare(Key(a.Namespace, a.Name), Key(b.Namespace, b.Name))
}
