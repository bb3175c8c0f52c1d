package kubelet

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// With MountVolumes, ServiceProxy, HostPaths and RunHostNetwork, a mapped
// image sees the manifest's paths as written, in a mount namespace of its
// own: a projected token, a Secret, a hostPath (this node's view of it), an
// emptyDir over /tmp; it runs with its securityContext (user, capabilities,
// read-only root); it reaches the API server at the cluster IP of
// default/kubernetes (KUBERNETES_SERVICE_HOST, verified TLS), and a TCP
// readiness probe makes it Ready. A hostNetwork pod runs the same way in the
// node's namespace.
func TestKubeletMountsVolumes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network and mount namespaces")
	}
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 plays the mapped image's server; not installed")
	}
	c := kube.Start(t, kube.Options{})
	topo, err := netns.Build(netns.Config{Prefix: fmt.Sprintf("kv%d", os.Getpid()), Nodes: []netns.NodeConfig{{Name: "node-1"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cs := c.Client()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "tool"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Secrets("shop").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "kube-ca"},
		Data: map[string][]byte{"ca.crt": c.Config().TLSClientConfig.CAData, "key": []byte("s3cret")}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	// The image: a program of its directory, named by the command.
	image := filepath.Join(work, "image")
	if err := os.MkdirAll(image, 0o755); err != nil {
		t.Fatal(err)
	}
	run := `#!/bin/sh
set -e
{
echo "args=$*"
echo "api=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
echo "token=$(cat /var/run/secrets/tokens/token)"
echo "secret=$(cat /etc/kube-ca/key)"
echo "host=$(cat /host/data/f)"
echo "tmp=$(ls -A /tmp | wc -l)"
echo "uid=$(id -u)"
echo "capeff=$(grep CapEff /proc/self/status | cut -f2)"
if touch /rootfs-test 2>/dev/null; then echo rootfs=rw; rm -f /rootfs-test; else echo rootfs=ro; fi
python3 -c 'import ssl, json, os, urllib.request
ctx = ssl.create_default_context(cafile="/etc/kube-ca/ca.crt")
url = "https://%s:%s/version" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
print("version=" + json.load(urllib.request.urlopen(url, context=ctx))["gitVersion"])'
} > /data/seen 2>&1
exec python3 -m http.server "$1" --bind 0.0.0.0
`
	if err := os.WriteFile(filepath.Join(image, "run"), []byte(run), 0o755); err != nil {
		t.Fatal(err)
	}
	// This node's /srv/ambit-test is a directory of the test's.
	nodeDir := filepath.Join(work, "node-1-srv")
	if err := os.MkdirAll(filepath.Join(nodeDir, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(nodeDir, "data", "f"), []byte("node-1's file"), 0o644); err != nil {
		t.Fatal(err)
	}
	kl := &Kubelet{Client: cs, Node: topo.Nodes[0], WorkDir: filepath.Join(work, "kubelet"), RestartDelay: 200 * time.Millisecond,
		Logger:       slog.New(slog.NewTextHandler(tWriter{t}, nil)),
		Images:       map[string]string{"example/tool:1": image},
		MountVolumes: true, ServiceProxy: true, RunHostNetwork: true, SecurityContext: true,
		HostPaths: map[string]string{"/srv/ambit-test": nodeDir},
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
	exp := int64(3600)
	dirType := corev1.HostPathDirectory
	mk := func(name string, hostNetwork bool, port int, uid int64, add []corev1.Capability) {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop"},
			Spec: corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "tool", AutomountServiceAccountToken: ptr(false), HostNetwork: hostNetwork,
				Containers: []corev1.Container{{
					Name: "tool", Image: "example/tool:1", Command: []string{"/run"}, Args: []string{fmt.Sprint(port)},
					SecurityContext: &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &uid, ReadOnlyRootFilesystem: ptr(true),
						AllowPrivilegeEscalation: ptr(false), Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}, Add: add}},
					Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: int32(port)}},
					ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromString("http")}}},
					VolumeMounts: []corev1.VolumeMount{
						{Name: "token", MountPath: "/var/run/secrets/tokens", ReadOnly: true},
						{Name: "ca", MountPath: "/etc/kube-ca", ReadOnly: true},
						{Name: "host", MountPath: "/host/data", ReadOnly: true},
						{Name: "tmp", MountPath: "/tmp"},
						{Name: "data", MountPath: "/data"},
					},
				}},
				Volumes: []corev1.Volume{
					{Name: "token", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{{
						ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Audience: "istio-ca", ExpirationSeconds: &exp, Path: "token"}}}}}},
					{Name: "ca", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "kube-ca"}}},
					{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/srv/ambit-test/data", Type: &dirType}}},
					{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
					{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
				}},
		}
		if _, err := cs.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mk("tool-0", false, 8080, 1000, nil)
	mk("tool-host", true, 18080, 0, []corev1.Capability{"NET_ADMIN"})
	want := map[string][]string{
		"tool-0":    {"uid=1000", "capeff=0000000000000000"},
		"tool-host": {"uid=0", "capeff=0000000000001000"}, // CAP_NET_ADMIN only
	}
	for _, name := range []string{"tool-0", "tool-host"} {
		for {
			p, err := cs.CoreV1().Pods("shop").Get(ctx, name, metav1.GetOptions{})
			if err == nil && podReady(p) {
				break
			}
			if ctx.Err() != nil {
				b, _ := os.ReadFile(kl.LogFile("shop/"+name, "tool"))
				t.Fatalf("pod %s never became ready\n%s", name, b)
			}
			time.Sleep(50 * time.Millisecond)
		}
		b, err := os.ReadFile(filepath.Join(work, "kubelet", "shop."+name, "volumes", "data", "seen"))
		if err != nil {
			t.Fatal(err)
		}
		seen := string(b)
		for _, want := range []string{"api=10.96.0.1:443", "token=token-of-" + name + "-for-istio-ca", "secret=s3cret",
			"host=node-1's file", "tmp=0", "version=v", "rootfs=ro", want[name][0], want[name][1]} {
			if !strings.Contains(seen, want) {
				t.Errorf("pod %s saw no %q:\n%s", name, want, seen)
			}
		}
		if p := kl.Pod("shop/" + name); (p != nil) == (name == "tool-host") {
			t.Errorf("pod %s: network %v", name, p)
		}
	}
}
