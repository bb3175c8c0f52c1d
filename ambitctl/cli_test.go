package ambitctl_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/ambitctl"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/integration/kube"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// bin is the ambitctl binary the tests exec, built by TestMain.
var bin string

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "ambitctl-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "ambitctl")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/ambit-mesh/ambit/cmd/ambitctl").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build ambitctl: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// run runs the ambitctl binary; kubeconfig "" points it at no cluster.
func run(t *testing.T, kubeconfig string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	if kubeconfig == "" {
		kubeconfig = filepath.Join(t.TempDir(), "absent")
	}
	cmd.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig, "HOME="+t.TempDir())
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("ambitctl %s: %v", strings.Join(args, " "), err)
	}
	return r
}

func mustRun(t *testing.T, kubeconfig string, args ...string) result {
	t.Helper()
	r := run(t, kubeconfig, args...)
	if r.code != 0 {
		t.Fatalf("ambitctl %s: %s", strings.Join(args, " "), r)
	}
	return r
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	p := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from %s:\n--- got\n%s--- want\n%s", name, p, got, want)
	}
}

func decodeStream(t *testing.T, s string) []*unstructured.Unstructured {
	t.Helper()
	rd := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(s)))
	var out []*unstructured.Unstructured
	for {
		doc, err := rd.Read()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		u := &unstructured.Unstructured{}
		if err := utilyaml.Unmarshal(doc, &u.Object); err != nil {
			t.Fatalf("%v in\n%s", err, doc)
		}
		if len(u.Object) > 0 {
			out = append(out, u)
		}
	}
}

func TestHelpHasExamples(t *testing.T) {
	root := ambitctl.NewCommand()
	cmds := root.Commands()
	for len(cmds) > 0 {
		c := cmds[0]
		cmds = append(cmds[1:], c.Commands()...)
		if c.Name() == "help" || c.Hidden || strings.HasPrefix(c.CommandPath(), "ambitctl completion") {
			continue
		}
		if c.Example == "" {
			t.Errorf("%s --help has no example", c.CommandPath())
		}
		// what a person sees: the binary's --help of the command
		args := append(strings.Fields(strings.TrimPrefix(c.CommandPath(), "ambitctl")), "--help")
		if r := run(t, "", args...); r.code != 0 || !strings.Contains(r.stdout, "Examples:") || !strings.Contains(r.stdout, "Usage:") {
			t.Errorf("ambitctl %s: want usage and examples: %s", strings.Join(args, " "), r)
		}
	}
	r := mustRun(t, "", "waypoint", "apply", "--help")
	for _, want := range []string{"Examples:", "--for-service-account", "--enroll-namespace", "--wait"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("waypoint apply --help lacks %q:\n%s", want, r.stdout)
		}
	}
	if r := mustRun(t, "", "completion", "bash"); !strings.Contains(r.stdout, "__start_ambitctl") {
		t.Errorf("completion bash:\n%s", r.stdout)
	}
	if r := mustRun(t, "", "__complete", "waypoint", "apply", "--for", ""); !strings.Contains(r.stdout, "workload\n") {
		t.Errorf("completion of --for:\n%s", r.stdout)
	}
}

func TestInstallDryRun(t *testing.T) {
	// No kubeconfig: a dry run needs no cluster.
	r := mustRun(t, "", "install", "--dry-run", "--hub", "registry.example.com/mesh", "--tag", "9.9.9")
	objs := decodeStream(t, r.stdout)
	kinds := map[string]bool{}
	seenOther := false
	for _, o := range objs {
		kinds[o.GetKind()+" "+o.GetName()] = true
		if o.GetKind() == "CustomResourceDefinition" && seenOther {
			t.Errorf("CRD %s after other objects: CRDs go first", o.GetName())
		}
		seenOther = seenOther || o.GetKind() != "CustomResourceDefinition"
	}
	for _, want := range []string{"Namespace ambit-system", "Deployment istiod-lite", "DaemonSet ztunnel",
		"CustomResourceDefinition gateways.gateway.networking.k8s.io", "GatewayClass istio-waypoint", "ClusterRole ambit-istiod-lite"} {
		if !kinds[want] {
			t.Errorf("dry run lacks %s", want)
		}
	}
	images := 0
	for _, o := range objs {
		cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		for _, c := range cs {
			img := c.(map[string]any)["image"]
			images++
			if img != "registry.example.com/mesh/ambit:9.9.9" {
				t.Errorf("%s %s: image %v, want --hub/--tag applied", o.GetKind(), o.GetName(), img)
			}
		}
	}
	if images < 2 {
		t.Errorf("%d container images in the dry run, want istiod-lite's and ztunnel's", images)
	}
	// Without --hub/--tag: the kustomization's images transform.
	r = mustRun(t, "", "install", "--dry-run")
	if !strings.Contains(r.stdout, "image: ghcr.io/ambit-mesh/ambit:") {
		t.Errorf("default images missing:\n%s", grep(r.stdout, "image:"))
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestAnalyzeFilesCLI(t *testing.T) {
	r := run(t, "", "analyze", "-f", "analyzer/testdata/route-missing-backend.yaml", "-f", "analyzer/testdata/strict-not-enrolled.yaml")
	if r.code != 1 || !strings.Contains(r.stderr, "analyze found 1 error(s)") {
		t.Errorf("want exit 1 and one error: %s", r)
	}
	golden(t, "analyze-files", r.stdout)
	r = run(t, "", "analyze", "-f", "analyzer/testdata/strict-not-enrolled.yaml", "-o", "json")
	var fs []map[string]string
	if err := json.Unmarshal([]byte(r.stdout), &fs); err != nil || r.code != 0 || len(fs) != 1 || fs[0]["code"] != "AMB0007" {
		t.Errorf("warnings only: want exit 0 and one AMB0007 finding in JSON: %v %s", err, r)
	}
	r = mustRun(t, "", "analyze", "-f", "../examples")
	golden(t, "analyze-examples", r.stdout)
	r = run(t, "", "analyze", "-f", "no/such/dir")
	if r.code != 1 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 || !strings.Contains(r.stderr, "no/such/dir") {
		t.Errorf("a missing path: want one line naming it: %s", r)
	}
}

// TestCluster runs ambitctl against a real kube-apiserver: install, the
// readiness wait, version, enroll, waypoints, live analyze, uninstall.
func TestCluster(t *testing.T) {
	c := kube.Start(t, kube.Options{})
	kc := c.Kubeconfig()
	ctx := t.Context()
	cs := c.Client()
	dyn := dynamic.NewForConfigOrDie(c.Config())
	dc := discovery.NewDiscoveryClientForConfigOrDie(c.Config())
	mapperFor := func() meta.RESTMapper {
		grs, err := restmapper.GetAPIGroupResources(dc)
		if err != nil {
			t.Fatal(err)
		}
		return restmapper.NewDiscoveryRESTMapper(grs)
	}
	getObj := func(mapper meta.RESTMapper, o *unstructured.Unstructured) (*unstructured.Unstructured, error) {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return nil, err
		}
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			return dyn.Resource(m.Resource).Namespace(o.GetNamespace()).Get(ctx, o.GetName(), metav1.GetOptions{})
		}
		return dyn.Resource(m.Resource).Get(ctx, o.GetName(), metav1.GetOptions{})
	}
	embedded := decodeStream(t, mustRun(t, "", "install", "--dry-run").stdout)

	// A user's namespace exists before install.
	mustCreateNS(t, cs, "shop", nil)
	for _, sa := range []string{"default", "reviews"} { // no service-account controller here
		must(cs.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}))
	}

	t.Run("precheck", func(t *testing.T) {
		// Istio's Telemetry CRD installed by Helm, and a node on an old
		// kernel
		crd := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
			"metadata": map[string]any{"name": "telemetries.telemetry.istio.io",
				"labels":      map[string]any{"app.kubernetes.io/managed-by": "Helm"},
				"annotations": map[string]any{"meta.helm.sh/release-name": "istio-base", "meta.helm.sh/release-namespace": "istio-system"}},
			"spec": map[string]any{"group": "telemetry.istio.io", "scope": "Namespaced",
				"names":    map[string]any{"kind": "Telemetry", "plural": "telemetries", "singular": "telemetry", "listKind": "TelemetryList"},
				"versions": []any{map[string]any{"name": "v1", "served": true, "storage": true, "schema": map[string]any{"openAPIV3Schema": map[string]any{"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}},
		}}
		crdRes := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
		must(dyn.Resource(crdRes).Create(ctx, crd, metav1.CreateOptions{FieldManager: "helm"}))
		for _, n := range []struct{ name, kernel string }{{"node-old", "5.15.0-91-generic"}, {"node-new", "6.8.0-45-generic"}} {
			node := must(cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.name}}, metav1.CreateOptions{}))
			node.Status.NodeInfo = corev1.NodeSystemInfo{KernelVersion: n.kernel, OSImage: "Ubuntu 24.04 LTS"}
			must(cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}))
		}
		r := run(t, kc, "precheck")
		if r.code != 1 || strings.TrimSpace(r.stderr) != "ambitctl: precheck found 1 error(s): see the ERROR lines above" {
			t.Errorf("precheck: want exit 1 for the old kernel: %s", r)
		}
		golden(t, "precheck", regexp.MustCompile(`v1\.\d+\.\d+\S*`).ReplaceAllString(r.stdout, "v1.X"))
		for _, n := range []string{"node-old", "node-new"} {
			if err := cs.CoreV1().Nodes().Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		if r := mustRun(t, kc, "precheck", "-o", "json"); !strings.Contains(r.stdout, `"status": "WARN"`) || !strings.Contains(r.stdout, "helm release istio-system/istio-base") {
			t.Errorf("precheck -o json:\n%s", r.stdout)
		}
	})

	t.Run("install", func(t *testing.T) {
		r := mustRun(t, kc, "install", "--wait=false")
		t.Logf("install:\n%s", r.stdout)
		if !strings.Contains(r.stdout, "applied Deployment ambit-system/istiod-lite") || !strings.Contains(r.stdout, "✔ CustomResourceDefinition gateways.gateway.networking.k8s.io ready") {
			t.Errorf("install output:\n%s", r.stdout)
		}
		mapper := mapperFor()
		for _, o := range embedded {
			got, err := getObj(mapper, o)
			if err != nil {
				t.Errorf("%s %s after install: %v", o.GetKind(), o.GetName(), err)
				continue
			}
			if md, _ := o.Object["metadata"].(map[string]any); len(o.Object) == 3 && len(md) <= 2 {
				continue // nothing but a name: no field to own, no managedFields entry
			}
			applied := false
			for _, mf := range got.GetManagedFields() {
				applied = applied || (mf.Manager == ambitctl.FieldManager && mf.Operation == metav1.ManagedFieldsOperationApply)
			}
			if !applied {
				t.Errorf("%s %s not applied server-side by %s: %v", o.GetKind(), o.GetName(), ambitctl.FieldManager, got.Object)
			}
		}
	})

	t.Run("wait-timeout", func(t *testing.T) {
		// No controller-manager or kubelet here: istiod-lite never becomes
		// available, and install must say so, naming it and its condition.
		start := time.Now()
		r := run(t, kc, "install", "--timeout=3s")
		t.Logf("install --timeout=3s: %s", r)
		if r.code != 1 {
			t.Fatalf("want exit 1: %s", r)
		}
		if !strings.Contains(r.stdout, "waiting for Deployment ambit-system/istiod-lite: Available not reported, 0/2 replicas available") {
			t.Errorf("no progress line for istiod-lite:\n%s", r.stdout)
		}
		line := strings.TrimSpace(r.stderr)
		if strings.Contains(line, "\n") || !strings.HasPrefix(line, "ambitctl: Deployment ambit-system/istiod-lite not ready after 3s: Available not reported") ||
			!strings.Contains(line, "DaemonSet ambit-system/ztunnel") {
			t.Errorf("timeout error: want one line naming the Deployment and its condition, got %q", line)
		}
		if el := time.Since(start); el > 30*time.Second {
			t.Errorf("install --timeout=3s took %s", el)
		}
	})

	t.Run("version", func(t *testing.T) {
		r := mustRun(t, kc, "version")
		if !strings.Contains(r.stdout, "client version: ") || !strings.Contains(r.stdout, "control plane version: latest") {
			t.Errorf("version:\n%s", r.stdout)
		}
	})

	t.Run("enroll", func(t *testing.T) {
		must(cs.CoreV1().Pods("shop").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "batch-0", Labels: map[string]string{"istio.io/dataplane-mode": "none"}},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "batch"}}},
		}, metav1.CreateOptions{}))
		must(cs.CoreV1().Services("shop").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "cart", Labels: map[string]string{"istio.io/use-waypoint": "missing"}},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
		}, metav1.CreateOptions{}))
		r := mustRun(t, kc, "enroll", "shop")
		if ns, _ := cs.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{}); ns.Labels["istio.io/dataplane-mode"] != "ambient" {
			t.Errorf("enroll: labels %v", ns.Labels)
		}
		if !strings.Contains(r.stderr, "warning: pod shop/batch-0 opts out") ||
			!strings.Contains(r.stderr, "warning: service shop/cart has istio.io/use-waypoint=missing but Gateway shop/missing does not exist") {
			t.Errorf("enroll warnings: %s", r)
		}
		if strings.Contains(r.stderr, "not installed") {
			t.Errorf("enroll says ambit is not installed: %s", r)
		}
		mustRun(t, kc, "unenroll", "shop")
		if ns, _ := cs.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{}); ns.Labels["istio.io/dataplane-mode"] != "" {
			t.Errorf("unenroll: labels %v", ns.Labels)
		}
		r = run(t, kc, "enroll", "nope")
		if r.code != 1 || strings.TrimSpace(r.stderr) != "ambitctl: namespace nope not found (create it first: kubectl create namespace nope)" {
			t.Errorf("enroll of a missing namespace: %s", r)
		}
	})

	gwRes := schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}
	t.Run("waypoint", func(t *testing.T) {
		r := mustRun(t, kc, "waypoint", "apply", "-n", "shop", "--enroll-namespace")
		gw, err := dyn.Resource(gwRes).Namespace("shop").Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("waypoint apply: %v\n%s", err, r)
		}
		class, _, _ := unstructured.NestedString(gw.Object, "spec", "gatewayClassName")
		ls, _, _ := unstructured.NestedSlice(gw.Object, "spec", "listeners")
		l0, _ := ls[0].(map[string]any)
		if class != "istio-waypoint" || len(ls) != 1 || l0["name"] != "mesh" || l0["port"] != int64(15008) || l0["protocol"] != "HBONE" || gw.GetLabels()["istio.io/waypoint-for"] != "service" {
			t.Errorf("waypoint Gateway: class %q listeners %v labels %v", class, ls, gw.GetLabels())
		}
		if ns, _ := cs.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{}); ns.Labels["istio.io/use-waypoint"] != "waypoint" {
			t.Errorf("--enroll-namespace: labels %v", ns.Labels)
		}

		// Per service account: the Deployment running as it is bound, a bare
		// pod is reported.
		one := int32(1)
		must(cs.AppsV1().Deployments("shop").Create(ctx, &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: "reviews-v1"},
			Spec: appsv1.DeploymentSpec{
				Replicas: &one,
				Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "reviews"}},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "reviews"}},
					Spec:       corev1.PodSpec{ServiceAccountName: "reviews", Containers: []corev1.Container{{Name: "c", Image: "reviews"}}},
				},
			},
		}, metav1.CreateOptions{}))
		must(cs.CoreV1().Pods("shop").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "reviews-debug"},
			Spec:       corev1.PodSpec{ServiceAccountName: "reviews", Containers: []corev1.Container{{Name: "c", Image: "reviews"}}},
		}, metav1.CreateOptions{}))
		r = mustRun(t, kc, "waypoint", "apply", "-n", "shop", "--for-service-account", "reviews")
		gw, err = dyn.Resource(gwRes).Namespace("shop").Get(ctx, "reviews", metav1.GetOptions{})
		if err != nil || gw.GetLabels()["istio.io/waypoint-for"] != "workload" {
			t.Fatalf("waypoint for service account reviews: %v %v\n%s", err, gw, r)
		}
		d, _ := cs.AppsV1().Deployments("shop").Get(ctx, "reviews-v1", metav1.GetOptions{})
		if d.Spec.Template.Labels["istio.io/use-waypoint"] != "reviews" {
			t.Errorf("Deployment template labels %v, want istio.io/use-waypoint=reviews", d.Spec.Template.Labels)
		}
		if !strings.Contains(r.stderr, "warning: pod shop/reviews-debug (no owner) runs as reviews but is not bound") {
			t.Errorf("bare pod not reported: %s", r)
		}

		// --wait returns once Programmed=True, which this test sets (no
		// controller runs here).
		cmd := exec.CommandContext(ctx, bin, "--kubeconfig", kc, "waypoint", "apply", "-n", "shop", "--wait", "--timeout=60s")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
		}()
		var out []string
		waitFor := func(sub string) {
			t.Helper()
			deadline := time.After(30 * time.Second)
			for {
				select {
				case l, ok := <-lines:
					if !ok {
						t.Fatalf("ambitctl exited before %q:\n%s\n%s", sub, strings.Join(out, "\n"), stderr.String())
					}
					out = append(out, l)
					if strings.Contains(l, sub) {
						return
					}
				case <-deadline:
					t.Fatalf("no %q in 30s:\n%s", sub, strings.Join(out, "\n"))
				}
			}
		}
		// The CRD defaults the status to Programmed=Unknown.
		waitFor("waiting for Gateway shop/waypoint: Programmed=Unknown (Pending: Waiting for controller); want Programmed=True")
		setStatus(t, dyn, gwRes, "shop", "waypoint", "True", "10.96.0.50")
		waitFor("✔ Gateway shop/waypoint ready")
		for range lines {
		}
		if err := cmd.Wait(); err != nil {
			t.Errorf("waypoint apply --wait: %v\n%s", err, stderr.String())
		}
		setStatus(t, dyn, gwRes, "shop", "reviews", "False", "")
		r = run(t, kc, "waypoint", "apply", "-n", "shop", "--for-service-account", "reviews", "--wait", "--timeout=2s")
		if want := "ambitctl: Gateway shop/reviews not ready after 2s: Programmed=False (Pending: waypoint deployment has no ready replica); want Programmed=True"; r.code != 1 || !strings.HasPrefix(lastLine(r.stderr), want) {
			t.Errorf("--wait on a waypoint that stays unprogrammed: want %q: %s", want, r)
		}

		golden(t, "waypoint-list", mustRun(t, kc, "waypoint", "list", "-n", "shop").stdout)
		golden(t, "waypoint-status", mustRun(t, kc, "waypoint", "status", "-n", "shop").stdout)
		var list struct {
			Items []unstructured.Unstructured `json:"items"`
		}
		if err := json.Unmarshal([]byte(mustRun(t, kc, "waypoint", "list", "-A", "-o", "json").stdout), &list); err != nil || len(list.Items) != 2 {
			t.Errorf("list -o json: %v, %d items", err, len(list.Items))
		}
		r = run(t, kc, "waypoint", "status", "-n", "shop", "nope")
		if r.code != 1 || !strings.Contains(r.stderr, "waypoint nope not found in namespace shop") {
			t.Errorf("status of a missing waypoint: %s", r)
		}
	})

	t.Run("analyze", func(t *testing.T) {
		// shop: the namespace uses waypoint (exists), cart names "missing".
		r := run(t, kc, "analyze", "-n", "shop")
		if r.code != 1 {
			t.Fatalf("want exit 1: %s", r)
		}
		golden(t, "analyze-cluster", r.stdout)
	})

	t.Run("describe", func(t *testing.T) {
		b, err := os.ReadFile("testdata/describe/objects.yaml")
		if err != nil {
			t.Fatal(err)
		}
		mapper := mapperFor()
		// uninstall's test counts the Gateways left: take this one away
		defer func() {
			if err := dyn.Resource(gwRes).Namespace("desc").Delete(ctx, "wp", metav1.DeleteOptions{}); err != nil {
				t.Errorf("delete Gateway desc/wp: %v", err)
			}
		}()
		for _, o := range decodeStream(t, string(b)) {
			gvk := o.GroupVersionKind()
			m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				t.Fatal(err)
			}
			ri := dyn.Resource(m.Resource).Namespace(o.GetNamespace())
			if m.Scope.Name() != meta.RESTScopeNameNamespace {
				_, err = dyn.Resource(m.Resource).Create(ctx, o, metav1.CreateOptions{})
			} else {
				_, err = ri.Create(ctx, o, metav1.CreateOptions{})
			}
			if err != nil {
				t.Fatalf("create %s %s: %v", o.GetKind(), o.GetName(), err)
			}
		}
		// what a kubelet would report
		for _, p := range []struct{ ns, name, ip string }{
			{"desc", "reviews-0", "10.244.1.11"}, {"desc", "ratings-0", "10.244.2.21"},
			{"desc-plain", "plain-0", "10.244.1.31"}, {"ambit-system", "ztunnel-n1", "10.0.0.1"},
		} {
			pod := must(cs.CoreV1().Pods(p.ns).Get(ctx, p.name, metav1.GetOptions{}))
			pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.ip, PodIPs: []corev1.PodIP{{IP: p.ip}},
				Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
			must(cs.CoreV1().Pods(p.ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}))
		}
		setStatus(t, dyn, gwRes, "desc", "wp", "True", "10.96.7.50")

		for _, tc := range []struct{ golden, ns, kind, name string }{
			{"describe-pod-reviews", "desc", "pod", "reviews-0"},
			{"describe-pod-optout", "desc", "pod", "ratings-0"},
			{"describe-pod-plain", "desc-plain", "pod", "plain-0"},
			{"describe-service-reviews", "desc", "service", "reviews"},
			{"describe-service-ratings", "desc", "svc", "ratings"},
		} {
			golden(t, tc.golden, mustRun(t, kc, "describe", tc.kind, tc.name, "-n", tc.ns).stdout)
		}
		// The admin commands pick the pod and port-forward through the API
		// server; without a kubelet the forward fails, in one line naming
		// the pod (the forwarded path itself is untested here).
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"ztunnel-config", "workloads", "--node", "node-1"}, "port-forward to pod ambit-system/ztunnel-n1 on node node-1 (through the API server and the node's kubelet)"},
			{[]string{"ztunnel-config", "workloads", "--node", "node-9"}, "no running ztunnel pod on node node-9"},
			{[]string{"proxy-config", "routes", "--waypoint", "wp", "-n", "desc"}, "no running waypoint wp pod in namespace desc"},
			{[]string{"proxy-status"}, "no running istiod-lite pod in namespace ambit-system"},
		} {
			r := run(t, kc, tc.args...)
			if r.code != 1 || !strings.Contains(r.stderr, tc.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
				t.Errorf("%v: want one line with %q: %s", tc.args, tc.want, r)
			}
		}

		r := run(t, kc, "describe", "pod", "nope", "-n", "desc")
		if r.code != 1 || strings.TrimSpace(r.stderr) != "ambitctl: pod desc/nope not found (wrong -n?)" {
			t.Errorf("describe of a missing pod: %s", r)
		}
	})

	t.Run("check", func(t *testing.T) {
		// just installed, nothing running
		r := run(t, kc, "check")
		if r.code != 1 {
			t.Errorf("check with nothing running: want exit 1: %s", r)
		}
		golden(t, "check-not-running", r.stdout)

		// what the controllers and istiod-lite would report
		d := must(cs.AppsV1().Deployments("ambit-system").Get(ctx, "istiod-lite", metav1.GetOptions{}))
		d.Status = appsv1.DeploymentStatus{ObservedGeneration: d.Generation, Replicas: 2, UpdatedReplicas: 2, ReadyReplicas: 2, AvailableReplicas: 2,
			Conditions: []appsv1.DeploymentCondition{{Type: appsv1.DeploymentAvailable, Status: corev1.ConditionTrue, Reason: "MinimumReplicasAvailable"}}}
		must(cs.AppsV1().Deployments("ambit-system").UpdateStatus(ctx, d, metav1.UpdateOptions{}))
		ds := must(cs.AppsV1().DaemonSets("ambit-system").Get(ctx, "ztunnel", metav1.GetOptions{}))
		ds.Status = appsv1.DaemonSetStatus{ObservedGeneration: ds.Generation, DesiredNumberScheduled: 3, CurrentNumberScheduled: 3, NumberReady: 3, NumberAvailable: 3, UpdatedNumberScheduled: 3}
		must(cs.AppsV1().DaemonSets("ambit-system").UpdateStatus(ctx, ds, metav1.UpdateOptions{}))
		gcRes := schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gatewayclasses"}
		gc := must(dyn.Resource(gcRes).Get(ctx, "istio-waypoint", metav1.GetOptions{}))
		gc.Object["status"] = map[string]any{"conditions": []any{map[string]any{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
			"lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": gc.GetGeneration()}}}
		must(dyn.Resource(gcRes).UpdateStatus(ctx, gc, metav1.UpdateOptions{}))
		authority, err := certs.NewSelfSignedCA(spiffeid.RequireTrustDomainFromString("cluster.local"), certs.Options{})
		if err != nil {
			t.Fatal(err)
		}
		root := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: authority.SigningCertificate().Raw})
		must(cs.CoreV1().ConfigMaps("ambit-system").Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "ambit-ca-root"},
			Data: map[string]string{"root-cert.pem": string(root)}}, metav1.CreateOptions{}))
		r = mustRun(t, kc, "check")
		masked := regexp.MustCompile(`\(serial [0-9a-f]+\) valid until \S+: expires in \d+ days`).ReplaceAllString(r.stdout, "(serial <serial>) valid until <time>: expires in <n> days")
		masked = regexp.MustCompile(`CN=ambit root CA \S+`).ReplaceAllString(masked, "CN=ambit root CA <time>")
		golden(t, "check-ready", masked)
		// a root about to expire is a warning, not an error
		r = mustRun(t, kc, "check", "--warn-within", "876000h")
		if !strings.Contains(r.stdout, "WARN") || !strings.Contains(r.stdout, "rotate the CA") {
			t.Errorf("check --warn-within: %s", r)
		}
	})

	t.Run("waypoint-delete", func(t *testing.T) {
		// A user's Gateway of another class: never a waypoint.
		edge := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
			"metadata": map[string]any{"name": "edge", "namespace": "shop"},
			"spec": map[string]any{"gatewayClassName": "nginx", "listeners": []any{
				map[string]any{"name": "http", "port": int64(80), "protocol": "HTTP"}}},
		}}
		if _, err := dyn.Resource(gwRes).Namespace("shop").Create(ctx, edge, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		r := run(t, kc, "waypoint", "delete", "-n", "shop", "edge")
		if r.code != 1 || !strings.Contains(r.stderr, "gateway shop/edge is not a waypoint") {
			t.Errorf("delete of a non-waypoint: %s", r)
		}
		mustRun(t, kc, "waypoint", "delete", "-n", "shop", "reviews")
		if _, err := dyn.Resource(gwRes).Namespace("shop").Get(ctx, "reviews", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("waypoint reviews after delete: %v", err)
		}
	})

	t.Run("uninstall", func(t *testing.T) {
		if r := mustRun(t, kc, "uninstall"); !strings.Contains(r.stdout, "CRDs kept") {
			t.Errorf("uninstall does not say it kept the CRDs:\n%s", r.stdout)
		}
		mapper := mapperFor()
		for _, o := range embedded {
			got, err := getObj(mapper, o)
			switch {
			case o.GetKind() == "CustomResourceDefinition":
				if err != nil {
					t.Errorf("uninstall without --purge deleted %s: %v", o.GetName(), err)
				}
			case apierrors.IsNotFound(err):
			case err != nil:
				t.Errorf("%s %s: %v", o.GetKind(), o.GetName(), err)
			case o.GetKind() == "Namespace" && got.GetDeletionTimestamp() != nil:
				// terminating: the namespace controller (not running here) finishes it
			default:
				t.Errorf("%s %s left behind by uninstall", o.GetKind(), o.GetName())
			}
		}
		// The user's namespace and Gateways stay.
		if _, err := cs.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{}); err != nil {
			t.Errorf("user namespace: %v", err)
		}
		for _, name := range []string{"edge", "waypoint"} {
			if _, err := dyn.Resource(gwRes).Namespace("shop").Get(ctx, name, metav1.GetOptions{}); err != nil {
				t.Errorf("user Gateway %s after uninstall: %v", name, err)
			}
		}

		r := mustRun(t, kc, "uninstall", "--purge")
		if !strings.Contains(r.stdout, "warning: deleting CustomResourceDefinition gateways.gateway.networking.k8s.io deletes its 2 object(s)") {
			t.Errorf("purge did not warn about the user's Gateways:\n%s", r.stdout)
		}
		// The API server's CRD finalizer deletes the instances, then the CRD.
		crds := dyn.Resource(schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"})
		for _, o := range embedded {
			if o.GetKind() != "CustomResourceDefinition" {
				continue
			}
			err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
				_, err := crds.Get(ctx, o.GetName(), metav1.GetOptions{})
				return apierrors.IsNotFound(err), nil
			})
			if err != nil {
				t.Fatalf("CRD %s still there after uninstall --purge: %v", o.GetName(), err)
			}
		}
		if _, err := cs.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{}); err != nil {
			t.Errorf("user namespace after purge: %v", err)
		}
	})
}

func mustCreateNS(t *testing.T, cs kubernetes.Interface, name string, labels map[string]string) {
	t.Helper()
	must(cs.CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}))
}

// must returns v, panicking (failing the test) on err: for objects a test
// creates as its setting.
func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// setStatus writes a waypoint's status as a controller would.
func setStatus(t *testing.T, dyn dynamic.Interface, gvr schema.GroupVersionResource, ns, name, programmed, addr string) {
	t.Helper()
	ctx := t.Context()
	gw, err := dyn.Resource(gvr).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ltt := "2026-01-01T00:00:00Z"
	reason, msg := "Programmed", "waypoint ready"
	if programmed != "True" {
		reason, msg = "Pending", "waypoint deployment has no ready replica"
	}
	status := map[string]any{
		"conditions": []any{
			map[string]any{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "accepted by ambit", "lastTransitionTime": ltt, "observedGeneration": gw.GetGeneration()},
			map[string]any{"type": "Programmed", "status": programmed, "reason": reason, "message": msg, "lastTransitionTime": ltt, "observedGeneration": gw.GetGeneration()},
		},
		"listeners": []any{map[string]any{
			"name": "mesh", "attachedRoutes": int64(0),
			"supportedKinds": []any{},
			"conditions":     []any{map[string]any{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": ltt, "observedGeneration": gw.GetGeneration()}},
		}},
	}
	if addr != "" {
		status["addresses"] = []any{map[string]any{"type": "IPAddress", "value": addr}}
	}
	gw.Object["status"] = status
	if _, err := dyn.Resource(gvr).Namespace(ns).UpdateStatus(ctx, gw, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// Errors are one line a person can act on, even when the API server is down.
func TestErrorsAreOneLine(t *testing.T) {
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		kc   string
		want string
	}{
		{[]string{"enroll", "demo"}, kc, "ambitctl: label namespace demo: cannot reach the API server at https://127.0.0.1:1 (is the cluster up and --context right?)"},
		{[]string{"waypoint", "list"}, "", "ambitctl: no cluster to talk to: no kubeconfig found"},
		{[]string{"enroll"}, "", "ambitctl: enroll takes NAMESPACE (got 0 arguments); see ambitctl enroll --help"},
		{[]string{"waypoint", "list", "-o", "xml"}, kc, `ambitctl: unknown output format "xml": use -o table, json or yaml`},
		{[]string{"waypoint", "delete"}, kc, "ambitctl: name the waypoints to delete, or give --all (not both)"},
		// cobra's own errors name the command and where its help is
		{[]string{"nope"}, "", `ambitctl: unknown command "nope" for "ambitctl"; see ambitctl --help`},
		{[]string{"--bogus"}, "", "ambitctl: unknown flag: --bogus; see ambitctl --help"},
		{[]string{"install", "--bogus"}, "", "ambitctl: install: unknown flag: --bogus; see ambitctl install --help"},
		{[]string{"waypoint", "list", "-n"}, "", "ambitctl: waypoint list: flag needs an argument: 'n' in -n; see ambitctl waypoint list --help"},
		{[]string{"ztunnel-config"}, "", "ambitctl: ztunnel-config: accepts between 1 and 2 arg(s), received 0 " +
			"(usage: ambitctl ztunnel-config workloads|services|policies|certificates|connections|capture|all [ZTUNNEL_POD]); see ambitctl ztunnel-config --help"},
		{[]string{"describe", "pod"}, "", "ambitctl: describe: accepts 2 arg(s), received 1 (usage: ambitctl describe pod|service NAME); see ambitctl describe --help"},
	} {
		r := run(t, tc.kc, tc.args...)
		line := strings.TrimSpace(r.stderr)
		if r.code != 1 || strings.Contains(line, "\n") || !strings.HasPrefix(line, tc.want) {
			t.Errorf("ambitctl %s: want one line starting %q: %s", strings.Join(tc.args, " "), tc.want, r)
		}
	}
}
