// Package manifests_test checks that manifests/ applies cleanly to a real
// kube-apiserver and that its RBAC is least-privilege.
package manifests_test

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
	"github.com/ambit-mesh/ambit/istiod-lite/leader"
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
	if err := c.WaitCRDsEstablished(t.Context()); err != nil {
		t.Fatal(err)
	}

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
		// the waypoint deployer: apply (create, patch), watch and delete
		// waypoint objects in any namespace, Gateway status, its Lease
		{[]string{"create", "deployments.apps", "-n", "shop"}, "yes"},
		{[]string{"patch", "deployments.apps", "-n", "shop"}, "yes"},
		{[]string{"delete", "deployments.apps", "-n", "shop"}, "yes"},
		{[]string{"watch", "deployments.apps"}, "yes"},
		{[]string{"update", "deployments.apps"}, "no"},
		{[]string{"get", "deployments.apps", "-n", "shop"}, "yes"},
		{[]string{"patch", "services", "-n", "shop"}, "yes"},
		{[]string{"delete", "services", "-n", "shop"}, "yes"},
		{[]string{"patch", "serviceaccounts", "-n", "shop"}, "yes"},
		{[]string{"watch", "serviceaccounts"}, "yes"},
		{[]string{"patch", "configmaps", "-n", "shop"}, "yes"},
		{[]string{"get", "configmaps", "-n", "shop"}, "yes"},
		{[]string{"get", "serviceaccounts", "-n", "shop"}, "yes"},
		{[]string{"get", "services", "-n", "shop"}, "yes"},
		{[]string{"create", "serviceaccounts", "--subresource=token", "-n", "shop"}, "no"},
		{[]string{"update", "gateways.gateway.networking.k8s.io", "--subresource=status"}, "yes"},
		{[]string{"update", "gateways.gateway.networking.k8s.io"}, "no"},
		{[]string{"delete", "gateways.gateway.networking.k8s.io"}, "no"},
		{[]string{"patch", "statefulsets.apps"}, "no"},
		{[]string{"delete", "pods"}, "no"},
		{[]string{"get", "leases.coordination.k8s.io/istiod-lite-leader", "-n", "ambit-system"}, "yes"},
		{[]string{"update", "leases.coordination.k8s.io/istiod-lite-leader", "-n", "ambit-system"}, "yes"},
		{[]string{"create", "leases.coordination.k8s.io", "-n", "ambit-system"}, "yes"},
		{[]string{"update", "leases.coordination.k8s.io/other", "-n", "ambit-system"}, "no"},
		{[]string{"create", "leases.coordination.k8s.io", "-n", "default"}, "no"},
		{[]string{"delete", "leases.coordination.k8s.io/istiod-lite-leader", "-n", "ambit-system"}, "no"},
		// the status writer: route and policy status (update), the Service
		// WaypointBound condition (server-side apply: patch), nothing else
		{[]string{"update", "httproutes.gateway.networking.k8s.io", "--subresource=status"}, "yes"},
		{[]string{"update", "grpcroutes.gateway.networking.k8s.io", "--subresource=status"}, "yes"},
		{[]string{"update", "authorizationpolicies.security.istio.io", "--subresource=status"}, "yes"},
		{[]string{"patch", "services", "--subresource=status", "-n", "shop"}, "yes"},
		{[]string{"update", "services", "--subresource=status", "-n", "shop"}, "no"},
	} {
		got := canI(kc, append(c.args, sa)...)
		if strings.TrimSpace(got) != c.want {
			t.Errorf("istiod-lite can-i %s: %q, want %q", strings.Join(c.args, " "), strings.TrimSpace(got), c.want)
		}
	}
	t.Run("waypoint deployer as istiod-lite", func(t *testing.T) { testDeployerRBAC(t, c) })

	// ztunnel has no Kubernetes API access at all.
	got := canI(kc, "list", "pods", "--as=system:serviceaccount:ambit-system:ztunnel")
	if strings.TrimSpace(got) != "no" {
		t.Errorf("ztunnel can list pods: %q", got)
	}
}

// testDeployerRBAC runs the waypoint deployer under leader election as the
// istiod-lite service account, with only the RBAC applied above: it must
// take the Lease, apply a waypoint's objects and write the Gateway's status.
func testDeployerRBAC(t *testing.T, c *kube.Cluster) {
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	admin := c.Client()
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// the CA roots istiod-lite would have published
	if _, err := admin.CoreV1().ConfigMaps("ambit-system").Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "ambit-ca-root"}, Data: map[string]string{"root-cert.pem": "ROOTS"},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tok, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.ConfigForToken(tok)
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctrl := deployer.New(deployer.Config{Kube: cs, Gateway: gwclient.NewForConfigOrDie(cfg)})
	el := &leader.Elector{Client: cs, Run: ctrl.Start, Identity: "istiod-lite-0",
		LeaseDuration: 3 * time.Second, RenewDeadline: time.Second, RetryPeriod: 200 * time.Millisecond}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- el.Start(runCtx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("elector: %v", err)
		}
	}()

	gws := gwclient.NewForConfigOrDie(c.Config()).GatewayV1().Gateways("shop")
	_, err = gws.Create(ctx, &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Namespace: "shop"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint",
			Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	programmed := func() (metav1.ConditionStatus, string) {
		gw, err := gws.Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return "", err.Error()
		}
		if c := meta.FindStatusCondition(gw.Status.Conditions, "Programmed"); c != nil {
			return c.Status, c.Reason
		}
		return "", "no condition"
	}
	for {
		st, reason := programmed()
		if st == metav1.ConditionFalse && reason == "Pending" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("waypoint status as istiod-lite: %s %s", st, reason)
		}
		time.Sleep(50 * time.Millisecond) // poll a condition under ctx's deadline
	}
	// as the controller-manager would, once a pod is ready
	d, err := admin.AppsV1().Deployments("shop").Get(ctx, "waypoint", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("waypoint deployment: %v", err)
	}
	d.Status = appsv1.DeploymentStatus{Replicas: 1, ReadyReplicas: 1, AvailableReplicas: 1, UpdatedReplicas: 1}
	if _, err := admin.AppsV1().Deployments("shop").UpdateStatus(ctx, d, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		st, reason := programmed()
		if st == metav1.ConditionTrue {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("waypoint not programmed as istiod-lite: %s %s", st, reason)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, get := range []func() error{
		func() error {
			_, err := admin.CoreV1().Services("shop").Get(ctx, "waypoint", metav1.GetOptions{})
			return err
		},
		func() error {
			_, err := admin.CoreV1().ServiceAccounts("shop").Get(ctx, "waypoint", metav1.GetOptions{})
			return err
		},
	} {
		if err := get(); err != nil {
			t.Error(fmt.Errorf("waypoint object: %w", err))
		}
	}
	lease, err := admin.CoordinationV1().Leases("ambit-system").Get(ctx, "istiod-lite-leader", metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != "istiod-lite-0" {
		t.Errorf("lease: %v %+v", err, lease)
	}
}
