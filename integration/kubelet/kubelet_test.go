package kubelet

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

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

// An image mapped to a binary runs as a process in the pod's namespace with
// its env (values, $(VAR), fieldRefs), volumes at rewritten paths (a
// projected token minted by Token, a ConfigMap, an emptyDir), is Ready once
// its probe passes, and is restarted after a crash.
func TestKubeletRunsMappedImages(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 plays the mapped image's binary; not installed")
	}
	c := kube.Start(t, kube.Options{})
	topo, err := netns.Build(netns.Config{Prefix: fmt.Sprintf("km%d", os.Getpid()), Nodes: []netns.NodeConfig{{Name: "node-1"}}})
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
	if _, err := cs.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "proxy"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ConfigMaps("shop").Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "roots"}, Data: map[string]string{"root-cert.pem": "PEM"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	kl := &Kubelet{Client: cs, Node: topo.Nodes[0], WorkDir: work, RestartDelay: 200 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(tWriter{t}, nil)),
		Images: map[string]string{"example/proxy:1": py},
		Token: func(_ context.Context, pod *corev1.Pod, aud string) (string, error) {
			return "token-of-" + pod.Name + "-for-" + aud, nil
		}}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- kl.Start(runCtx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	// The "image" records what it was given, then serves HTTP on 8080.
	script := `import http.server, json, os, sys
args = sys.argv[1:]
out = {"args": args, "env": {k: v for k, v in os.environ.items() if k in ("POD_NAME", "POD_IP", "TOKEN_FILE", "ROOTS")}}
out["token"] = open(os.environ["TOKEN_FILE"]).read()
out["roots"] = open(os.environ["ROOTS"]).read()
open(args[0] + "/seen.json", "w").write(json.dumps(out))
http.server.HTTPServer(("", 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
`
	fieldEnv := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
	}
	exp := int64(3600)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "proxy-0", Namespace: "shop"},
		Spec: corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "proxy", AutomountServiceAccountToken: ptr(false), Containers: []corev1.Container{{
			Name: "proxy", Image: "example/proxy:1",
			Command: []string{"/proxy", "-c", script, "/data", "--name=$(POD_NAME)"},
			Env: []corev1.EnvVar{
				fieldEnv("POD_NAME", "metadata.name"), fieldEnv("POD_IP", "status.podIP"),
				{Name: "TOKEN_FILE", Value: "/var/run/secrets/tokens/istio-token"},
				{Name: "ROOTS", Value: "/etc/roots/root-cert.pem"},
			},
			Ports:          []corev1.ContainerPort{{Name: "status", ContainerPort: 8080}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromString("status")}}},
			VolumeMounts: []corev1.VolumeMount{
				{Name: "token", MountPath: "/var/run/secrets/tokens"},
				{Name: "roots", MountPath: "/etc/roots"},
				{Name: "data", MountPath: "/data"},
			},
		}},
			Volumes: []corev1.Volume{
				{Name: "token", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{{
					ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Audience: "istio-ca", ExpirationSeconds: &exp, Path: "istio-token"}}}}}},
				{Name: "roots", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "roots"}}}},
				{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
			}},
	}
	if _, err := cs.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ready := func(want bool) {
		t.Helper()
		for {
			p, err := cs.CoreV1().Pods("shop").Get(ctx, "proxy-0", metav1.GetOptions{})
			if err == nil {
				for _, c := range p.Status.Conditions {
					if c.Type == corev1.PodReady && (c.Status == corev1.ConditionTrue) == want {
						return
					}
				}
			}
			if ctx.Err() != nil {
				b, _ := os.ReadFile(kl.LogFile("shop/proxy-0", "proxy"))
				t.Fatalf("pod never became ready=%v\n%s", want, b)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	ready(true)
	b, err := os.ReadFile(filepath.Join(work, "shop.proxy-0", "volumes", "data", "seen.json"))
	if err != nil {
		t.Fatal(err)
	}
	var seen struct {
		Args  []string          `json:"args"`
		Env   map[string]string `json:"env"`
		Token string            `json:"token"`
		Roots string            `json:"roots"`
	}
	if err := json.Unmarshal(b, &seen); err != nil {
		t.Fatal(err)
	}
	p := kl.Pod("shop/proxy-0")
	dataDir := filepath.Join(work, "shop.proxy-0", "volumes", "data")
	if len(seen.Args) != 2 || seen.Args[0] != dataDir || seen.Args[1] != "--name=proxy-0" {
		t.Errorf("args %q", seen.Args)
	}
	if seen.Env["POD_NAME"] != "proxy-0" || seen.Env["POD_IP"] != p.IP.String() || seen.Token != "token-of-proxy-0-for-istio-ca" || seen.Roots != "PEM" {
		t.Errorf("seen %+v", seen)
	}
	if n := kl.Kill("shop/proxy-0"); n != 1 {
		t.Fatalf("killed %d processes", n)
	}
	ready(false)
	ready(true) // restarted
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func ptr[T any](v T) *T { return &v }
