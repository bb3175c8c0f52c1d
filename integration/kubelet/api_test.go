package kubelet

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/remotecommand"

	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// A registered kubelet has a Ready Node with capacity and the API's port,
// and a Lease; through the API server, kubectl exec (the pod's network and
// host name, stdin, exit codes), kubectl logs and kubectl port-forward reach
// its pod; its API refuses clients without a certificate from the cluster CA.
func TestKubeletRegistersAndServesAPI(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	kubectlBin, err := exec.LookPath("kubectl")
	if err != nil {
		t.Fatal("kubectl is not installed: scripts/install-deps.sh integration")
	}
	c := kube.Start(t, kube.Options{})
	topo, err := netns.Build(netns.Config{Prefix: fmt.Sprintf("ka%d", os.Getpid()), Nodes: []netns.NodeConfig{{Name: "node-1"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cs := c.Client()
	serverTLS, err := c.KubeletTLS("node-1")
	if err != nil {
		t.Fatal(err)
	}
	// An image of two programs, mapped to their directory.
	imageDir := t.TempDir()
	for name, script := range map[string]string{
		"serve":    "#!/bin/sh\necho \"started on $(hostname)\"\ncat \"${1#--crt=}\"\nexec sleep 1000\n",
		"cert.crt": "CERT\n",
		"greet":    "#!/bin/sh\necho \"hello from $(hostname)\"\n",
	} {
		if err := os.WriteFile(filepath.Join(imageDir, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	kl := &Kubelet{Client: cs, Node: topo.Nodes[0], WorkDir: t.TempDir(), Register: true, TLS: serverTLS, PodHostnames: true,
		Images: map[string]string{"example/tools:1": imageDir}, Entrypoints: map[string]string{"example/tools:1": "serve"},
		Logger: slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- kl.Start(runCtx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	var node *corev1.Node
	waitFor(ctx, t, "a Ready node-1", func() bool {
		node, err = cs.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
		return err == nil && nodeReady(node) && node.Status.DaemonEndpoints.KubeletEndpoint.Port != 0
	})
	if got := node.Status.Allocatable[corev1.ResourcePods]; got.Value() != 110 {
		t.Errorf("allocatable pods %v", got.String())
	}
	var lease *coordinationv1.Lease
	waitFor(ctx, t, "node-1's lease", func() bool {
		lease, err = cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, "node-1", metav1.GetOptions{})
		return err == nil
	})
	if lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != "node-1" || lease.Spec.RenewTime == nil {
		t.Errorf("lease %+v", lease.Spec)
	}

	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Namespace: "shop"},
		Spec: corev1.PodSpec{NodeName: "node-1", AutomountServiceAccountToken: ptr(false), Containers: []corev1.Container{{
			Name: "app", Image: "ambit-app", Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
		}}},
	}
	if _, err := cs.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tools := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "tools-0", Namespace: "shop"},
		Spec: corev1.PodSpec{NodeName: "node-1", AutomountServiceAccountToken: ptr(false), Containers: []corev1.Container{{
			Name: "tools", Image: "example/tools:1", Args: []string{"--crt=/cert.crt"},
		}}},
	}
	if _, err := cs.CoreV1().Pods("shop").Create(ctx, tools, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"web-0", "tools-0"} {
		waitFor(ctx, t, name+" ready", func() bool {
			p, err := cs.CoreV1().Pods("shop").Get(ctx, name, metav1.GetOptions{})
			return err == nil && podReady(p) && len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].Ready
		})
	}
	podIP := kl.Pod("shop/web-0").IP.String()

	kubectl := func(stdin string, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, kubectlBin, append([]string{"--kubeconfig", c.Kubeconfig(), "-n", "shop"}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		if err != nil {
			err = fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, errb.String())
		}
		return out.String(), err
	}
	// exec: the pod's host name (its UTS namespace) and address (its
	// network namespace).
	out, err := kubectl("", "exec", "web-0", "--", "sh", "-c", "hostname; ip -4 -o addr show dev eth0")
	if err != nil {
		t.Fatal(err)
	}
	if lines := strings.SplitN(out, "\n", 2); lines[0] != "web-0" || !strings.Contains(out, " "+podIP+"/") {
		t.Errorf("exec: %q, want host name web-0 and address %s", out, podIP)
	}
	// stdin in, stdout and stderr out, the exit code back.
	out, err = kubectl("hello from stdin\n", "exec", "-i", "web-0", "-c", "app", "--", "sh", "-c", "cat; echo to-stderr >&2; exit 3")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 || out != "hello from stdin\n" || !strings.Contains(err.Error(), "to-stderr") {
		t.Errorf("exec -i: out %q, err %v; want the input echoed, to-stderr, exit code 3", out, err)
	}
	if _, err := kubectl("", "exec", "web-0", "-c", "nope", "--", "true"); err == nil {
		t.Error("exec into a container the pod does not have succeeded")
	}

	// A TTY: the command runs on a terminal of its own.
	req := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace("shop").Name("web-0").SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: "app", Command: []string{"tty"}, Stdout: true, TTY: true}, scheme.ParameterCodec)
	exe, err := remotecommand.NewSPDYExecutor(c.Config(), http.MethodPost, req.URL())
	if err != nil {
		t.Fatal(err)
	}
	var ttyOut bytes.Buffer
	if err := exe.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &ttyOut, Tty: true}); err != nil {
		t.Fatalf("exec with a TTY: %v", err)
	}
	if !regexp.MustCompile(`^/dev/pts/\d+\r?\n$`).MatchString(ttyOut.String()) {
		t.Errorf("exec tty printed %q, want a /dev/pts/N", ttyOut.String())
	}

	// An image-run container (its entrypoint, its file /cert.crt): its
	// process runs with the pod's host name, and exec finds the image's
	// other program.
	out, err = kubectl("", "exec", "tools-0", "--", "greet")
	if err != nil || out != "hello from tools-0\n" {
		t.Errorf("exec greet: %q, %v", out, err)
	}
	waitFor(ctx, t, "tools-0's log", func() bool {
		out, err = kubectl("", "logs", "tools-0")
		return err == nil && out == "started on tools-0\nCERT\n"
	})

	// logs: the in-process workload's log.
	out, err = kubectl("", "logs", "web-0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, `msg="serving echo"`) || !strings.Contains(out, "port=8080") {
		t.Errorf("logs: %q", out)
	}
	out, err = kubectl("", "logs", "web-0", "--tail=1")
	if err != nil || strings.Count(out, "\n") != 1 {
		t.Errorf("logs --tail=1: %q, %v", out, err)
	}

	// port-forward: a local port reaches the pod's 8080.
	pf := exec.CommandContext(ctx, kubectlBin, "--kubeconfig", c.Kubeconfig(), "-n", "shop", "port-forward", "pod/web-0", ":8080")
	stdout, err := pf.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var pfErr bytes.Buffer
	pf.Stderr = &pfErr
	if err := pf.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		pf.Process.Kill()
		pf.Wait()
	}()
	local := ""
	sc := bufio.NewScanner(stdout)
	re := regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+) -> 8080`)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			local = m[1]
			break
		}
	}
	if local == "" {
		t.Fatalf("kubectl port-forward printed no port: %s", pfErr.String())
	}
	go io.Copy(io.Discard, stdout)
	for i := range 3 { // one stream each, over one kubectl connection
		res, err := app.Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", "127.0.0.1:"+local)
		}, 256<<10)
		if err != nil {
			t.Fatalf("port-forward exchange %d: %v (%s)", i, err, pfErr.String())
		}
		if res.Server != "web-0" || !strings.HasPrefix(res.PeerSeen, "127.0.0.1:") {
			t.Errorf("port-forward exchange %d: %+v (want server web-0, seen from the pod's loopback)", i, res)
		}
	}

	// The API wants a client certificate from the cluster CA.
	url := "https://127.0.0.1:" + strconv.Itoa(int(node.Status.DaemonEndpoints.KubeletEndpoint.Port)) + "/containerLogs/shop/web-0/app"
	clientTLS, err := c.KubeletClientTLS()
	if err != nil {
		t.Fatal(err)
	}
	anon := clientTLS.Clone()
	anon.Certificates = nil
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		ok   bool
	}{{"the API server's kubelet client", clientTLS, true}, {"no certificate", anon, false}} {
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tc.cfg}}
		resp, err := hc.Get(url)
		if err == nil {
			resp.Body.Close()
		}
		if ok := err == nil && resp.StatusCode == http.StatusOK; ok != tc.ok {
			t.Errorf("%s: err %v, resp %v; want ok=%v", tc.name, err, resp, tc.ok)
		}
		hc.CloseIdleConnections()
	}
}

func waitFor(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
