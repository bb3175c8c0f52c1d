package ambitctl

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambit-mesh/ambit/model"
)

// Waypoint constants, as in Istio ambient.
const (
	WaypointClass    = "istio-waypoint"
	waypointListener = "mesh"
	hboneProtocol    = "HBONE"
)

var gatewayGVK = schema.GroupVersionKind{Group: "gateway.networking.k8s.io", Version: "v1", Kind: "Gateway"}

type waypointFlags struct {
	name            string
	forType         string
	enrollNamespace bool
	serviceAccount  string
	wait            bool
	timeout         time.Duration
	all             bool
	allNamespaces   bool
	output          outputFlag
}

func newWaypointCommand(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "waypoint",
		Aliases: []string{"waypoints", "wp"},
		Short:   "Manage waypoint proxies (L7 for a namespace or a service account)",
		Long: `A waypoint is a Gateway of class istio-waypoint with one listener, mesh on
15008 (HBONE). Traffic to the services (or workloads) that name it with the
label istio.io/use-waypoint goes through it for L7 routing and policy.`,
		Example: `  ambitctl waypoint apply -n demo --enroll-namespace --wait
  ambitctl waypoint apply -n demo --for-service-account reviews
  ambitctl waypoint list -A
  ambitctl waypoint status -n demo
  ambitctl waypoint delete -n demo waypoint`,
	}
	cmd.AddCommand(
		newWaypointGenerateCommand(g),
		newWaypointApplyCommand(g),
		newWaypointListCommand(g),
		newWaypointStatusCommand(g),
		newWaypointDeleteCommand(g),
	)
	return cmd
}

func (f *waypointFlags) registerShape(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.name, "name", "waypoint", "the waypoint's name (default with --for-service-account: the account's name)")
	fl.StringVar(&f.forType, "for", "service", "traffic the waypoint handles: service, workload, all or none (label istio.io/waypoint-for; default with --for-service-account: workload)")
	fl.StringVar(&f.serviceAccount, "for-service-account", "", "make a waypoint for this service account's workloads and bind them to it")
	_ = cmd.RegisterFlagCompletionFunc("for", cobra.FixedCompletions([]string{"service", "workload", "all", "none"}, cobra.ShellCompDirectiveNoFileComp))
}

// resolve applies the --for-service-account defaults and checks the flags.
func (f *waypointFlags) resolve(cmd *cobra.Command) error {
	if f.serviceAccount != "" {
		if !cmd.Flags().Changed("name") {
			f.name = f.serviceAccount
		}
		if !cmd.Flags().Changed("for") {
			f.forType = "workload"
		}
	}
	switch f.forType {
	case "service", "workload", "all", "none":
	default:
		return fmt.Errorf("--for %q: use service, workload, all or none", f.forType)
	}
	if f.name == "" || f.name == "none" {
		return fmt.Errorf("--name %q is not a usable waypoint name", f.name)
	}
	return nil
}

// waypointGateway is the Gateway istioctl's waypoint generate writes.
func waypointGateway(ns, name, forType string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": gatewayGVK.GroupVersion().String(),
		"kind":       gatewayGVK.Kind,
		"metadata": map[string]any{
			"name":      name,
			"namespace": ns,
			"labels":    map[string]any{model.LabelWaypointFor: forType},
		},
		"spec": map[string]any{
			"gatewayClassName": WaypointClass,
			"listeners": []any{map[string]any{
				"name":     waypointListener,
				"port":     int64(model.PortHBONE),
				"protocol": hboneProtocol,
			}},
		},
	}}
}

func (g *globalFlags) currentNamespace() string {
	ns, _, err := g.clientConfig().Namespace()
	if err != nil || ns == "" {
		return "default"
	}
	return ns
}

func newWaypointGenerateCommand(g *globalFlags) *cobra.Command {
	f := &waypointFlags{}
	cmd := &cobra.Command{
		Use:   "generate",
		Short: "Print a waypoint Gateway's YAML",
		Example: `  ambitctl waypoint generate -n demo > waypoint.yaml
  ambitctl waypoint generate -n demo --for-service-account reviews`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.resolve(cmd); err != nil {
				return err
			}
			return writeYAML(cmd.OutOrStdout(), []*unstructured.Unstructured{waypointGateway(g.currentNamespace(), f.name, f.forType)})
		},
	}
	f.registerShape(cmd)
	return cmd
}

func newWaypointApplyCommand(g *globalFlags) *cobra.Command {
	f := &waypointFlags{}
	cmd := &cobra.Command{
		Use:   "apply",
		Short: "Create or update a waypoint, optionally binding a namespace or service account to it",
		Long: `Apply creates (server-side, field manager ambitctl) a Gateway of class
istio-waypoint. --enroll-namespace labels the namespace
istio.io/use-waypoint=NAME so its services use it. --for-service-account SA
names the waypoint after the account (unless --name is given), makes it
a waypoint for workloads, and labels the pod templates of the Deployments,
StatefulSets and DaemonSets running as SA istio.io/use-waypoint=NAME; it
lists the pods it could not bind that way. --wait waits for Programmed=True.`,
		Example: `  # a waypoint for the namespace's services, used by all of them
  ambitctl waypoint apply -n demo --enroll-namespace --wait

  # a waypoint for the workloads of service account reviews
  ambitctl waypoint apply -n demo --for-service-account reviews`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.resolve(cmd); err != nil {
				return err
			}
			return runWaypointApply(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), g, f)
		},
	}
	f.registerShape(cmd)
	cmd.Flags().BoolVar(&f.enrollNamespace, "enroll-namespace", false, "label the namespace istio.io/use-waypoint=NAME")
	cmd.Flags().BoolVar(&f.wait, "wait", false, "wait until the waypoint is Programmed")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 2*time.Minute, "how long --wait waits")
	return cmd
}

func runWaypointApply(ctx context.Context, out, errOut io.Writer, g *globalFlags, f *waypointFlags) error {
	c, err := g.cluster()
	if err != nil {
		return err
	}
	ns := c.namespace
	if _, err := c.kube.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		return fmt.Errorf("namespace %s not found (choose one with -n)", ns)
	} else if err != nil {
		return c.explain("get namespace "+ns, err)
	}
	gw := waypointGateway(ns, f.name, f.forType)
	if err := c.apply(ctx, gw); err != nil {
		return err
	}
	fmt.Fprintf(out, "✔ waypoint %s/%s applied\n", ns, f.name)
	if f.enrollNamespace {
		v := f.name
		_, err := c.kube.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType,
			labelPatch(map[string]*string{model.LabelUseWaypoint: &v}), metav1.PatchOptions{FieldManager: FieldManager})
		if err != nil {
			return c.explain("label namespace "+ns, err)
		}
		fmt.Fprintf(out, "✔ namespace %s labelled %s=%s\n", ns, model.LabelUseWaypoint, f.name)
	}
	if f.serviceAccount != "" {
		if err := c.bindServiceAccount(ctx, out, errOut, ns, f.serviceAccount, f.name); err != nil {
			return err
		}
	}
	if f.wait {
		return waiter{Out: out, Timeout: f.timeout}.wait(ctx, []readiness{c.conditionReadiness(gw, "Programmed")})
	}
	return nil
}

// bindServiceAccount labels the pod templates of sa's workloads
// istio.io/use-waypoint=name and reports the pods it cannot bind that way.
func (c *cluster) bindServiceAccount(ctx context.Context, out, errOut io.Writer, ns, sa, name string) error {
	if _, err := c.kube.CoreV1().ServiceAccounts(ns).Get(ctx, sa, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		fmt.Fprintf(errOut, "warning: service account %s/%s does not exist (yet)\n", ns, sa)
	} else if err != nil {
		return c.explain("get service account "+ns+"/"+sa, err)
	}
	runsAs := func(spec corev1.PodSpec) bool {
		s := spec.ServiceAccountName
		if s == "" {
			s = "default"
		}
		return s == sa
	}
	patch := []byte(fmt.Sprintf(`{"spec":{"template":{"metadata":{"labels":{%q:%q}}}}}`, model.LabelUseWaypoint, name))
	bound := map[string]bool{} // "Kind/name" of patched owners
	apps := c.kube.AppsV1()
	type workload struct {
		kind, name string
		spec       corev1.PodSpec
		labels     map[string]string
		patch      func() error
	}
	var ws []workload
	deps, err := apps.Deployments(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list deployments in "+ns, err)
	}
	for _, d := range deps.Items {
		ws = append(ws, workload{"Deployment", d.Name, d.Spec.Template.Spec, d.Spec.Template.Labels, func() error {
			_, err := apps.Deployments(ns).Patch(ctx, d.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager})
			return err
		}})
	}
	sts, err := apps.StatefulSets(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list statefulsets in "+ns, err)
	}
	for _, d := range sts.Items {
		ws = append(ws, workload{"StatefulSet", d.Name, d.Spec.Template.Spec, d.Spec.Template.Labels, func() error {
			_, err := apps.StatefulSets(ns).Patch(ctx, d.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager})
			return err
		}})
	}
	dss, err := apps.DaemonSets(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list daemonsets in "+ns, err)
	}
	for _, d := range dss.Items {
		ws = append(ws, workload{"DaemonSet", d.Name, d.Spec.Template.Spec, d.Spec.Template.Labels, func() error {
			_, err := apps.DaemonSets(ns).Patch(ctx, d.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager})
			return err
		}})
	}
	for _, w := range ws {
		if !runsAs(w.spec) {
			continue
		}
		bound[w.kind+"/"+w.name] = true
		if w.labels[model.LabelUseWaypoint] == name {
			fmt.Fprintf(out, "✔ %s %s/%s already uses waypoint %s\n", w.kind, ns, w.name, name)
			continue
		}
		if err := w.patch(); err != nil {
			return c.explain("label the pod template of "+w.kind+" "+ns+"/"+w.name, err)
		}
		fmt.Fprintf(out, "✔ %s %s/%s: pod template labelled %s=%s (its pods restart)\n", w.kind, ns, w.name, model.LabelUseWaypoint, name)
	}
	// Pods of sa that no patched owner covers.
	pods, err := c.kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list pods in "+ns, err)
	}
	rsOwner := map[string]string{} // ReplicaSet name -> its Deployment
	if rss, err := apps.ReplicaSets(ns).List(ctx, metav1.ListOptions{}); err == nil {
		for _, rs := range rss.Items {
			if o := controllerOf(rs.OwnerReferences); o != nil && o.Kind == "Deployment" {
				rsOwner[rs.Name] = o.Name
			}
		}
	}
	var unbound []string
	for _, p := range pods.Items {
		if !runsAs(p.Spec) || p.Labels[model.LabelUseWaypoint] == name {
			continue
		}
		owner := "no owner"
		if o := controllerOf(p.OwnerReferences); o != nil {
			key := o.Kind + "/" + o.Name
			if o.Kind == "ReplicaSet" && rsOwner[o.Name] != "" {
				key = "Deployment/" + rsOwner[o.Name]
			}
			if bound[key] {
				continue
			}
			owner = "owner " + strings.Replace(key, "/", " ", 1)
		}
		unbound = append(unbound, fmt.Sprintf("%s (%s)", p.Name, owner))
	}
	sort.Strings(unbound)
	for _, u := range unbound {
		fmt.Fprintf(errOut, "warning: pod %s/%s runs as %s but is not bound: label it or its owner's pod template %s=%s\n", ns, u, sa, model.LabelUseWaypoint, name)
	}
	if len(bound) == 0 && len(unbound) == 0 {
		fmt.Fprintf(errOut, "warning: no workload in %s runs as service account %s: label its pod template %s=%s when you deploy it\n", ns, sa, model.LabelUseWaypoint, name)
	}
	return nil
}

func controllerOf(refs []metav1.OwnerReference) *metav1.OwnerReference {
	for i := range refs {
		if refs[i].Controller != nil && *refs[i].Controller {
			return &refs[i]
		}
	}
	return nil
}

// gateways returns the client of Gateways in ns ("" for all namespaces).
func (c *cluster) gateways(ns string) (interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions, sub ...string) (*unstructured.Unstructured, error)
	List(ctx context.Context, opts metav1.ListOptions) (*unstructured.UnstructuredList, error)
	Delete(ctx context.Context, name string, opts metav1.DeleteOptions, sub ...string) error
}, error) {
	ri, _, err := c.resource(gatewayGVK, ns)
	if err != nil {
		return nil, c.explain("gateways", err)
	}
	return ri, nil
}

// getGateway gets a Gateway; a missing Gateway CRD reads as not found.
func (c *cluster) getGateway(ctx context.Context, ns, name string) (*unstructured.Unstructured, error) {
	ri, _, err := c.resource(gatewayGVK, ns)
	if meta.IsNoMatchError(err) {
		return nil, apierrors.NewNotFound(schema.GroupResource{Group: gatewayGVK.Group, Resource: "gateways"}, name)
	}
	if err != nil {
		return nil, c.explain("get Gateway "+ns+"/"+name, err)
	}
	u, err := ri.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, err
	}
	return u, c.explain("get Gateway "+ns+"/"+name, err)
}

// listWaypoints lists the Gateways of class istio-waypoint, sorted.
func (c *cluster) listWaypoints(ctx context.Context, ns string) ([]*unstructured.Unstructured, error) {
	ri, err := c.gateways(ns)
	if err != nil {
		return nil, err
	}
	l, err := ri.List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, c.explain("list gateways", err)
	}
	var out []*unstructured.Unstructured
	for i := range l.Items {
		if isWaypoint(&l.Items[i]) {
			out = append(out, &l.Items[i])
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].GetNamespace() != out[j].GetNamespace() {
			return out[i].GetNamespace() < out[j].GetNamespace()
		}
		return out[i].GetName() < out[j].GetName()
	})
	return out, nil
}

func isWaypoint(u *unstructured.Unstructured) bool {
	class, _, _ := unstructured.NestedString(u.Object, "spec", "gatewayClassName")
	return class == WaypointClass
}

func waypointFor(u *unstructured.Unstructured) string {
	if v := u.GetLabels()[model.LabelWaypointFor]; v != "" {
		return v
	}
	return "service"
}

func newWaypointListCommand(g *globalFlags) *cobra.Command {
	f := &waypointFlags{}
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List waypoints",
		Example: `  ambitctl waypoint list -n demo
  ambitctl waypoint list -A -o yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.output.validate(); err != nil {
				return err
			}
			c, err := g.cluster()
			if err != nil {
				return err
			}
			ns := c.namespace
			if f.allNamespaces {
				ns = ""
			}
			wps, err := c.listWaypoints(cmd.Context(), ns)
			if err != nil {
				return err
			}
			items := make([]any, len(wps))
			for i, w := range wps {
				items[i] = w.Object
			}
			if ok, err := f.output.structured(cmd.OutOrStdout(), map[string]any{"apiVersion": "v1", "kind": "List", "items": items}); ok {
				return err
			}
			if len(wps) == 0 {
				where := "namespace " + ns
				if ns == "" {
					where = "any namespace"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "No waypoints in %s.\n", where)
				return nil
			}
			var rows [][]string
			for _, w := range wps {
				status, _, _, found := findCondition(w, "Programmed")
				if !found {
					status = "Unknown"
				}
				rows = append(rows, []string{w.GetNamespace(), w.GetName(), waypointFor(w), status, strings.Join(gatewayAddresses(w), ",")})
			}
			return printTable(cmd.OutOrStdout(), []string{"NAMESPACE", "NAME", "FOR", "PROGRAMMED", "ADDRESS"}, rows)
		},
	}
	cmd.Flags().BoolVarP(&f.allNamespaces, "all-namespaces", "A", false, "list waypoints in every namespace")
	f.output.register(cmd)
	return cmd
}

func gatewayAddresses(u *unstructured.Unstructured) []string {
	addrs, _, _ := unstructured.NestedSlice(u.Object, "status", "addresses")
	var out []string
	for _, a := range addrs {
		if m, ok := a.(map[string]any); ok {
			if v, ok := m["value"].(string); ok {
				out = append(out, v)
			}
		}
	}
	return out
}

func newWaypointStatusCommand(g *globalFlags) *cobra.Command {
	f := &waypointFlags{}
	cmd := &cobra.Command{
		Use:   "status [NAME]",
		Short: "Show a waypoint's conditions (default: every waypoint of the namespace)",
		Example: `  ambitctl waypoint status -n demo
  ambitctl waypoint status -n demo reviews -o yaml`,
		Args:              cobra.MaximumNArgs(1),
		ValidArgsFunction: g.completeWaypoints,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := f.output.validate(); err != nil {
				return err
			}
			c, err := g.cluster()
			if err != nil {
				return err
			}
			var wps []*unstructured.Unstructured
			if len(args) == 1 {
				w, err := c.getGateway(cmd.Context(), c.namespace, args[0])
				if apierrors.IsNotFound(err) {
					return fmt.Errorf("waypoint %s not found in namespace %s (list them: ambitctl waypoint list -A)", args[0], c.namespace)
				}
				if err != nil {
					return err
				}
				wps = append(wps, w)
			} else if wps, err = c.listWaypoints(cmd.Context(), c.namespace); err != nil {
				return err
			}
			type status struct {
				Namespace string         `json:"namespace"`
				Name      string         `json:"name"`
				Status    map[string]any `json:"status"`
			}
			var sts []status
			for _, w := range wps {
				s, _, _ := unstructured.NestedMap(w.Object, "status")
				sts = append(sts, status{w.GetNamespace(), w.GetName(), s})
			}
			if ok, err := f.output.structured(cmd.OutOrStdout(), sts); ok {
				return err
			}
			if len(wps) == 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "No waypoints in namespace %s.\n", c.namespace)
				return nil
			}
			var rows [][]string
			for _, w := range wps {
				rows = append(rows, conditionRows(w)...)
			}
			return printTable(cmd.OutOrStdout(), []string{"NAMESPACE", "NAME", "CONDITION", "STATUS", "REASON", "MESSAGE"}, rows)
		},
	}
	f.output.register(cmd)
	return cmd
}

// conditionRows are a Gateway's conditions, then its listeners'.
func conditionRows(w *unstructured.Unstructured) [][]string {
	var rows [][]string
	add := func(prefix string, conds []any) {
		for _, c := range conds {
			m, ok := c.(map[string]any)
			if !ok {
				continue
			}
			s := func(k string) string { v, _ := m[k].(string); return v }
			rows = append(rows, []string{w.GetNamespace(), w.GetName(), prefix + s("type"), s("status"), s("reason"), s("message")})
		}
	}
	conds, _, _ := unstructured.NestedSlice(w.Object, "status", "conditions")
	add("", conds)
	listeners, _, _ := unstructured.NestedSlice(w.Object, "status", "listeners")
	for _, l := range listeners {
		m, _ := l.(map[string]any)
		name, _ := m["name"].(string)
		lc, _ := m["conditions"].([]any)
		add("listener "+name+": ", lc)
	}
	if len(rows) == 0 {
		rows = append(rows, []string{w.GetNamespace(), w.GetName(), "Programmed", "Unknown", "NotReported", "no controller has reported on this waypoint (is istiod-lite running?)"})
	}
	return rows
}

func newWaypointDeleteCommand(g *globalFlags) *cobra.Command {
	f := &waypointFlags{}
	cmd := &cobra.Command{
		Use:   "delete NAME... | --all",
		Short: "Delete waypoints",
		Long: `Delete removes waypoint Gateways by name, or every waypoint of the namespace
with --all. It refuses to delete a Gateway that is not a waypoint. Labels that
name the waypoint stay: their traffic fails closed until a waypoint of that
name exists again or the labels are removed.`,
		Example: `  ambitctl waypoint delete -n demo waypoint
  ambitctl waypoint delete -n demo --all`,
		ValidArgsFunction: g.completeWaypoints,
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.all == (len(args) > 0) {
				return fmt.Errorf("name the waypoints to delete, or give --all (not both)")
			}
			c, err := g.cluster()
			if err != nil {
				return err
			}
			ctx, ns := cmd.Context(), c.namespace
			if f.all {
				wps, err := c.listWaypoints(ctx, ns)
				if err != nil {
					return err
				}
				for _, w := range wps {
					args = append(args, w.GetName())
				}
				if len(args) == 0 {
					fmt.Fprintf(cmd.OutOrStdout(), "No waypoints in namespace %s.\n", ns)
					return nil
				}
			}
			ri, err := c.gateways(ns)
			if err != nil {
				return err
			}
			for _, name := range args {
				w, err := c.getGateway(ctx, ns, name)
				if apierrors.IsNotFound(err) {
					return fmt.Errorf("waypoint %s not found in namespace %s", name, ns)
				}
				if err != nil {
					return err
				}
				if !isWaypoint(w) {
					return fmt.Errorf("gateway %s/%s is not a waypoint (its class is not %s): not deleted", ns, name, WaypointClass)
				}
				if err := ri.Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
					return c.explain("delete waypoint "+ns+"/"+name, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "✔ waypoint %s/%s deleted\n", ns, name)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&f.all, "all", false, "delete every waypoint of the namespace")
	return cmd
}

func (g *globalFlags) completeWaypoints(cmd *cobra.Command, _ []string, _ string) ([]string, cobra.ShellCompDirective) {
	c, err := g.cluster()
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	wps, err := c.listWaypoints(cmd.Context(), c.namespace)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []string
	for _, w := range wps {
		names = append(names, w.GetName())
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}
