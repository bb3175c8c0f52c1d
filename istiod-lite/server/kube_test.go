package server

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// Cluster mode against a real kube-apiserver, as the istiod-lite service
// account of manifests/: the CA is created in its Secret, the roots are
// published to the ConfigMap ztunnels mount, and a client that trusts only
// those roots syncs the model built from the cluster.
func TestClusterModeAsServiceAccount(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl not installed")
	}
	c := kube.Start(t, kube.Options{})
	ctx := t.Context()
	for _, args := range [][]string{
		{"apply", "--server-side", "-f", "../../manifests/namespace.yaml", "-f", "../../manifests/crds/", "-f", "../../manifests/istiod-lite-rbac.yaml"},
		nil, // wait for the CRDs
	} {
		if args == nil {
			if err := c.WaitCRDsEstablished(ctx); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if out, err := exec.Command("kubectl", append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("kubectl %v: %v\n%s", args, err, out)
		}
	}
	admin := c.Client()
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo", Labels: map[string]string{model.LabelDataplaneMode: model.DataplaneAmbient}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().ServiceAccounts("demo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p, err := admin.CoreV1().Pods("demo").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "demo"},
		Spec:       corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.1.5"}
	if _, err := admin.CoreV1().Pods("demo").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// node-1's ztunnel, whose pod-bound token authenticates it to xDS.
	if _, err := admin.CoreV1().ServiceAccounts("ambit-system").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Pods("ambit-system").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-1", Namespace: "ambit-system"},
		Spec:       corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "ztunnel", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ztunnelToken, err := c.ServiceAccountToken(ctx, "ambit-system", "ztunnel", []string{auth.DefaultAudience}, "ztunnel-1")
	if err != nil {
		t.Fatal(err)
	}
	webToken, err := c.ServiceAccountToken(ctx, "demo", "default", []string{auth.DefaultAudience}, "web")
	if err != nil {
		t.Fatal(err)
	}
	// A waypoint pod: the Gateway label, and the service account of the
	// Gateway's name.
	if _, err := admin.CoreV1().ServiceAccounts("demo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "waypoint"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Pods("demo").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "waypoint-0", Namespace: "demo", Labels: map[string]string{auth.LabelGatewayName: "waypoint"}},
		Spec:       corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "waypoint", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waypointToken, err := c.ServiceAccountToken(ctx, "demo", "waypoint", []string{auth.DefaultAudience}, "waypoint-0")
	if err != nil {
		t.Fatal(err)
	}

	token, err := c.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	// Count the TokenReviews istiod-lite sends.
	var reviews atomic.Int64
	rc := c.ConfigForToken(token)
	rc.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripper(func(r *http.Request) (*http.Response, error) {
			if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/tokenreviews") {
				reviews.Add(1)
			}
			return rt.RoundTrip(r)
		})
	})
	rctx, cancel := context.WithCancel(ctx)
	addrs := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(rctx, Config{Rest: rc, Listen: "127.0.0.1:0", Admin: "-", Listening: func(g, _ string) { addrs <- g }})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	var addr string
	select {
	case addr = <-addrs:
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("istiod-lite did not start")
	}

	if _, err := admin.CoreV1().Secrets(ca.DefaultNamespace).Get(ctx, ca.DefaultSecretName, metav1.GetOptions{}); err != nil {
		t.Fatalf("CA secret: %v", err)
	}
	cm, err := admin.CoreV1().ConfigMaps(ca.DefaultNamespace).Get(ctx, ca.DefaultBundleConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("bundle ConfigMap: %v", err)
	}
	roots, err := x509bundle.Parse(identity.DefaultTrustDomain, []byte(cm.Data[ca.BundleConfigMapKey]))
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := caclient.TLSConfig(roots, identity.DefaultTrustDomain, identity.ControlPlane(identity.DefaultTrustDomain))
	// xDS takes node proxies' tokens (TokenReview), each for its own node
	// and the workload types, and waypoints' for the Envoy types.
	for _, tc := range []struct {
		what, token, node, typeURL string
		want                       codes.Code
	}{
		{"no token", "", "node-1", workload.WorkloadType, codes.Unauthenticated},
		{"istiod-lite's token (not for istio-ca, not pod-bound)", token, "node-1", workload.WorkloadType, codes.Unauthenticated},
		{"a workload's token", webToken, "node-1", workload.WorkloadType, codes.PermissionDenied},
		{"node-1's ztunnel claiming node-2", ztunnelToken, "node-2", workload.WorkloadType, codes.PermissionDenied},
		{"node-1's ztunnel asking for clusters", ztunnelToken, "node-1", resource.ClusterType, codes.PermissionDenied},
		{"the waypoint asking for workloads", waypointToken, "waypoint-0", workload.WorkloadType, codes.PermissionDenied},
	} {
		if _, err := firstResponse(ctx, addr, tlsConf, tc.token, tc.node, tc.typeURL); status.Code(err) != tc.want {
			t.Fatalf("xds with %s: got %v, want %s", tc.what, err, tc.want)
		}
	}
	// Token-review exhaustion: tokens that cannot be valid are refused
	// without a TokenReview (the issuer is the API server's, read from its
	// discovery document): garbage, another issuer's, another audience's.
	jwt := func(claims string) string {
		return "eyJhbGciOiJSUzI1NiJ9." + base64.RawURLEncoding.EncodeToString([]byte(claims)) + ".c2ln"
	}
	exp := time.Now().Add(time.Hour).Unix()
	before := reviews.Load()
	for i := range 20 {
		for _, tok := range []string{
			fmt.Sprintf("garbage-%d", i),
			jwt(fmt.Sprintf(`{"iss":"https://evil.example","aud":["istio-ca"],"exp":%d,"n":%d}`, exp, i)),
			jwt(fmt.Sprintf(`{"iss":%q,"aud":["kubernetes"],"exp":%d,"n":%d}`, kube.Issuer, exp, i)),
			jwt(fmt.Sprintf(`{"iss":%q,"aud":["istio-ca"],"exp":%d,"n":%d}`, kube.Issuer, time.Now().Add(-time.Minute).Unix(), i)),
		} {
			if _, err := firstResponse(ctx, addr, tlsConf, tok, "node-1", workload.WorkloadType); status.Code(err) != codes.Unauthenticated {
				t.Fatalf("xds with %s: %v, want Unauthenticated", tok, err)
			}
		}
	}
	if n := reviews.Load() - before; n != 0 {
		t.Fatalf("80 tokens that cannot be valid cost %d TokenReviews, want 0", n)
	}
	// A plausible forgery (right issuer, audience and expiry, no valid
	// signature) reaches the review, which refuses it.
	if _, err := firstResponse(ctx, addr, tlsConf, jwt(fmt.Sprintf(`{"iss":%q,"aud":["istio-ca"],"exp":%d}`, kube.Issuer, exp)), "node-1", workload.WorkloadType); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("xds with a forged token: %v, want Unauthenticated", err)
	}
	if n := reviews.Load() - before; n != 1 {
		t.Fatalf("a plausible forged token: %d TokenReviews, want 1", n)
	}
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(ztunnelToken), 0o600); err != nil {
		t.Fatal(err)
	}
	xc := &xdsclient.Client{Addr: addr, TLS: tlsConf, TokenFile: tokenFile, Node: "node-1", Store: &model.Store{}}
	go func() { _ = xc.Start(rctx) }()
	select {
	case <-xc.SyncedCh():
	case <-time.After(30 * time.Second):
		t.Fatal("client did not sync")
	}
	if w := xc.Store.Load().Workloads[translate.WorkloadUID("", "demo", "web")]; w == nil || !w.Enrolled || w.Node != "node-1" {
		t.Fatalf("web: %+v", w)
	}
}
