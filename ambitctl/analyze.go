package ambitctl

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/ambitctl/analyzer"
	"github.com/ambit-mesh/ambit/istiod-lite/security"
)

type analyzeFlags struct {
	files         []string
	allNamespaces bool
	output        outputFlag
}

func newAnalyzeCommand(g *globalFlags) *cobra.Command {
	f := &analyzeFlags{}
	cmd := &cobra.Command{
		Use:   "analyze",
		Short: "Find misconfiguration in files or in the cluster",
		Long: `Analyze reads YAML files (-f, files or directories, read with istiod-lite's
own decoder) or the live cluster and reports, Istio-analyzer style, each
problem with a code, a severity, the object, a message and a fix:

  AMB0001 Error    istio.io/use-waypoint names a waypoint that does not exist
  AMB0002 Error    a waypoint Gateway's listener is not {mesh, 15008, HBONE}
  AMB0003 Error    an HTTPRoute's parent Service or Gateway does not exist
  AMB0004 Error    an HTTPRoute's backend Service does not exist
  AMB0005 Error    an HTTPRoute rule's backend weights sum to 0
  AMB0006 Warning  an AuthorizationPolicy's selector matches no workload
  AMB0007 Warning  a STRICT PeerAuthentication in a namespace not enrolled
  AMB0008 Warning  istio.io/use-waypoint names a waypoint not Programmed
  AMB0009 Error    istio.io/use-waypoint names a Gateway that is not a waypoint

It exits with status 1 when it finds an error.`,
		Example: `  # files, as in a CI check
  ambitctl analyze -f manifests/app/

  # the current namespace of the cluster, or all of them
  ambitctl analyze
  ambitctl analyze -A -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.output.validate(); err != nil {
				return err
			}
			return runAnalyze(cmd.Context(), cmd.OutOrStdout(), g, f)
		},
	}
	cmd.Flags().StringSliceVarP(&f.files, "filename", "f", nil, "YAML files or directories to analyze instead of the cluster (repeatable)")
	cmd.Flags().BoolVarP(&f.allNamespaces, "all-namespaces", "A", false, "analyze every namespace of the cluster")
	f.output.register(cmd)
	return cmd
}

func runAnalyze(ctx context.Context, out io.Writer, g *globalFlags, f *analyzeFlags) error {
	var in analyzer.Input
	var what, ns string
	if len(f.files) > 0 {
		var err error
		if in, err = analyzer.ReadFiles(f.files...); err != nil {
			return err
		}
		what = strings.Join(f.files, ", ")
	} else {
		c, err := g.cluster()
		if err != nil {
			return err
		}
		if err := c.readCluster(ctx, &in); err != nil {
			return err
		}
		what = "namespace " + c.namespace
		if f.allNamespaces {
			what = "all namespaces"
		} else {
			ns = c.namespace
		}
	}
	var findings []analyzer.Finding
	for _, fd := range analyzer.Analyze(in) {
		if ns == "" || findingNamespace(fd) == ns {
			findings = append(findings, fd)
		}
	}
	if findings == nil {
		findings = []analyzer.Finding{}
	}
	if ok, err := f.output.structured(out, findings); ok {
		if err != nil {
			return err
		}
	} else {
		if len(findings) == 0 {
			fmt.Fprintf(out, "✔ No validation issues found when analyzing %s.\n", what)
		}
		for _, fd := range findings {
			fmt.Fprintf(out, "%s [%s] (%s) %s\n    Fix: %s\n", fd.Severity, fd.Code, fd.Object, fd.Message, fd.Fix)
		}
	}
	errs := 0
	for _, fd := range findings {
		if fd.Severity == analyzer.Error {
			errs++
		}
	}
	if errs > 0 {
		return &ExitError{Code: 1, Err: fmt.Errorf("analyze found %d error(s) in %s", errs, what)}
	}
	return nil
}

// findingNamespace is the namespace of a finding's object ("Kind ns/name",
// or "Namespace name").
func findingNamespace(f analyzer.Finding) string {
	kind, rest, _ := strings.Cut(f.Object, " ")
	if kind == "Namespace" {
		return rest
	}
	ns, _, _ := strings.Cut(rest, "/")
	return ns
}

// readCluster lists what Analyze reads; kinds whose CRD is absent are empty.
func (c *cluster) readCluster(ctx context.Context, in *analyzer.Input) error {
	core := c.kube.CoreV1()
	nss, err := core.Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list namespaces", err)
	}
	for i := range nss.Items {
		in.Namespaces = append(in.Namespaces, &nss.Items[i])
	}
	pods, err := core.Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list pods", err)
	}
	for i := range pods.Items {
		in.Pods = append(in.Pods, &pods.Items[i])
	}
	svcs, err := core.Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list services", err)
	}
	for i := range svcs.Items {
		in.Services = append(in.Services, &svcs.Items[i])
	}
	apps := c.kube.AppsV1()
	add := func(kind string, om metav1.ObjectMeta, t corev1.PodTemplateSpec) {
		in.Workloads = append(in.Workloads, analyzer.Workload{Kind: kind, Namespace: om.Namespace, Name: om.Name, Labels: t.Labels})
	}
	deps, err := apps.Deployments("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list deployments", err)
	}
	for _, d := range deps.Items {
		add("Deployment", d.ObjectMeta, d.Spec.Template)
	}
	sts, err := apps.StatefulSets("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list statefulsets", err)
	}
	for _, d := range sts.Items {
		add("StatefulSet", d.ObjectMeta, d.Spec.Template)
	}
	dss, err := apps.DaemonSets("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return c.explain("list daemonsets", err)
	}
	for _, d := range dss.Items {
		add("DaemonSet", d.ObjectMeta, d.Spec.Template)
	}
	for _, k := range []struct {
		gvk schema.GroupVersionKind
		new func() any
	}{
		{gatewayGVK, func() any { return &gwv1.Gateway{} }},
		{gatewayGVK.GroupVersion().WithKind("HTTPRoute"), func() any { return &gwv1.HTTPRoute{} }},
		{security.GroupVersion.WithKind(security.KindAuthorizationPolicy), func() any { return &security.AuthorizationPolicy{} }},
		{security.GroupVersion.WithKind(security.KindPeerAuthentication), func() any { return &security.PeerAuthentication{} }},
	} {
		ri, _, err := c.resource(k.gvk, "")
		if meta.IsNoMatchError(err) {
			continue
		}
		if err != nil {
			return c.explain("list "+k.gvk.Kind+"s", err)
		}
		l, err := ri.List(ctx, metav1.ListOptions{})
		if err != nil {
			return c.explain("list "+k.gvk.Kind+"s", err)
		}
		for i := range l.Items {
			o := k.new()
			if err := fromUnstructured(&l.Items[i], o); err != nil {
				return fmt.Errorf("%s: %w", ref(&l.Items[i]), err)
			}
			in.Add(o)
		}
	}
	return nil
}
