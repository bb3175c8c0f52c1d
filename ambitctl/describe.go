package ambitctl

import (
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/ambitctl/analyzer"
	"github.com/ambit-mesh/ambit/authz"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

func newDescribeCommand(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "describe pod|service NAME",
		Short: "Explain how the mesh treats a pod or a service, in one screen",
		Long: `describe reads the cluster and translates it with istiod-lite's own
translation, then explains one pod or service: which node and ztunnel capture
it and whether it is enrolled (and why: the namespace label or the pod's
opt-out), its SPIFFE identity, the waypoint its traffic goes through and the
label that chose it, the HTTPRoutes attached to its services, the
AuthorizationPolicies that select it or target its waypoint or service, the
effective PeerAuthentication mode, and what translation found wrong.`,
		Example: `  ambitctl describe pod reviews-v1-7d9f-x2 -n shop
  ambitctl describe service reviews -n shop`,
		Args:      cobra.ExactArgs(2),
		ValidArgs: []string{"pod", "service"},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDescribe(cmd.Context(), cmd.OutOrStdout(), g, args[0], args[1])
		},
	}
	return cmd
}

// meshView is the cluster as istiod-lite sees it.
type meshView struct {
	in       analyzer.Input
	snap     *model.Snapshot
	problems []translate.Problem
	ns       map[string]*corev1.Namespace
	ztunnels []corev1.Pod
}

func runDescribe(ctx context.Context, out io.Writer, g *globalFlags, kind, name string) error {
	switch kind {
	case "pod", "pods", "po":
		kind = "pod"
	case "service", "services", "svc":
		kind = "service"
	default:
		return fmt.Errorf("cannot describe %q: use describe pod NAME or describe service NAME", kind)
	}
	c, err := g.cluster()
	if err != nil {
		return err
	}
	ns := c.namespace
	if kind == "pod" {
		if _, err := c.kube.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("pod %s/%s not found (wrong -n?)", ns, name)
			}
			return c.explain("get pod "+ns+"/"+name, err)
		}
	} else if _, err := c.kube.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("service %s/%s not found (wrong -n?)", ns, name)
		}
		return c.explain("get service "+ns+"/"+name, err)
	}
	v := &meshView{ns: map[string]*corev1.Namespace{}}
	if err := c.readCluster(ctx, &v.in); err != nil {
		return err
	}
	zl, err := c.kube.CoreV1().Pods(controlPlaneNamespace).List(ctx, metav1.ListOptions{LabelSelector: ztunnelSelector})
	if err != nil && !apierrors.IsNotFound(err) {
		return c.explain("list ztunnel pods", err)
	}
	if zl != nil {
		v.ztunnels = zl.Items
	}
	v.build()
	if kind == "pod" {
		return v.describePod(out, ns, name)
	}
	return v.describeService(out, ns, name)
}

// build translates the objects read, as istiod-lite does.
func (v *meshView) build() {
	o := translate.NewObjects()
	add := func(x any) { o.Set(x) }
	for _, x := range v.in.Namespaces {
		v.ns[x.Name] = x
		add(x)
	}
	for _, x := range v.in.Pods {
		add(x)
	}
	for _, x := range v.in.Services {
		add(x)
	}
	for _, x := range v.in.Gateways {
		add(x)
	}
	for _, x := range v.in.HTTPRoutes {
		add(x)
	}
	for _, x := range v.in.AuthorizationPolicies {
		add(x)
	}
	for _, x := range v.in.PeerAuthentications {
		add(x)
	}
	r := translate.Build(o, translate.Options{})
	v.snap, v.problems = r.Snapshot, r.Problems
}

// describer writes "Field:  value" lines, continuation lines indented.
type describer struct {
	w io.Writer
}

func (d describer) field(name, format string, args ...any) {
	fmt.Fprintf(d.w, "%-24s%s\n", name+":", fmt.Sprintf(format, args...))
}

func (d describer) more(format string, args ...any) {
	fmt.Fprintf(d.w, "%-24s%s\n", "", fmt.Sprintf(format, args...))
}

func (v *meshView) pod(ns, name string) *corev1.Pod {
	for _, p := range v.in.Pods {
		if p.Namespace == ns && p.Name == name {
			return p
		}
	}
	return nil
}

func (v *meshView) service(ns, name string) *corev1.Service {
	for _, s := range v.in.Services {
		if s.Namespace == ns && s.Name == name {
			return s
		}
	}
	return nil
}

// servicesOf returns the services whose selector selects p.
func (v *meshView) servicesOf(p *corev1.Pod) []*corev1.Service {
	var out []*corev1.Service
	for _, s := range v.in.Services {
		if s.Namespace == p.Namespace && len(s.Spec.Selector) > 0 && labelsMatch(s.Spec.Selector, p.Labels) {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b *corev1.Service) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func labelsMatch(sel, labels map[string]string) bool {
	for k, want := range sel {
		if got, ok := labels[k]; !ok || got != want {
			return false
		}
	}
	return true
}

func (v *meshView) nsLabels(ns string) map[string]string {
	if n := v.ns[ns]; n != nil {
		return n.Labels
	}
	return nil
}

// enrollment explains model.Enrolled for a pod.
func (v *meshView) enrollment(p *corev1.Pod) (bool, string) {
	nsl := v.nsLabels(p.Namespace)
	enrolled := model.Enrolled(nsl, p.Labels)
	key := model.LabelDataplaneMode
	switch pv := p.Labels[key]; {
	case pv == model.DataplaneNone:
		return enrolled, fmt.Sprintf("the pod opts out: label %s=%s on the pod", key, pv)
	case pv == model.DataplaneAmbient:
		return enrolled, fmt.Sprintf("label %s=%s on the pod", key, pv)
	case nsl[key] == model.DataplaneAmbient:
		return enrolled, fmt.Sprintf("label %s=%s on namespace %s", key, nsl[key], p.Namespace)
	case nsl[key] != "":
		return enrolled, fmt.Sprintf("namespace %s has %s=%s, not %s (ambitctl enroll %s)", p.Namespace, key, nsl[key], model.DataplaneAmbient, p.Namespace)
	}
	return enrolled, fmt.Sprintf("namespace %s has no label %s=%s (ambitctl enroll %s)", p.Namespace, key, model.DataplaneAmbient, p.Namespace)
}

// waypointWhy names the label that chose the waypoint of an object (pod or
// service) and its namespace, in translate's precedence.
func (v *meshView) waypointWhy(kind, ns, name string, labels map[string]string) string {
	if val, ok := labels[model.LabelUseWaypoint]; ok {
		return fmt.Sprintf("label %s=%s on %s %s", model.LabelUseWaypoint, val, kind, name)
	}
	if val := v.nsLabels(ns)[model.LabelUseWaypoint]; val != "" {
		return fmt.Sprintf("label %s=%s on namespace %s", model.LabelUseWaypoint, val, ns)
	}
	return fmt.Sprintf("no %s label on %s %s or namespace %s", model.LabelUseWaypoint, kind, name, ns)
}

func waypointDesc(w *model.WaypointRef) string {
	if w == nil {
		return "none"
	}
	s := w.Namespace + "/" + w.Name
	if w.Resolved() {
		return s + " (" + w.Address.String() + ")"
	}
	return s + " (NOT RESOLVED: traffic that needs it is dropped)"
}

func (v *meshView) ztunnelOn(node string) string {
	if node == "" {
		return "none: the pod is not scheduled"
	}
	for _, z := range v.ztunnels {
		if z.Spec.NodeName == node {
			state := string(z.Status.Phase)
			for _, c := range z.Status.Conditions {
				if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
					state = "Ready"
				}
			}
			return fmt.Sprintf("%s/%s on node %s (%s)", z.Namespace, z.Name, node, state)
		}
	}
	return fmt.Sprintf("NONE on node %s: no ztunnel pod runs there (ambitctl check)", node)
}

func (v *meshView) workload(ns, name string) *model.Workload {
	return v.snap.Workloads[translate.WorkloadUID("", ns, name)]
}

func (v *meshView) snapService(s *corev1.Service) *model.Service {
	for _, ms := range v.snap.Services {
		if ms.Namespace == s.Namespace && ms.Name == s.Name {
			return ms
		}
	}
	return nil
}

func (v *meshView) describePod(out io.Writer, ns, name string) error {
	p := v.pod(ns, name)
	if p == nil {
		return fmt.Errorf("pod %s/%s not found (wrong -n?)", ns, name)
	}
	d := describer{out}
	fmt.Fprintf(out, "Pod %s/%s\n", ns, name)
	ready := "not ready"
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			ready = "ready"
		}
	}
	d.field("Node", "%s, IP %s, %s, %s", orNone(p.Spec.NodeName), orNone(p.Status.PodIP), p.Status.Phase, ready)
	enrolled, why := v.enrollment(p)
	d.field("Enrolled", "%s: %s", yesNo(enrolled), why)
	if enrolled {
		d.field("Captured by ztunnel", "%s", v.ztunnelOn(p.Spec.NodeName))
	} else {
		d.field("Captured by ztunnel", "no: plain TCP to and from it (the ztunnel on its node does not capture it)")
	}
	w := v.workload(ns, name)
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	if w != nil {
		id := w.Identity().String()
		if enrolled {
			d.field("Identity", "%s (service account %s)", id, sa)
		} else {
			d.field("Identity", "%s (service account %s; not used: the pod is not enrolled)", id, sa)
		}
	}
	if w != nil {
		switch {
		case w.Waypoint != nil:
			d.field("Waypoint (to the pod)", "%s: %s", waypointDesc(w.Waypoint), v.waypointWhy("pod", ns, name, p.Labels))
		default:
			d.field("Waypoint (to the pod)", "none: %s", v.podWaypointNone(p))
		}
	}
	svcs := v.servicesOf(p)
	var waypoints []*model.WaypointRef
	if len(svcs) == 0 {
		d.field("Services", "none select the pod")
	}
	for i, s := range svcs {
		ms := v.snapService(s)
		line := fmt.Sprintf("%s %s", s.Name, servicePorts(s))
		if ms != nil && ms.Waypoint != nil {
			line += fmt.Sprintf(", waypoint %s: %s", waypointDesc(ms.Waypoint), v.waypointWhy("service", s.Namespace, s.Name, s.Labels))
			waypoints = append(waypoints, ms.Waypoint)
		} else {
			line += ", no waypoint"
		}
		if i == 0 {
			d.field("Services", "%s", line)
		} else {
			d.more("%s", line)
		}
	}
	if w != nil && w.Waypoint != nil {
		waypoints = append(waypoints, w.Waypoint)
	}
	v.routesFor(d, svcs)
	v.policiesFor(d, w, svcs, waypoints)
	if w != nil {
		v.peerAuthnFor(d, w)
	}
	v.problemsFor(d, func(pr translate.Problem) bool {
		return pr.Namespace == ns && (pr.Kind == "Pod" && pr.Name == name || pr.Kind == "Service" && slices.ContainsFunc(svcs, func(s *corev1.Service) bool { return s.Name == pr.Name }))
	})
	return nil
}

// podWaypointNone explains why traffic addressed to the pod has no waypoint.
func (v *meshView) podWaypointNone(p *corev1.Pod) string {
	if val, ok := p.Labels[model.LabelUseWaypoint]; ok {
		return fmt.Sprintf("label %s=%s on the pod", model.LabelUseWaypoint, val)
	}
	val := v.nsLabels(p.Namespace)[model.LabelUseWaypoint]
	if val == "" || val == "none" {
		return fmt.Sprintf("no %s label on the pod or namespace %s", model.LabelUseWaypoint, p.Namespace)
	}
	for _, gw := range v.in.Gateways {
		if gw.Namespace == p.Namespace && gw.Name == val {
			scope := gw.Labels[model.LabelWaypointFor]
			if scope == "" {
				scope = "service"
			}
			return fmt.Sprintf("namespace %s uses waypoint %s, which serves %s=%s traffic, not traffic addressed to pods", p.Namespace, val, model.LabelWaypointFor, scope)
		}
	}
	return fmt.Sprintf("namespace %s names waypoint %s, which does not exist", p.Namespace, val)
}

func servicePorts(s *corev1.Service) string {
	var ps []string
	for _, p := range s.Spec.Ports {
		x := strconv.Itoa(int(p.Port))
		if t := p.TargetPort.String(); t != "" && t != "0" && t != x {
			x += "->" + t
		}
		ps = append(ps, x)
	}
	ip := s.Spec.ClusterIP
	if ip == "" {
		ip = "no cluster IP"
	}
	return "(" + ip + " port " + strings.Join(ps, ",") + ")"
}

// routesFor lists the HTTPRoutes whose parent is one of svcs.
func (v *meshView) routesFor(d describer, svcs []*corev1.Service) {
	var lines []string
	for _, k := range slices.Sorted(maps.Keys(v.snap.HTTPRoutes)) {
		r := v.snap.HTTPRoutes[k]
		for _, par := range r.Parents {
			if par.Kind != "Service" || !slices.ContainsFunc(svcs, func(s *corev1.Service) bool { return s.Namespace == par.Namespace && s.Name == par.Name }) {
				continue
			}
			port := ""
			if par.Port != 0 {
				port = ":" + strconv.Itoa(int(par.Port))
			}
			state := "Accepted"
			if !par.Accepted() {
				state = "NOT accepted"
				for _, c := range par.Conditions {
					if c.Type == model.ConditionAccepted {
						state += " (" + c.Reason + ": " + c.Message + ")"
					}
				}
			}
			lines = append(lines, fmt.Sprintf("%s on Service %s%s, %d rules, %s", r.Key(), par.Name, port, len(r.Rules), state))
		}
	}
	list(d, "HTTPRoutes", lines, "none")
}

func list(d describer, name string, lines []string, none string) {
	if len(lines) == 0 {
		d.field(name, "%s", none)
		return
	}
	d.field(name, "%s", lines[0])
	for _, l := range lines[1:] {
		d.more("%s", l)
	}
}

// policiesFor lists the L4 policies selecting w (enforced by its ztunnel)
// and the L7 policies targeting its services or their waypoints (enforced
// by the waypoint).
func (v *meshView) policiesFor(d describer, w *model.Workload, svcs []*corev1.Service, waypoints []*model.WaypointRef) {
	var lines []string
	if w != nil {
		for _, k := range slices.Sorted(maps.Keys(v.snap.Policies)) {
			p := v.snap.Policies[k]
			if !policySelects(p.Namespace, p.MeshWide, p.Selector, w) {
				continue
			}
			lines = append(lines, fmt.Sprintf("%s %s, %s, %d rules: enforced by the ztunnel", k, p.Action, selectorString(p.Selector, p.MeshWide || p.Namespace == authz.DefaultRootNamespace), len(p.Rules)))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(v.snap.WaypointPolicies)) {
		p := v.snap.WaypointPolicies[k]
		for _, t := range p.Targets {
			hit := ""
			switch t.Kind {
			case "Service":
				if slices.ContainsFunc(svcs, func(s *corev1.Service) bool { return s.Namespace == p.Namespace && s.Name == t.Name }) {
					hit = "targets Service " + t.Name
				}
			case "Gateway":
				if slices.ContainsFunc(waypoints, func(r *model.WaypointRef) bool { return r.Namespace == p.Namespace && r.Name == t.Name }) {
					hit = "targets waypoint " + t.Name
				}
			}
			if hit != "" {
				lines = append(lines, fmt.Sprintf("%s %s, %s, %d rules: enforced by waypoint %s/%s", k, p.Action, hit, len(p.Rules), p.Namespace, t.Name))
			}
		}
	}
	list(d, "AuthorizationPolicies", lines, "none: every connection is allowed")
}

// policySelects is authz's rule for a policy's reach: its namespace (or
// every namespace when mesh-wide or in the root namespace) and a selector
// that matches the workload's labels.
func policySelects(ns string, meshWide bool, sel map[string]string, w *model.Workload) bool {
	if !meshWide && ns != authz.DefaultRootNamespace && ns != w.Namespace {
		return false
	}
	return labelsMatch(sel, w.Labels)
}

func (v *meshView) peerAuthnFor(d describer, w *model.Workload) {
	mode := authz.Evaluator{}.PeerAuthnMode(v.snap, w)
	var from []string
	for _, k := range slices.Sorted(maps.Keys(v.snap.PeerAuthn)) {
		pa := v.snap.PeerAuthn[k]
		if pa.Mode != model.MTLSUnset && policySelects(pa.Namespace, pa.MeshWide, pa.Selector, w) {
			from = append(from, fmt.Sprintf("%s %s (%s)", k, pa.Mode, selectorString(pa.Selector, pa.MeshWide || pa.Namespace == authz.DefaultRootNamespace)))
		}
	}
	if len(from) == 0 {
		d.field("PeerAuthentication", "%s (no PeerAuthentication applies: the default)", mode)
		return
	}
	d.field("PeerAuthentication", "%s, from %s", mode, strings.Join(from, "; "))
}

func (v *meshView) problemsFor(d describer, match func(translate.Problem) bool) {
	var lines []string
	for _, pr := range v.problems {
		if match(pr) {
			lines = append(lines, pr.Reason+": "+pr.Message)
		}
	}
	slices.Sort(lines)
	list(d, "Problems", lines, "none")
}

func (v *meshView) describeService(out io.Writer, ns, name string) error {
	s := v.service(ns, name)
	if s == nil {
		return fmt.Errorf("service %s/%s not found (wrong -n?)", ns, name)
	}
	d := describer{out}
	fmt.Fprintf(out, "Service %s/%s\n", ns, name)
	ms := v.snapService(s)
	d.field("Address", "%s", servicePorts(s))
	if ms == nil {
		d.field("In the mesh", "no: istiod-lite does not program it (see Problems)")
	} else {
		d.field("Hostname", "%s", ms.Hostname)
	}
	var waypoints []*model.WaypointRef
	switch {
	case ms != nil && ms.Waypoint != nil:
		d.field("Waypoint", "%s: %s", waypointDesc(ms.Waypoint), v.waypointWhy("service", ns, name, s.Labels))
		waypoints = append(waypoints, ms.Waypoint)
	default:
		d.field("Waypoint", "none: %s", v.waypointWhy("service", ns, name, s.Labels))
	}
	var eps []string
	var workloads []*model.Workload
	for _, p := range v.in.Pods {
		if p.Namespace != ns || len(s.Spec.Selector) == 0 || !labelsMatch(s.Spec.Selector, p.Labels) {
			continue
		}
		enrolled, _ := v.enrollment(p)
		state := "not enrolled (plain TCP)"
		if enrolled {
			state = "enrolled, ztunnel " + v.ztunnelOn(p.Spec.NodeName)
		}
		ready := "not ready"
		if w := v.workload(ns, p.Name); w != nil {
			workloads = append(workloads, w)
			if w.Ready {
				ready = "ready"
			}
		}
		eps = append(eps, fmt.Sprintf("%s %s %s, %s", p.Name, orNone(p.Status.PodIP), ready, state))
	}
	slices.Sort(eps)
	list(d, "Endpoints", eps, "none: no pod matches the selector")
	v.routesFor(d, []*corev1.Service{s})
	var lines []string
	for _, k := range slices.Sorted(maps.Keys(v.snap.Policies)) {
		p := v.snap.Policies[k]
		if slices.ContainsFunc(workloads, func(w *model.Workload) bool { return policySelects(p.Namespace, p.MeshWide, p.Selector, w) }) {
			lines = append(lines, fmt.Sprintf("%s %s, %s: enforced by the endpoints' ztunnels", k, p.Action, selectorString(p.Selector, p.MeshWide || p.Namespace == authz.DefaultRootNamespace)))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(v.snap.WaypointPolicies)) {
		p := v.snap.WaypointPolicies[k]
		for _, t := range p.Targets {
			if p.Namespace != ns {
				continue
			}
			if t.Kind == "Service" && t.Name == name || t.Kind == "Gateway" && slices.ContainsFunc(waypoints, func(r *model.WaypointRef) bool { return r.Name == t.Name && r.Namespace == ns }) {
				lines = append(lines, fmt.Sprintf("%s %s, targets %s %s: enforced by the waypoint", k, p.Action, t.Kind, t.Name))
			}
		}
	}
	list(d, "AuthorizationPolicies", lines, "none: every connection is allowed")
	var modes []string
	for _, w := range workloads {
		modes = append(modes, w.Name+" "+string(authz.Evaluator{}.PeerAuthnMode(v.snap, w)))
	}
	list(d, "PeerAuthentication", modes, "no endpoints")
	attached := map[string]bool{}
	for _, r := range v.snap.HTTPRoutes {
		for _, par := range r.Parents {
			if par.Kind == "Service" && par.Namespace == ns && par.Name == name {
				attached[r.Key()] = true
			}
		}
	}
	v.problemsFor(d, func(pr translate.Problem) bool {
		return pr.Namespace == ns && (pr.Kind == "Service" && pr.Name == name || pr.Kind == "HTTPRoute" && attached[translate.Key(pr.Namespace, pr.Name)])
	})
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
