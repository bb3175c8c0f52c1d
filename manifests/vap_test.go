package manifests_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
)

const vapName = "ambit-istiod-lite-waypoints"

// The ValidatingAdmissionPolicy of istiod-lite-vap.yaml on a real API
// server: istiod-lite's service account, which RBAC lets create, patch and
// delete Deployments, Services, ServiceAccounts and ConfigMaps everywhere,
// writes only waypoint objects (label gateway.istio.io/managed), cannot take
// over an unlabelled one, and writes only unprivileged waypoint
// Deployments; its own trust bundle stays writable and the admin is not
// affected. (The deployer itself runs under the policy in TestManifestsApply.)
func TestIstiodLiteAdmissionPolicy(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl not installed")
	}
	c := kube.Start(t, kube.Options{})
	kc := c.Kubeconfig()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	mustKubectl(t, kc, "apply", "--server-side", "-f", "namespace.yaml", "-f", "istiod-lite-rbac.yaml", "-f", "istiod-lite-vap.yaml")

	admin := c.Client()
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A workload's own objects, which istiod-lite must not touch.
	if _, err := admin.CoreV1().Services("shop").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().ConfigMaps("shop").Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "web-ca-root"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tok, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	istiod := kubernetes.NewForConfigOrDie(c.ConfigForToken(tok))

	managed := map[string]string{deployer.ManagedLabel: deployer.ManagedValue, deployer.GatewayNameLabel: "wp"}
	unlabelledCM := func(name string) *corev1.ConfigMap {
		return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name}}
	}
	// The policy takes effect once the API server has loaded it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := istiod.CoreV1().ConfigMaps("shop").Create(ctx, unlabelledCM("probe-ca-root"), metav1.CreateOptions{})
		if denied(err) {
			break
		}
		if err == nil {
			_ = admin.CoreV1().ConfigMaps("shop").Delete(ctx, "probe-ca-root", metav1.DeleteOptions{})
		}
		if time.Now().After(deadline) {
			t.Fatalf("the policy did not take effect: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // poll the API server under the deadline
	}

	deployment := func(edit func(*appsv1.Deployment)) *appsv1.Deployment {
		d := &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: "wp", Labels: managed},
			Spec: appsv1.DeploymentSpec{
				Selector: &metav1.LabelSelector{MatchLabels: map[string]string{deployer.GatewayNameLabel: "wp"}},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{deployer.GatewayNameLabel: "wp"}},
					Spec: corev1.PodSpec{
						ServiceAccountName: "wp",
						SecurityContext:    &corev1.PodSecurityContext{RunAsNonRoot: ptr.To(true), RunAsUser: ptr.To[int64](1337)},
						Containers:         []corev1.Container{{Name: "istio-proxy", Image: "ambit"}},
					},
				},
			},
		}
		if edit != nil {
			edit(d)
		}
		return d
	}
	createDeployment := func(d *appsv1.Deployment) error {
		_, err := istiod.AppsV1().Deployments("shop").Create(ctx, d, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err
	}

	for _, tc := range []struct {
		what string
		do   func() error
	}{
		{"create an unlabelled ConfigMap", func() error {
			_, err := istiod.CoreV1().ConfigMaps("shop").Create(ctx, unlabelledCM("x-ca-root"), metav1.CreateOptions{})
			return err
		}},
		{"take over a workload's Service by adding the label", func() error {
			patch := `{"metadata":{"labels":{"gateway.istio.io/managed":"istio.io-mesh-controller"}}}`
			_, err := istiod.CoreV1().Services("shop").Patch(ctx, "web", types.MergePatchType, []byte(patch), metav1.PatchOptions{})
			return err
		}},
		{"change a workload's Service", func() error {
			patch := `{"spec":{"selector":{"app":"evil"}}}`
			_, err := istiod.CoreV1().Services("shop").Patch(ctx, "web", types.MergePatchType, []byte(patch), metav1.PatchOptions{})
			return err
		}},
		{"delete a workload's ConfigMap", func() error {
			return istiod.CoreV1().ConfigMaps("shop").Delete(ctx, "web-ca-root", metav1.DeleteOptions{})
		}},
		{"create a labelled ConfigMap not named <gateway>-ca-root", func() error {
			_, err := istiod.CoreV1().ConfigMaps("shop").Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "settings", Labels: managed}}, metav1.CreateOptions{})
			return err
		}},
		{"create a labelled NodePort Service", func() error {
			_, err := istiod.CoreV1().Services("shop").Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: "wp", Labels: managed},
				Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Ports: []corev1.ServicePort{{Port: 15008}}},
			}, metav1.CreateOptions{})
			return err
		}},
		{"create an unlabelled Deployment", func() error {
			return createDeployment(deployment(func(d *appsv1.Deployment) { d.Labels = nil }))
		}},
		{"create a waypoint Deployment on the host network", func() error {
			return createDeployment(deployment(func(d *appsv1.Deployment) { d.Spec.Template.Spec.HostNetwork = true }))
		}},
		{"create a waypoint Deployment running as another service account", func() error {
			return createDeployment(deployment(func(d *appsv1.Deployment) { d.Spec.Template.Spec.ServiceAccountName = "default" }))
		}},
		{"create a privileged waypoint Deployment", func() error {
			return createDeployment(deployment(func(d *appsv1.Deployment) {
				d.Spec.Template.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{Privileged: ptr.To(true)}
			}))
		}},
		{"create a waypoint Deployment with a host path", func() error {
			return createDeployment(deployment(func(d *appsv1.Deployment) {
				d.Spec.Template.Spec.Volumes = []corev1.Volume{{Name: "root", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/"}}}}
			}))
		}},
	} {
		if err := tc.do(); !denied(err) {
			t.Errorf("istiod-lite may %s: %v, want the policy's denial", tc.what, err)
		}
	}

	// What the deployer does stays allowed: a waypoint's ConfigMap created,
	// changed, deleted; a waypoint Deployment; its own trust bundle.
	cms := istiod.CoreV1().ConfigMaps("shop")
	if _, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "wp-ca-root", Labels: managed}, Data: map[string]string{"root-cert.pem": "A"}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create a waypoint's ConfigMap: %v", err)
	}
	if _, err := cms.Patch(ctx, "wp-ca-root", types.MergePatchType, []byte(`{"data":{"root-cert.pem":"B"}}`), metav1.PatchOptions{}); err != nil {
		t.Fatalf("update a waypoint's ConfigMap: %v", err)
	}
	if err := cms.Delete(ctx, "wp-ca-root", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete a waypoint's ConfigMap: %v", err)
	}
	if err := createDeployment(deployment(nil)); err != nil {
		t.Fatalf("create a waypoint Deployment: %v", err)
	}
	if _, err := istiod.CoreV1().ConfigMaps("ambit-system").Create(ctx, unlabelledCM("ambit-ca-root"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("create its trust bundle: %v", err)
	}
	// The admin is not bound by it.
	if _, err := admin.CoreV1().ConfigMaps("shop").Create(ctx, unlabelledCM("admin-settings"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("the admin: %v", err)
	}
}

// denied says whether err is the policy's refusal.
func denied(err error) bool {
	return err != nil && (apierrors.IsForbidden(err) || apierrors.IsInvalid(err)) && strings.Contains(err.Error(), vapName)
}
