package kubelet

import (
	"context"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/integration/netns"
)

func TestKubeletRunsAndRemovesPods(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	c := kube.Start(t, kube.Options{})
	topo, err := netns.Build(netns.Config{Prefix: fmt.Sprintf("kl%d", os.Getpid()), Nodes: []netns.NodeConfig{{Name: "node-1"}, {Name: "node-2"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	cs := c.Client()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// No controller-manager runs: create the service account it would.
	if _, err := cs.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	prepared := make(chan string, 4)
	kls := map[string]*Kubelet{}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 2)
	for _, n := range topo.Nodes {
		kl := &Kubelet{Client: cs, Node: n, Prepare: func(_ context.Context, pod *corev1.Pod, p *netns.Pod) error {
			prepared <- pod.Name + "@" + p.Node.Name
			return nil
		}}
		kls[n.Name] = kl
		go func() { done <- kl.Start(runCtx) }()
	}
	defer func() {
		stop()
		for range kls {
			if err := <-done; err != nil {
				t.Error(err)
			}
		}
	}()

	mk := func(name, node string) {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop"},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{
				Name: "app", Image: "ambit-app", Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
			}}},
		}
		if _, err := cs.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mk("server", "node-2")
	mk("client", "node-1")
	waitIP := func(name string) string {
		for ctx.Err() == nil {
			p, err := cs.CoreV1().Pods("shop").Get(ctx, name, metav1.GetOptions{})
			if err == nil && p.Status.PodIP != "" && p.Status.Phase == corev1.PodRunning {
				return p.Status.PodIP
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("pod %s never got an IP", name)
		return ""
	}
	serverIP, clientIP := waitIP("server"), waitIP("client")
	got := map[string]bool{<-prepared: true, <-prepared: true}
	if !got["server@node-2"] || !got["client@node-1"] {
		t.Fatalf("Prepare calls %v", got)
	}

	client := kls["node-1"].Pod("shop/client")
	res, err := app.Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
		return client.NS.Dial(ctx, nil, "tcp", net.JoinHostPort(serverIP, "8080"))
	}, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if res.Server != "server" || res.PeerSeen[:len(clientIP)] != clientIP {
		t.Fatalf("exchange %+v; client ip %s", res, clientIP)
	}

	nsPath := fmt.Sprintf("/var/run/netns/kl%d-shop.server", os.Getpid())
	if _, err := os.Stat(nsPath); err != nil {
		t.Fatalf("pod netns %s: %v", nsPath, err)
	}
	if err := cs.CoreV1().Pods("shop").Delete(ctx, "server", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(nsPath); os.IsNotExist(err) {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the deleted pod's netns is still there")
		}
		time.Sleep(100 * time.Millisecond)
	}
}
