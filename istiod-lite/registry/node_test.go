package registry

import (
	"context"
	"os/exec"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

// TestNodeAdvertisesQUIC runs the registry against a real kube-apiserver,
// as istiod-lite's service account (so manifests/' RBAC must let it watch
// Nodes): a pod on a node labelled ambit.dev/hbone-quic=enabled advertises
// QUIC, one on another node does not, a pod label "disabled" and a
// namespace label "disabled" override the node, and labelling or
// unlabelling a node moves its pods, and only its pods.
func TestNodeAdvertisesQUIC(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl not installed")
	}
	c := kube.Start(t, kube.Options{})
	ctx := t.Context()
	kc := c.Kubeconfig()
	kubectl(t, kc, "apply", "--server-side", "-f", "../../manifests/namespace.yaml", "-f", "../../manifests/crds/")
	if err := c.WaitCRDsEstablished(ctx); err != nil {
		t.Fatal(err)
	}
	kubectl(t, kc, "apply", "--server-side", "-f", "../../manifests/istiod-lite-rbac.yaml")
	admin := c.Client()
	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "demo", Labels: map[string]string{model.LabelDataplaneMode: model.DataplaneAmbient}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "slow", Labels: map[string]string{model.LabelDataplaneMode: model.DataplaneAmbient, model.LabelHBONEQUIC: "disabled"}}},
	} {
		if _, err := admin.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.CoreV1().ServiceAccounts(ns.Name).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for name, labels := range map[string]map[string]string{"node-q": {model.LabelHBONEQUIC: "enabled"}, "node-p": nil} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	runPod(t, ctx, admin, podObj("on-q", map[string]string{"app": "a"}, "node-q"), "10.1.1.10")
	runPod(t, ctx, admin, podObj("on-q-off", map[string]string{"app": "a", model.LabelHBONEQUIC: "disabled"}, "node-q"), "10.1.1.11")
	runPod(t, ctx, admin, podObj("on-p", map[string]string{"app": "a"}, "node-p"), "10.1.2.10")
	runPod(t, ctx, admin, podObj("on-p-on", map[string]string{"app": "a", model.LabelHBONEQUIC: "enabled"}, "node-p"), "10.1.2.11")
	slow := podObj("slow-on-q", map[string]string{"app": "a"}, "node-q")
	slow.Namespace = "slow"
	runPod(t, ctx, admin, slow, "10.1.1.12")

	token, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.ConfigForToken(token)
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	store := &model.Store{}
	k := &Kubernetes{Client: cs, Dynamic: dyn, Store: store}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- k.Start(rctx) }()
	defer func() { cancel(); <-done }()
	select {
	case <-k.Synced():
	case <-time.After(60 * time.Second):
		t.Fatal("registry did not sync (can istiod-lite's service account watch Nodes?)")
	}

	quic := func(ns, pod string) bool {
		w := store.Load().Workloads[translate.WorkloadUID("", ns, pod)]
		if w == nil {
			t.Fatalf("no workload %s/%s", ns, pod)
		}
		return w.QUIC
	}
	check := func(when string, want map[string]bool) {
		t.Helper()
		eventually(t, when, func() bool {
			for key, v := range want {
				ns, pod := "demo", key
				if key == "slow-on-q" {
					ns = "slow"
				}
				if quic(ns, pod) != v {
					return false
				}
			}
			return true
		})
	}
	check("first model", map[string]bool{"on-q": true, "on-q-off": false, "on-p": false, "on-p-on": true, "slow-on-q": false})

	// node-p is labelled: its pods follow; node-q's are not rebuilt.
	before := store.Load().Workloads[translate.WorkloadUID("", "demo", "on-q")]
	setNodeLabel(t, ctx, admin, "node-p", "enabled")
	check("node-p labelled", map[string]bool{"on-q": true, "on-q-off": false, "on-p": true, "on-p-on": true, "slow-on-q": false})
	if store.Load().Workloads[translate.WorkloadUID("", "demo", "on-q")] != before {
		t.Error("a pod on another node was rebuilt")
	}
	// node-q's label is removed: its pods stop advertising, but for the
	// one whose own label says enabled (none here) and the opted-out ones.
	setNodeLabel(t, ctx, admin, "node-q", "")
	check("node-q unlabelled", map[string]bool{"on-q": false, "on-q-off": false, "on-p": true, "on-p-on": true, "slow-on-q": false})
	// node-p is deleted: its pods keep only their own label's say.
	if err := admin.CoreV1().Nodes().Delete(ctx, "node-p", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	check("node-p deleted", map[string]bool{"on-p": false, "on-p-on": true})
}

// setNodeLabel sets (or, with "", removes) a node's ambit.dev/hbone-quic.
func setNodeLabel(t *testing.T, ctx context.Context, cs kubernetes.Interface, name, v string) {
	t.Helper()
	n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Labels == nil {
		n.Labels = map[string]string{}
	}
	if v == "" {
		delete(n.Labels, model.LabelHBONEQUIC)
	} else {
		n.Labels[model.LabelHBONEQUIC] = v
	}
	if _, err := cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}
