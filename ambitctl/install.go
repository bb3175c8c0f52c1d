package ambitctl

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

type installFlags struct {
	images
	dryRun  bool
	wait    bool
	timeout time.Duration
	set     []string // key=value settings (applySettings)
}

func newInstallCommand(g *globalFlags) *cobra.Command {
	f := &installFlags{}
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install ambit from the manifests embedded in ambitctl",
		Long: `Install applies ambit's manifests, embedded in this binary, server-side
with the field manager "ambitctl": the CRDs first (waiting until the API
server serves them), then the namespace, RBAC, istiod-lite and the ztunnel
DaemonSet. It then waits until istiod-lite and the ztunnels are ready,
printing what it waits for, and fails naming the object that is not ready.
Running it again upgrades in place.`,
		Example: `  # install and wait up to 5 minutes for the control plane and node proxies
  ambitctl install

  # images from your registry
  ambitctl install --hub registry.example.com/mesh --tag 0.3.0

  # print what would be applied
  ambitctl install --dry-run > ambit.yaml

  # proxies take their identities from SPIRE agents (docs/spire.md)
  ambitctl install --set identity=spire`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runInstall(cmd.Context(), cmd.OutOrStdout(), g, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.Hub, "hub", "", "image repository prefix for ambit's images (default: the manifests')")
	fl.StringVar(&f.Tag, "tag", "", "image tag for ambit's images (default: the manifests')")
	fl.BoolVar(&f.dryRun, "dry-run", false, "print the YAML that would be applied and change nothing")
	fl.BoolVar(&f.wait, "wait", true, "wait for the control plane and node proxies to be ready")
	fl.DurationVar(&f.timeout, "timeout", 5*time.Minute, "how long to wait for CRDs and readiness")
	fl.StringArrayVar(&f.set, "set", nil, "installation setting key=value; identity=ca (default: istiod-lite signs proxies' certificates) or identity=spire (SPIRE agents do: manifests/components/spire)")
	return cmd
}

func runInstall(ctx context.Context, out io.Writer, g *globalFlags, f *installFlags) error {
	objs, err := render(f.images)
	if err != nil {
		return err
	}
	if err := applySettings(objs, f.set); err != nil {
		return err
	}
	if f.dryRun {
		return writeYAML(out, objs)
	}
	if f.timeout <= 0 {
		return fmt.Errorf("--timeout must be positive")
	}
	c, err := g.cluster()
	if err != nil {
		return err
	}
	var crds, rest []*unstructured.Unstructured
	for _, o := range objs {
		if isCRD(o) {
			crds = append(crds, o)
		} else {
			rest = append(rest, o)
		}
	}
	w := waiter{Out: out, Timeout: f.timeout}
	var established []readiness
	for _, o := range crds {
		if err := c.apply(ctx, o); err != nil {
			return err
		}
		fmt.Fprintf(out, "applied %s\n", ref(o))
		r, _ := c.readinessOf(o)
		established = append(established, r)
	}
	if len(crds) > 0 {
		if err := w.wait(ctx, established); err != nil {
			return err
		}
		c.mapper.Reset() // the new kinds
	}
	var waits []readiness
	for _, o := range rest {
		if err := c.apply(ctx, o); err != nil {
			return err
		}
		fmt.Fprintf(out, "applied %s\n", ref(o))
		if r, ok := c.readinessOf(o); ok {
			waits = append(waits, r)
		}
	}
	if !f.wait {
		fmt.Fprintln(out, "✔ ambit applied (not waiting for readiness: --wait=false)")
		return nil
	}
	if err := w.wait(ctx, waits); err != nil {
		return err
	}
	fmt.Fprintln(out, "✔ ambit installed")
	return nil
}

func isCRD(o *unstructured.Unstructured) bool {
	return o.GroupVersionKind().GroupKind() == schema.GroupKind{Group: "apiextensions.k8s.io", Kind: "CustomResourceDefinition"}
}

type uninstallFlags struct {
	purge  bool
	dryRun bool
}

func newUninstallCommand(g *globalFlags) *cobra.Command {
	f := &uninstallFlags{}
	cmd := &cobra.Command{
		Use:   "uninstall",
		Short: "Remove what ambitctl install created",
		Long: `Uninstall deletes the objects of the embedded installation, found by name:
istiod-lite, the ztunnel DaemonSet, their RBAC, the istio-waypoint
GatewayClass and the ambit-system namespace. It never deletes your
Gateways, routes or policies, nor namespace labels. The CRDs stay unless
--purge is given (deleting a CRD deletes every object of its kind).`,
		Example: `  ambitctl uninstall

  # also delete the CRDs, and with them every Gateway, HTTPRoute and policy
  ambitctl uninstall --purge`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runUninstall(cmd.Context(), cmd.OutOrStdout(), g, f)
		},
	}
	cmd.Flags().BoolVar(&f.purge, "purge", false, "also delete ambit's CRDs and so every object of their kinds")
	cmd.Flags().BoolVar(&f.dryRun, "dry-run", false, "print what would be deleted and change nothing")
	return cmd
}

func runUninstall(ctx context.Context, out io.Writer, g *globalFlags, f *uninstallFlags) error {
	objs, err := render(images{})
	if err != nil {
		return err
	}
	c, err := g.cluster()
	if err != nil {
		return err
	}
	// Reverse order: workloads before their RBAC and namespace, CRDs last.
	for i := len(objs) - 1; i >= 0; i-- {
		o := objs[i]
		if isCRD(o) && !f.purge {
			continue
		}
		ri, _, err := c.resource(o.GroupVersionKind(), o.GetNamespace())
		if meta.IsNoMatchError(err) {
			continue // its CRD is gone: so is it
		}
		if err != nil {
			return c.explain("delete "+ref(o), err)
		}
		if isCRD(o) {
			if n := c.countObjects(ctx, o); n > 0 {
				fmt.Fprintf(out, "warning: deleting %s deletes its %d object(s)\n", ref(o), n)
			}
		}
		if f.dryRun {
			if _, err := ri.Get(ctx, o.GetName(), metav1.GetOptions{}); err == nil {
				fmt.Fprintf(out, "would delete %s\n", ref(o))
			}
			continue
		}
		bg := metav1.DeletePropagationBackground
		err = ri.Delete(ctx, o.GetName(), metav1.DeleteOptions{PropagationPolicy: &bg})
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			return c.explain("delete "+ref(o), err)
		default:
			fmt.Fprintf(out, "deleted %s\n", ref(o))
		}
	}
	if !f.purge {
		fmt.Fprintln(out, "CRDs kept, and with them your Gateways, routes and policies (uninstall --purge deletes them)")
	}
	if !f.dryRun {
		fmt.Fprintln(out, "✔ ambit uninstalled")
	}
	return nil
}

// countObjects counts the objects a CRD serves (0 when unknown).
func (c *cluster) countObjects(ctx context.Context, crd *unstructured.Unstructured) int {
	group, _, _ := unstructured.NestedString(crd.Object, "spec", "group")
	plural, _, _ := unstructured.NestedString(crd.Object, "spec", "names", "plural")
	versions, _, _ := unstructured.NestedSlice(crd.Object, "spec", "versions")
	for _, v := range versions {
		vm, _ := v.(map[string]any)
		if served, _ := vm["served"].(bool); !served {
			continue
		}
		name, _ := vm["name"].(string)
		l, err := c.dyn.Resource(schema.GroupVersionResource{Group: group, Version: name, Resource: plural}).List(ctx, metav1.ListOptions{})
		if err != nil {
			return 0
		}
		return len(l.Items)
	}
	return 0
}
