package ambitctl

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambit-mesh/ambit/model"
)

// LabelUseWaypointNamespace names the namespace of a waypoint in another
// namespace (Istio's label).
const LabelUseWaypointNamespace = "istio.io/use-waypoint-namespace"

func newEnrollCommand(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "enroll NAMESPACE",
		Short: "Add a namespace's pods to the mesh",
		Long: `Enroll labels the namespace istio.io/dataplane-mode=ambient: the ztunnel of
each node captures its pods' traffic and carries it in mutual TLS. It warns
about pods that opt out (istio.io/dataplane-mode=none) and about
istio.io/use-waypoint labels naming a waypoint that does not exist.`,
		Example: `  ambitctl enroll demo`,
		Args:    exactArgs(1, "NAMESPACE"),
		ValidArgsFunction: func(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
			if len(args) > 0 {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			return g.completeNamespaces(cmd)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runEnroll(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), g, args[0], true)
		},
	}
}

func newUnenrollCommand(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "unenroll NAMESPACE",
		Short: "Take a namespace's pods out of the mesh",
		Long: `Unenroll removes the label istio.io/dataplane-mode from the namespace: its
pods' traffic is no longer captured (nor encrypted) by the ztunnels.`,
		Example: `  ambitctl unenroll demo`,
		Args:    exactArgs(1, "NAMESPACE"),
		ValidArgsFunction: func(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
			if len(args) > 0 {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			return g.completeNamespaces(cmd)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runEnroll(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), g, args[0], false)
		},
	}
}

// exactArgs is cobra.ExactArgs with a message naming what is missing.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return fmt.Errorf("%s takes %s (got %d arguments); see %s --help", cmd.Name(), what, len(args), cmd.CommandPath())
		}
		return nil
	}
}

// labelPatch is a merge patch setting (or, with a nil value, removing)
// metadata labels.
func labelPatch(labels map[string]*string) []byte {
	b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": labels}})
	return b
}

func runEnroll(ctx context.Context, out, errOut io.Writer, g *globalFlags, ns string, enroll bool) error {
	c, err := g.cluster()
	if err != nil {
		return err
	}
	var v *string
	if enroll {
		a := model.DataplaneAmbient
		v = &a
	}
	_, err = c.kube.CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType,
		labelPatch(map[string]*string{model.LabelDataplaneMode: v}), metav1.PatchOptions{FieldManager: FieldManager})
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("namespace %s not found (create it first: kubectl create namespace %s)", ns, ns)
	}
	if err != nil {
		return c.explain("label namespace "+ns, err)
	}
	if !enroll {
		fmt.Fprintf(out, "✔ namespace %s unenrolled (label %s removed)\n", ns, model.LabelDataplaneMode)
		return nil
	}
	fmt.Fprintf(out, "✔ namespace %s enrolled (%s=%s)\n", ns, model.LabelDataplaneMode, model.DataplaneAmbient)
	warnings, err := c.enrollWarnings(ctx, ns)
	if err != nil {
		return err
	}
	if _, err := c.kube.AppsV1().DaemonSets(controlPlaneNamespace).Get(ctx, "ztunnel", metav1.GetOptions{}); apierrors.IsNotFound(err) {
		warnings = append(warnings, fmt.Sprintf("ambit is not installed (no DaemonSet %s/ztunnel): nothing captures the namespace's traffic until you run ambitctl install", controlPlaneNamespace))
	}
	for _, w := range warnings {
		fmt.Fprintln(errOut, "warning:", w)
	}
	return nil
}

// enrollWarnings lists what will not work as the user expects in an
// enrolled namespace: pods that opt out, waypoint labels that point nowhere.
func (c *cluster) enrollWarnings(ctx context.Context, ns string) ([]string, error) {
	var warnings []string
	nsObj, err := c.kube.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if err != nil {
		return nil, c.explain("get namespace "+ns, err)
	}
	pods, err := c.kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, c.explain("list pods in "+ns, err)
	}
	svcs, err := c.kube.CoreV1().Services(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, c.explain("list services in "+ns, err)
	}
	var optOut []string
	for _, p := range pods.Items {
		if p.Labels[model.LabelDataplaneMode] == model.DataplaneNone {
			optOut = append(optOut, p.Name)
		}
	}
	sort.Strings(optOut)
	for _, p := range optOut {
		warnings = append(warnings, fmt.Sprintf("pod %s/%s opts out (%s=%s): its traffic stays outside the mesh", ns, p, model.LabelDataplaneMode, model.DataplaneNone))
	}
	type labelled struct {
		what   string
		labels map[string]string
	}
	targets := []labelled{{"namespace " + ns, nsObj.Labels}}
	for _, s := range svcs.Items {
		targets = append(targets, labelled{"service " + ns + "/" + s.Name, s.Labels})
	}
	for _, p := range pods.Items {
		targets = append(targets, labelled{"pod " + ns + "/" + p.Name, p.Labels})
	}
	exists := map[string]bool{}
	for _, t := range targets {
		wp := t.labels[model.LabelUseWaypoint]
		if wp == "" || wp == "none" {
			continue
		}
		wpNS := ns
		if v := t.labels[LabelUseWaypointNamespace]; v != "" {
			wpNS = v
		}
		key := wpNS + "/" + wp
		found, ok := exists[key]
		if !ok {
			_, err := c.getGateway(ctx, wpNS, wp)
			switch {
			case apierrors.IsNotFound(err):
			case err != nil:
				return nil, err
			default:
				found = true
			}
			exists[key] = found
		}
		if !found {
			warnings = append(warnings, fmt.Sprintf("%s has %s=%s but Gateway %s does not exist: its traffic fails closed (create it: ambitctl waypoint apply -n %s --name %s)",
				t.what, model.LabelUseWaypoint, wp, key, wpNS, wp))
		}
	}
	return warnings, nil
}
