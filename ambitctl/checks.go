package ambitctl

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/version"

	"github.com/ambit-mesh/ambit/istiod-lite/ca"
)

// Check results.
const (
	checkOK    = "OK"
	checkWarn  = "WARN"
	checkError = "ERROR"
)

// checkResult is one line of precheck or check.
type checkResult struct {
	Check   string `json:"check"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

// checkReport collects results and prints them; errors make the exit code 1.
type checkReport struct {
	Results []checkResult `json:"results"`
}

func (r *checkReport) add(check, status, format string, args ...any) {
	r.Results = append(r.Results, checkResult{Check: check, Status: status, Message: fmt.Sprintf(format, args...)})
}

func (r *checkReport) print(out io.Writer, o *outputFlag, what string) error {
	if done, err := o.structured(out, r); done {
		if err != nil {
			return err
		}
	} else {
		rows := [][]string{}
		for _, x := range r.Results {
			rows = append(rows, []string{x.Check, x.Status, x.Message})
		}
		if err := printTable(out, []string{"CHECK", "STATUS", "MESSAGE"}, rows); err != nil {
			return err
		}
	}
	n := 0
	for _, x := range r.Results {
		if x.Status == checkError {
			n++
		}
	}
	if n > 0 {
		return fmt.Errorf("%s found %d error(s): see the ERROR lines above", what, n)
	}
	return nil
}

// MinKubernetes is the oldest API server ambit supports (server-side
// apply of the CRDs, projected token audiences, sidecar-free pod networking).
var minKubernetes = version.MustParseGeneric("1.28.0")

// crdGroups are the API groups whose CRDs ambit installs or would clash
// with: Istio's and Gateway API's.
var crdGroups = []string{"gateway.networking.k8s.io", "networking.istio.io", "security.istio.io", "telemetry.istio.io", "extensions.istio.io", "install.istio.io"}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

func newPrecheckCommand(g *globalFlags) *cobra.Command {
	var out outputFlag
	cmd := &cobra.Command{
		Use:   "precheck",
		Short: "Check a cluster before installing ambit",
		Long: `precheck looks at the cluster ambitctl would install into: the API server's
version, Istio or Gateway API CRDs that already exist and who manages them
(Helm, istioctl, another tool: installing would take their fields over), an
Istio control plane or an earlier ambit, and the nodes' kernels (ztunnel's
eBPF capture attaches TCX programs: Linux 6.6 or later).

It exits 1 when it finds an error.`,
		Example: `  ambitctl precheck
  ambitctl precheck -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			c, err := g.cluster()
			if err != nil {
				return err
			}
			r, err := c.precheck(cmd.Context())
			if err != nil {
				return err
			}
			return r.print(cmd.OutOrStdout(), &out, "precheck")
		},
	}
	out.register(cmd)
	return cmd
}

func (c *cluster) precheck(ctx context.Context) (*checkReport, error) {
	r := &checkReport{}
	sv, err := c.kube.Discovery().ServerVersion()
	if err != nil {
		return nil, c.explain("read the API server version", err)
	}
	v, perr := version.ParseGeneric(sv.GitVersion)
	switch {
	case perr != nil || v.Major() == 0:
		r.add("kubernetes version", checkWarn, "%q is a development build or unparsable: cannot tell whether it is %s or later", sv.GitVersion, minKubernetes)
	case v.LessThan(minKubernetes):
		r.add("kubernetes version", checkError, "%s is older than %s, the oldest ambit supports", sv.GitVersion, minKubernetes)
	default:
		r.add("kubernetes version", checkOK, "%s (%s or later required)", sv.GitVersion, minKubernetes)
	}

	crds, err := c.dyn.Resource(crdGVR).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, c.explain("list CustomResourceDefinitions", err)
	}
	found := 0
	for _, crd := range crds.Items {
		group, _, _ := unstructuredString(crd.Object, "spec", "group")
		if !slices.Contains(crdGroups, group) {
			continue
		}
		found++
		owners := crdOwners(crd.GetLabels(), crd.GetAnnotations(), crd.GetManagedFields())
		name := "CRD " + crd.GetName()
		switch {
		case len(owners) == 0 || slices.Equal(owners, []string{"ambitctl"}):
			r.add(name, checkOK, "exists, applied by ambitctl before: install upgrades it")
		case !strings.HasSuffix(group, "istio.io"):
			r.add(name, checkWarn, "exists, managed by %s: install applies ambit's copy over it (server-side apply, forced)%s", strings.Join(owners, ", "), bundleVersion(crd.GetAnnotations()))
		default:
			r.add(name, checkWarn, "exists, managed by %s: an Istio install? install takes its fields over, and uninstall --purge would delete it", strings.Join(owners, ", "))
		}
	}
	if found == 0 {
		r.add("CRDs", checkOK, "no Istio or Gateway API CRDs: install adds them")
	}

	if d, err := c.kube.AppsV1().Deployments("istio-system").Get(ctx, "istiod", metav1.GetOptions{}); err == nil {
		r.add("istio control plane", checkError, "Deployment %s/%s exists: Istio and ambit would both program the cluster's Gateways and policies; uninstall Istio first", d.Namespace, d.Name)
	} else if !apierrors.IsNotFound(err) {
		return nil, c.explain("get Deployment istio-system/istiod", err)
	} else {
		r.add("istio control plane", checkOK, "no istiod in istio-system")
	}
	if ns, err := c.kube.CoreV1().Namespaces().Get(ctx, controlPlaneNamespace, metav1.GetOptions{}); err == nil {
		r.add("namespace "+controlPlaneNamespace, checkWarn, "exists (created %s): ambit is installed already? install upgrades it in place", ns.CreationTimestamp.UTC().Format(time.RFC3339))
	} else if !apierrors.IsNotFound(err) {
		return nil, c.explain("get namespace "+controlPlaneNamespace, err)
	} else {
		r.add("namespace "+controlPlaneNamespace, checkOK, "does not exist: install creates it")
	}

	nodes, err := c.kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, c.explain("list nodes", err)
	}
	if len(nodes.Items) == 0 {
		r.add("nodes", checkWarn, "no nodes registered: ztunnel has nowhere to run yet")
	}
	for _, n := range nodes.Items {
		k := n.Status.NodeInfo.KernelVersion
		kv, err := version.ParseGeneric(k)
		switch {
		case k == "" || err != nil:
			r.add("node "+n.Name, checkWarn, "kernel version %q unknown: ztunnel's capture needs Linux 6.6+ (TCX)", k)
		case kv.LessThan(version.MajorMinor(6, 6)):
			r.add("node "+n.Name, checkError, "kernel %s: ztunnel's eBPF capture attaches TCX programs, which need Linux 6.6 or later", k)
		default:
			r.add("node "+n.Name, checkOK, "kernel %s, %s", k, n.Status.NodeInfo.OSImage)
		}
	}
	return r, nil
}

// crdOwners names who manages a CRD: Helm releases, a managed-by label, the
// field managers that applied or updated it (the API server's own excluded).
func crdOwners(labels, annotations map[string]string, mfs []metav1.ManagedFieldsEntry) []string {
	var out []string
	if rel := annotations["meta.helm.sh/release-name"]; rel != "" {
		out = append(out, "helm release "+annotations["meta.helm.sh/release-namespace"]+"/"+rel)
	}
	if m := labels["app.kubernetes.io/managed-by"]; m != "" && m != "Helm" {
		out = append(out, m)
	}
	for _, mf := range mfs {
		if mf.Manager == "" || mf.Manager == "kube-apiserver" || mf.Subresource == "status" {
			continue
		}
		if mf.Manager == "helm" && len(out) > 0 && strings.HasPrefix(out[0], "helm release ") {
			continue
		}
		if !slices.Contains(out, mf.Manager) {
			out = append(out, mf.Manager)
		}
	}
	return out
}

func bundleVersion(a map[string]string) string {
	if v := a["gateway.networking.k8s.io/bundle-version"]; v != "" {
		return " (Gateway API " + v + ")"
	}
	return ""
}

func unstructuredString(obj map[string]any, path ...string) (string, bool, error) {
	cur := any(obj)
	for _, p := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return "", false, nil
		}
		cur = m[p]
	}
	s, ok := cur.(string)
	return s, ok, nil
}

func newCheckCommand(g *globalFlags) *cobra.Command {
	var out outputFlag
	var warnWithin time.Duration
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check an installed ambit: components ready, CA root present and valid",
		Long: `check looks at an installed ambit: istiod-lite's Deployment available, the
ztunnel DaemonSet's pods ready on every node, the istio-waypoint
GatewayClass accepted, and istiod-lite's CA root (ConfigMap
ambit-system/ambit-ca-root, which ztunnels and waypoints trust) present, with
each root's expiry. Use proxy-status for the proxies' xDS sync.

It exits 1 when it finds an error.`,
		Example: `  ambitctl check
  ambitctl check --warn-within 720h -o yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			c, err := g.cluster()
			if err != nil {
				return err
			}
			r, err := c.check(cmd.Context(), time.Now(), warnWithin)
			if err != nil {
				return err
			}
			return r.print(cmd.OutOrStdout(), &out, "check")
		},
	}
	cmd.Flags().DurationVar(&warnWithin, "warn-within", 30*24*time.Hour, "warn when a CA root expires within this long")
	out.register(cmd)
	return cmd
}

func (c *cluster) check(ctx context.Context, now time.Time, warnWithin time.Duration) (*checkReport, error) {
	r := &checkReport{}
	d, err := c.kube.AppsV1().Deployments(controlPlaneNamespace).Get(ctx, controlPlaneDeployment, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		r.add("istiod-lite", checkError, "Deployment %s/%s not found: is ambit installed? (ambitctl install)", controlPlaneNamespace, controlPlaneDeployment)
	case err != nil:
		return nil, c.explain("get Deployment "+controlPlaneNamespace+"/"+controlPlaneDeployment, err)
	default:
		ok, state := deploymentReady(d)
		r.add("istiod-lite", statusOf(ok), "Deployment %s/%s: %s", d.Namespace, d.Name, state)
	}
	ds, err := c.kube.AppsV1().DaemonSets(controlPlaneNamespace).Get(ctx, "ztunnel", metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		r.add("ztunnel", checkError, "DaemonSet %s/ztunnel not found: is ambit installed? (ambitctl install)", controlPlaneNamespace)
	case err != nil:
		return nil, c.explain("get DaemonSet "+controlPlaneNamespace+"/ztunnel", err)
	default:
		ok, state := daemonSetReady(ds)
		if ok && ds.Status.DesiredNumberScheduled == 0 {
			r.add("ztunnel", checkWarn, "DaemonSet %s/ztunnel: no node to run on", ds.Namespace)
		} else {
			r.add("ztunnel", statusOf(ok), "DaemonSet %s/ztunnel: %s", ds.Namespace, state)
		}
	}
	gc, err := c.dyn.Resource(schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gatewayclasses"}).Get(ctx, "istio-waypoint", metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err) || err != nil && strings.Contains(err.Error(), "could not find the requested resource"):
		r.add("gatewayclass istio-waypoint", checkError, "not found: waypoints cannot be deployed (ambitctl install)")
	case err != nil:
		return nil, c.explain("get GatewayClass istio-waypoint", err)
	default:
		st, reason, msg, found := findCondition(gc, "Accepted")
		switch {
		case !found || st == "Unknown":
			r.add("gatewayclass istio-waypoint", checkWarn, "not accepted by a controller yet (%s): is istiod-lite running and leading?", orNone(reason))
		case st == "True":
			r.add("gatewayclass istio-waypoint", checkOK, "Accepted")
		default:
			r.add("gatewayclass istio-waypoint", checkError, "Accepted=%s: %s: %s", st, reason, msg)
		}
	}

	cm, err := c.kube.CoreV1().ConfigMaps(controlPlaneNamespace).Get(ctx, ca.DefaultBundleConfigMap, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		r.add("ca root", checkError, "ConfigMap %s/%s not found: istiod-lite has not published its CA root, and ztunnels cannot start without it", controlPlaneNamespace, ca.DefaultBundleConfigMap)
	case err != nil:
		return nil, c.explain("get ConfigMap "+controlPlaneNamespace+"/"+ca.DefaultBundleConfigMap, err)
	default:
		checkRoots(r, cm.Data[ca.BundleConfigMapKey], now, warnWithin)
	}
	return r, nil
}

// checkRoots reports each root certificate of a PEM bundle with its expiry.
func checkRoots(r *checkReport, bundle string, now time.Time, warnWithin time.Duration) {
	const name = "ca root"
	rest := []byte(bundle)
	n := 0
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		n++
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			r.add(name, checkError, "root %d of %s: not a certificate: %v", n, ca.BundleConfigMapKey, err)
			continue
		}
		left := cert.NotAfter.Sub(now)
		desc := fmt.Sprintf("%s (serial %s) valid until %s", cert.Subject.String(), cert.SerialNumber.Text(16), cert.NotAfter.UTC().Format(time.RFC3339))
		switch {
		case !cert.IsCA:
			r.add(name, checkError, "%s: not a CA certificate", desc)
		case left <= 0:
			r.add(name, checkError, "%s: EXPIRED %s ago; workloads cannot verify each other", desc, (-left).Round(time.Minute))
		case now.Before(cert.NotBefore):
			r.add(name, checkError, "%s: not valid before %s (clock skew?)", desc, cert.NotBefore.UTC().Format(time.RFC3339))
		case left < warnWithin:
			r.add(name, checkWarn, "%s: expires in %s; rotate the CA", desc, humanDuration(left))
		default:
			r.add(name, checkOK, "%s: expires in %s", desc, humanDuration(left))
		}
	}
	if n == 0 {
		r.add(name, checkError, "ConfigMap %s/%s has no certificate under %s", controlPlaneNamespace, ca.DefaultBundleConfigMap, ca.BundleConfigMapKey)
	}
}

func humanDuration(d time.Duration) string {
	if d >= 48*time.Hour {
		return strconv.Itoa(int(d.Hours()/24)) + " days"
	}
	return d.Round(time.Minute).String()
}

func statusOf(ok bool) string {
	if ok {
		return checkOK
	}
	return checkError
}
