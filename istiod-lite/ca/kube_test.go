package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	capb "github.com/ambit-mesh/ambit/api/ca/v1"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/kube"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
)

// The certificate service against a real kube-apiserver: istiod-lite runs
// with its own service account and least-privilege RBAC; ztunnels and a
// waypoint authenticate with pod-bound tokens.
func TestKubeNodeAuthorization(t *testing.T) {
	cluster := kube.Start(t, kube.Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	admin := cluster.Client()

	for _, ns := range []string{"ambit-system", "shop"} {
		create(t, ctx, admin, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
	}
	for _, sa := range []string{"ambit-system/ztunnel", "ambit-system/istiod-lite", "shop/cart", "shop/pay", "shop/waypoint", "shop/late"} {
		ns, name, _ := strings.Cut(sa, "/")
		create(t, ctx, admin, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}})
	}
	pod(t, ctx, admin, "ambit-system", "ztunnel-1", "ztunnel", "node-1")
	pod(t, ctx, admin, "ambit-system", "ztunnel-2", "ztunnel", "node-2")
	pod(t, ctx, admin, "shop", "cart-0", "cart", "node-1")
	pod(t, ctx, admin, "shop", "pay-0", "pay", "node-2")
	wpPod := pod(t, ctx, admin, "shop", "waypoint-0", "waypoint", "node-2")
	wpPod.Labels = map[string]string{auth.LabelGatewayName: "waypoint"}
	if _, err := admin.CoreV1().Pods("shop").Update(ctx, wpPod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}

	// istiod-lite's RBAC: exactly what the certificate service needs.
	create(t, ctx, admin, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "ambit-ca"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
	}})
	create(t, ctx, admin, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "ambit-ca"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "ambit-ca"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "ambit-system", Name: "istiod-lite"}}})
	create(t, ctx, admin, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: "ambit-system", Name: "ambit-ca"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{"ambit-ca"}, Verbs: []string{"get"}},
		{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{"ambit-ca-root"}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"create"}},
	}})
	create(t, ctx, admin, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: "ambit-system", Name: "ambit-ca"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "ambit-ca"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "ambit-system", Name: "istiod-lite"}}})
	if err := cluster.WaitAuthorized(ctx, "system:serviceaccount:ambit-system:istiod-lite",
		[]string{"system:serviceaccounts", "system:serviceaccounts:ambit-system"},
		authorizationv1.ResourceAttributes{Namespace: "ambit-system", Verb: "get", Resource: "secrets", Name: "ambit-ca"},
		authorizationv1.ResourceAttributes{Namespace: "ambit-system", Verb: "create", Resource: "secrets"},
		authorizationv1.ResourceAttributes{Namespace: "ambit-system", Verb: "get", Resource: "configmaps", Name: "ambit-ca-root"},
		authorizationv1.ResourceAttributes{Namespace: "ambit-system", Verb: "update", Resource: "configmaps", Name: "ambit-ca-root"},
		authorizationv1.ResourceAttributes{Namespace: "ambit-system", Verb: "create", Resource: "configmaps"},
		authorizationv1.ResourceAttributes{Verb: "list", Resource: "pods"},
		authorizationv1.ResourceAttributes{Group: "authentication.k8s.io", Verb: "create", Resource: "tokenreviews"},
	); err != nil {
		t.Fatal(err)
	}
	istiodToken, err := cluster.ServiceAccountToken(ctx, "ambit-system", "istiod-lite", nil, "")
	if err != nil {
		t.Fatal(err)
	}
	istiod, err := kubernetes.NewForConfig(cluster.ConfigForToken(istiodToken))
	if err != nil {
		t.Fatal(err)
	}

	// Two replicas start at once: one root, stored in the Secret.
	var cas [2]*certs.CA
	var errs [2]error
	var wg sync.WaitGroup
	for i := range cas {
		wg.Go(func() {
			cas[i], errs[i] = certs.LoadOrCreateCA(ctx, ca.SecretStore{Client: istiod}, identity.DefaultTrustDomain, certs.Options{}, nil)
		})
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil {
		t.Fatalf("LoadOrCreateCA: %v, %v", errs[0], errs[1])
	}
	if !cas[0].SigningCertificate().Equal(cas[1].SigningCertificate()) {
		t.Fatal("two replicas generated two roots")
	}
	authority := cas[0]
	sec, err := admin.CoreV1().Secrets("ambit-system").Get(ctx, "ambit-ca", metav1.GetOptions{})
	if err != nil || len(sec.Data["ca.crt"]) == 0 || len(sec.Data["ca.key"]) == 0 || len(sec.Data["roots.pem"]) == 0 {
		t.Fatalf("secret ambit-system/ambit-ca: %v, keys %v", err, keys(sec))
	}

	// istiod-lite publishes the bundle; ztunnels mount it to verify istiod-lite.
	for range 2 { // the second call takes the update path
		if err := ca.PublishBundle(ctx, istiod, "", "", authority.Bundle()); err != nil {
			t.Fatal(err)
		}
	}
	cm, err := admin.CoreV1().ConfigMaps("ambit-system").Get(ctx, ca.DefaultBundleConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rootsFile := writeFile(t, dir, "root-cert.pem", cm.Data[ca.BundleConfigMapKey])

	pods := &ca.PodIndex{Client: istiod}
	podCtx, stopPods := context.WithCancel(ctx)
	podDone := make(chan error, 1)
	go func() { podDone <- pods.Start(podCtx) }()
	t.Cleanup(func() {
		stopPods()
		if err := <-podDone; err != nil {
			t.Errorf("pod index: %v", err)
		}
	})
	select {
	case <-pods.Ready():
	case <-ctx.Done():
		t.Fatal("pod index did not sync")
	}
	var logs logBuffer
	addr := serve(t, &ca.Server{CA: authority, Authenticator: &auth.KubeAuthenticator{Client: istiod}, Workloads: pods, Logger: newLogger(&logs)})

	token := func(ns, sa, boundPod string, aud ...string) string {
		t.Helper()
		if aud == nil {
			aud = []string{auth.DefaultAudience}
		}
		tok, err := cluster.ServiceAccountToken(ctx, ns, sa, aud, boundPod)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	client := func(tokenFile string) *caclient.Client {
		c := &caclient.Client{Addr: addr, Roots: &caclient.BundleFile{Path: rootsFile}, TokenFile: tokenFile}
		t.Cleanup(func() { c.Close() })
		return c
	}
	issue := func(c certs.Issuer, id string) error {
		_, err := c.Issue(ctx, wid(t, "shop", id), mustCSRDER(t, wid(t, "shop", id)))
		return err
	}
	cart, pay := wid(t, "shop", "cart"), wid(t, "shop", "pay")

	z1File := writeFile(t, dir, "z1", token("ambit-system", "ztunnel", "ztunnel-1"))
	z1 := client(z1File)

	t.Run("ztunnel gets identities on its node through a Manager", func(t *testing.T) {
		m := &certs.Manager{Issuer: z1}
		defer m.Close()
		m.SetIdentities([]spiffeid.ID{cart})
		svid, err := m.GetX509SVID(ctx, cart)
		if err != nil {
			t.Fatal(err)
		}
		if got, _, err := x509svid.Verify(svid.Certificates, authority.Bundle()); err != nil || got != cart {
			t.Fatalf("verify: %s, %v", got, err)
		}
		if !logs.hasLine("certificate issued", `caller="pod ambit-system/ztunnel-1"`, "node=node-1", "identity="+cart.String()) {
			t.Errorf("no issuance log line:\n%s", logs.String())
		}
	})
	t.Run("ztunnel is denied identities of another node", func(t *testing.T) {
		wantCode(t, "ztunnel-1 asks for pay (node-2)", issue(z1, "pay"), codes.PermissionDenied)
		if !logs.hasLine("certificate refused", "PermissionDenied", `caller="pod ambit-system/ztunnel-1"`, "node=node-1", "identity="+pay.String()) {
			t.Errorf("no refusal log line naming caller, node and identity:\n%s", logs.String())
		}
		z2 := client(writeFile(t, dir, "z2", token("ambit-system", "ztunnel", "ztunnel-2")))
		if err := issue(z2, "pay"); err != nil {
			t.Fatalf("ztunnel-2 asks for pay: %v", err)
		}
		wantCode(t, "ztunnel-2 asks for cart (node-1)", issue(z2, "cart"), codes.PermissionDenied)
		wantCode(t, "a service account with no pods", issue(z2, "nobody"), codes.PermissionDenied)
	})
	t.Run("a pod scheduled a moment ago is authorized at once", func(t *testing.T) {
		pod(t, ctx, admin, "shop", "late-0", "late", "node-1")
		if err := issue(z1, "late"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("a deleted pod's identity is no longer granted", func(t *testing.T) {
		pod(t, ctx, admin, "shop", "gone-0", "late", "node-2")
		z2 := client(writeFile(t, dir, "z2b", token("ambit-system", "ztunnel", "ztunnel-2")))
		if err := issue(z2, "late"); err != nil {
			t.Fatal(err)
		}
		if err := admin.CoreV1().Pods("shop").Delete(ctx, "gone-0", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for issue(z2, "late") == nil {
			if time.Now().After(deadline) {
				t.Fatal("still granted 20 s after the pod was deleted")
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	t.Run("a waypoint gets only its own identity", func(t *testing.T) {
		wp := client(writeFile(t, dir, "wp", token("shop", "waypoint", "waypoint-0")))
		if err := issue(wp, "waypoint"); err != nil {
			t.Fatal(err)
		}
		wantCode(t, "waypoint asks for pay on its node", issue(wp, "pay"), codes.PermissionDenied)
		if !logs.hasLine("certificate refused", `caller="pod shop/waypoint-0"`, "callerKind=waypoint", "node=node-2", "identity="+pay.String()) {
			t.Errorf("no refusal log line for the waypoint:\n%s", logs.String())
		}
	})
	t.Run("the token file is re-read on every call", func(t *testing.T) {
		rot := client(writeFile(t, dir, "rot", token("ambit-system", "ztunnel", "ztunnel-1")))
		if err := issue(rot, "cart"); err != nil {
			t.Fatal(err)
		}
		writeFile(t, dir, "rot", token("ambit-system", "ztunnel", "ztunnel-2"))
		wantCode(t, "after rotation to node-2's token", issue(rot, "cart"), codes.PermissionDenied)
		if err := issue(rot, "pay"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("bad tokens are unauthenticated", func(t *testing.T) {
		tmp := pod(t, ctx, admin, "ambit-system", "ztunnel-tmp", "ztunnel", "node-1")
		deleted := token("ambit-system", "ztunnel", tmp.Name)
		if err := admin.CoreV1().Pods("ambit-system").Delete(ctx, tmp.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
			t.Fatal(err)
		}
		good := token("ambit-system", "ztunnel", "ztunnel-1")
		// Forging works (a re-signed copy of a good token authenticates) ...
		if err := issue(client(writeFile(t, dir, "resigned", resign(t, cluster, good, 0))), "cart"); err != nil {
			t.Fatalf("re-signed token: %v", err)
		}
		for name, tok := range map[string]string{
			"wrong audience":      token("ambit-system", "ztunnel", "ztunnel-1", "other"),
			"API server audience": token("ambit-system", "ztunnel", "ztunnel-1", kube.Issuer),
			"not bound to a pod":  token("ambit-system", "ztunnel", ""),
			"bound pod deleted":   deleted,
			"expired":             resign(t, cluster, good, -2*time.Hour), // ... so this one fails for its expiry
			"garbage":             "not-a-jwt",
			"truncated signature": good[:len(good)-10],
		} {
			wantCode(t, name, issue(client(writeFile(t, dir, "bad", tok)), "cart"), codes.Unauthenticated)
		}
		_, err := rawClient(t, addr, authority, "").CreateCertificate(ctx, &capb.CreateCertificateRequest{Identity: cart.String(), Csr: csrPEM(t, nil, cart.String())})
		wantCode(t, "no token", err, codes.Unauthenticated)
	})
	t.Run("bad requests are refused", func(t *testing.T) {
		raw := rawClient(t, addr, authority, token("ambit-system", "ztunnel", "ztunnel-1"))
		small, err := rsa.GenerateKey(rand.Reader, 1024)
		if err != nil {
			t.Fatal(err)
		}
		for name, req := range map[string]*capb.CreateCertificateRequest{
			"SAN differs":          {Identity: cart.String(), Csr: csrPEM(t, nil, "spiffe://cluster.local/ns/shop/sa/other")},
			"several SANs":         {Identity: cart.String(), Csr: csrPEM(t, nil, cart.String(), pay.String())},
			"non-SPIFFE URI":       {Identity: cart.String(), Csr: csrPEM(t, nil, "https://cluster.local/ns/shop/sa/cart")},
			"foreign trust domain": {Identity: "spiffe://evil.example/ns/shop/sa/cart", Csr: csrPEM(t, nil, "spiffe://evil.example/ns/shop/sa/cart")},
			"not an identity":      {Identity: "cart", Csr: csrPEM(t, nil, cart.String())},
			"malformed CSR":        {Identity: cart.String(), Csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"},
			"not PEM":              {Identity: cart.String(), Csr: "hello"},
			"huge CSR":             {Identity: cart.String(), Csr: strings.Repeat("A", 1<<20)},
			"RSA 1024":             {Identity: cart.String(), Csr: csrPEM(t, small, cart.String())},
			"negative validity":    {Identity: cart.String(), Csr: csrPEM(t, nil, cart.String()), ValidityDuration: -1},
		} {
			resp, err := raw.CreateCertificate(ctx, req)
			if err == nil {
				t.Errorf("%s: issued %d certificates", name, len(resp.GetCertChain()))
				continue
			}
			wantCode(t, name, err, codes.InvalidArgument)
		}
		resp, err := raw.CreateCertificate(ctx, &capb.CreateCertificateRequest{Identity: cart.String(), Csr: csrPEM(t, nil, cart.String()), ValidityDuration: 3600})
		if err != nil {
			t.Fatal(err)
		}
		chain, err := certs.ParseCertificates([]byte(strings.Join(resp.CertChain, "")))
		if err != nil {
			t.Fatal(err)
		}
		if d := chain[0].NotAfter.Sub(chain[0].NotBefore); d != time.Hour+time.Minute {
			t.Errorf("validity_duration 3600: lifetime %s", d)
		}
	})
}

func create[T interface{ GetName() string }](t *testing.T, ctx context.Context, cs kubernetes.Interface, obj T) {
	t.Helper()
	var err error
	switch o := any(obj).(type) {
	case *corev1.Namespace:
		_, err = cs.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{})
	case *corev1.ServiceAccount:
		_, err = cs.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *rbacv1.ClusterRole:
		_, err = cs.RbacV1().ClusterRoles().Create(ctx, o, metav1.CreateOptions{})
	case *rbacv1.ClusterRoleBinding:
		_, err = cs.RbacV1().ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{})
	case *rbacv1.Role:
		_, err = cs.RbacV1().Roles(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *rbacv1.RoleBinding:
		_, err = cs.RbacV1().RoleBindings(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	default:
		t.Fatalf("create: unsupported %T", obj)
	}
	if err != nil {
		t.Fatalf("create %T %s: %v", obj, obj.GetName(), err)
	}
}

// pod creates a pod already scheduled on node (there is no scheduler).
func pod(t *testing.T, ctx context.Context, cs kubernetes.Interface, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	p, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa,
			NodeName:           node,
			Containers:         []corev1.Container{{Name: "app", Image: "app"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return p
}

func keys(s *corev1.Secret) []string {
	var out []string
	if s != nil {
		for k := range s.Data {
			out = append(out, k)
		}
	}
	return out
}

// resign re-signs a service-account token with the cluster's signing key,
// shifting its iat/nbf/exp by shift: a way to get an expired token that is
// otherwise genuine.
func resign(t *testing.T, c *kube.Cluster, token string, shift time.Duration) string {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts", len(parts))
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"iat", "nbf", "exp"} {
		if v, ok := claims[k].(float64); ok {
			claims[k] = int64(v) + int64(shift/time.Second)
		}
	}
	if payload, err = json.Marshal(claims); err != nil {
		t.Fatal(err)
	}
	pemData, err := os.ReadFile(c.ServiceAccountKeyFile())
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(pemData)
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	signed := parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload)
	sum := sha256.Sum256([]byte(signed))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig)
}
