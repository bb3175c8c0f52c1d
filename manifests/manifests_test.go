// Package manifests_test checks that manifests/ applies cleanly to a real
// kube-apiserver and that its RBAC is least-privilege.
package manifests_test

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/integration/kube"
)

func kubectl(t *testing.T, kubeconfig string, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command("kubectl", append([]string{"--kubeconfig", kubeconfig}, args...)...).CombinedOutput()
	return string(out), err
}

// canI returns kubectl auth can-i's answer (its stdout; warnings go to stderr).
func canI(kubeconfig string, args ...string) string {
	out, _ := exec.Command("kubectl", append([]string{"--kubeconfig", kubeconfig, "auth", "can-i"}, args...)...).Output()
	return string(out)
}

func mustKubectl(t *testing.T, kubeconfig string, args ...string) string {
	t.Helper()
	out, err := kubectl(t, kubeconfig, args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func TestManifestsApply(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl not installed")
	}
	c := kube.Start(t, kube.Options{})
	kc := c.Kubeconfig()

	// The CRDs and the namespace first (a dry run cannot create the types
	// and namespace the rest of the dry run needs).
	mustKubectl(t, kc, "apply", "--server-side", "--dry-run=server", "-f", "namespace.yaml", "-f", "crds/")
	mustKubectl(t, kc, "apply", "--server-side", "-f", "namespace.yaml", "-f", "crds/")
	mustKubectl(t, kc, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")

	// Everything, as `kubectl apply -k manifests/`: dry run, then for real.
	mustKubectl(t, kc, "apply", "--server-side", "--dry-run=server", "-k", ".")
	out := mustKubectl(t, kc, "apply", "--server-side", "-k", ".")
	for _, want := range []string{"deployment.apps/istiod-lite", "daemonset.apps/ztunnel", "service/istiod-lite", "clusterrole.rbac.authorization.k8s.io/ambit-istiod-lite"} {
		if !strings.Contains(out, want) {
			t.Errorf("apply did not create %s:\n%s", want, out)
		}
	}

	// Least privilege: istiod-lite reads what it translates and writes only
	// statuses, Events and its CA Secret (and waypoint resources).
	sa := "--as=system:serviceaccount:ambit-system:istiod-lite"
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"list", "pods"}, "yes"},
		{[]string{"watch", "endpointslices.discovery.k8s.io"}, "yes"},
		{[]string{"list", "authorizationpolicies.security.istio.io"}, "yes"},
		{[]string{"patch", "gateways.gateway.networking.k8s.io", "--subresource=status"}, "yes"},
		{[]string{"create", "events"}, "yes"},
		{[]string{"create", "tokenreviews.authentication.k8s.io"}, "yes"},
		{[]string{"get", "secrets/ambit-ca", "-n", "ambit-system"}, "yes"},
		{[]string{"get", "secrets/other", "-n", "ambit-system"}, "no"},
		{[]string{"update", "configmaps/ambit-ca-root", "-n", "ambit-system"}, "yes"},
		{[]string{"update", "configmaps/other", "-n", "ambit-system"}, "no"},
		{[]string{"list", "secrets", "-n", "ambit-system"}, "no"},
		{[]string{"update", "pods"}, "no"},
		{[]string{"update", "authorizationpolicies.security.istio.io"}, "no"},
		{[]string{"delete", "namespaces"}, "no"},
		{[]string{"create", "clusterrolebindings"}, "no"},
	} {
		got := canI(kc, append(c.args, sa)...)
		if strings.TrimSpace(got) != c.want {
			t.Errorf("istiod-lite can-i %s: %q, want %q", strings.Join(c.args, " "), strings.TrimSpace(got), c.want)
		}
	}
	// ztunnel has no Kubernetes API access at all.
	got := canI(kc, "list", "pods", "--as=system:serviceaccount:ambit-system:ztunnel")
	if strings.TrimSpace(got) != "no" {
		t.Errorf("ztunnel can list pods: %q", got)
	}
}
