package kube

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// DefaultVersion is the Kubernetes version whose kube-apiserver is used.
const DefaultVersion = "v1.36.3"

// Issuer is the service-account token issuer (the "iss" claim) of every
// cluster the harness starts.
const Issuer = "https://kubernetes.default.svc.cluster.local"

// AdminUser is the user name of the admin token (group system:masters).
const AdminUser = "ambit-admin"

// ControllerManagerUser and SchedulerUser are the users the controller
// manager and the scheduler authenticate as (tokens); the API server's
// bootstrap RBAC grants them their roles.
const (
	ControllerManagerUser = "system:kube-controller-manager"
	SchedulerUser         = "system:kube-scheduler"
)

// KubeletClientUser is the user (client certificate common name) the API
// server presents to kubelets when it proxies pods/exec, pods/portforward
// and pods/log; the harness binds it to system:kubelet-api-admin.
const KubeletClientUser = "kube-apiserver-kubelet-client"

// ErrUnavailable is returned (wrapped) by New when etcd or a Kubernetes
// binary is not there (make tools builds them; make deps installs etcd).
var ErrUnavailable = errors.New("kube: etcd or a Kubernetes binary unavailable")

// Options tune a cluster. The zero value is usable.
type Options struct {
	// APIServer is the kube-apiserver binary. Default: $AMBIT_KUBE_APISERVER,
	// else the cache that build.sh fills (never built by the harness).
	APIServer string
	// Etcd is the etcd binary. Default: $AMBIT_ETCD, else etcd on $PATH.
	Etcd string
	// APIAudiences are the audiences the API server accepts for its own
	// authentication (--api-audiences). Default: [Issuer]. TokenRequest can
	// still mint tokens for any audience (e.g. "istio-ca").
	APIAudiences []string
	// ExtraArgs are appended to kube-apiserver's flags (later flags win).
	ExtraArgs []string
	// ControllerManager starts kube-controller-manager too (Deployments,
	// ReplicaSets, DaemonSets, EndpointSlices, service accounts and their
	// tokens, the root CA ConfigMap, garbage collection, node lifecycle),
	// each controller with its own service account's credentials.
	ControllerManager bool
	// Scheduler starts kube-scheduler too: pods without spec.nodeName are
	// bound to registered, Ready nodes (see kubelet.Kubelet.Register).
	Scheduler bool
	// ControllerManagerBin and SchedulerBin are their binaries. Default:
	// $AMBIT_KUBE_CONTROLLER_MANAGER / $AMBIT_KUBE_SCHEDULER, else the cache
	// that build.sh fills (never built by the harness).
	ControllerManagerBin, SchedulerBin string
	// ControllerManagerArgs and SchedulerArgs are appended to their flags.
	ControllerManagerArgs, SchedulerArgs []string
	// StartTimeout bounds the wait for /readyz (default 90s).
	StartTimeout time.Duration
}

// Cluster is a running etcd + kube-apiserver. Its methods are safe for
// concurrent use.
type Cluster struct {
	dir        string
	cfg        *rest.Config
	client     kubernetes.Interface
	kubeconfig string
	saKeyFile  string
	ca         *authority // signs kubelet serving certificates and the API server's kubelet client certificate
	etcd       *process
	apiserver  *process
	controller *process // kube-controller-manager; nil unless Options.ControllerManager
	scheduler  *process // kube-scheduler; nil unless Options.Scheduler
	closeOnce  sync.Once
	closeErr   error
}

// Start starts a cluster for the test and stops it in t.Cleanup. It fails
// the test when etcd or kube-apiserver is missing (the message says how to
// get it: a skipped test would pass a run that checked nothing) or does not
// start.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	c, err := New(t.Context(), opts)
	if err != nil {
		t.Fatalf("kube: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kube-apiserver output (tail):\n%s", c.apiserver.tail(60))
			if c.controller != nil {
				t.Logf("kube-controller-manager output (tail):\n%s", c.controller.tail(40))
			}
			if c.scheduler != nil {
				t.Logf("kube-scheduler output (tail):\n%s", c.scheduler.tail(20))
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("kube: close: %v", err)
		}
	})
	return c
}

// New starts a cluster; the caller must Close it. ctx bounds the start only,
// not the cluster's life.
func New(ctx context.Context, opts Options) (*Cluster, error) {
	apiserverBin, err := findAPIServer(opts.APIServer)
	if err != nil {
		return nil, err
	}
	etcdBin, err := findEtcd(opts.Etcd)
	if err != nil {
		return nil, err
	}
	var bins componentBins
	bins.apiserver, bins.etcd = apiserverBin, etcdBin
	if opts.ControllerManager {
		if bins.controller, err = findComponent("kube-controller-manager", opts.ControllerManagerBin, "AMBIT_KUBE_CONTROLLER_MANAGER"); err != nil {
			return nil, err
		}
	}
	if opts.Scheduler {
		if bins.scheduler, err = findComponent("kube-scheduler", opts.SchedulerBin, "AMBIT_KUBE_SCHEDULER"); err != nil {
			return nil, err
		}
	}
	// Free ports are found by binding and releasing them, so another process
	// can take one before etcd or kube-apiserver binds it; start again then.
	for attempt := 1; ; attempt++ {
		dir, err := os.MkdirTemp("", "ambit-kube-")
		if err != nil {
			return nil, fmt.Errorf("kube: %w", err)
		}
		c := &Cluster{dir: dir}
		err = c.start(ctx, bins, opts)
		if err == nil {
			return c, nil
		}
		c.Close()
		if attempt == 3 || !strings.Contains(err.Error(), "address already in use") {
			return nil, err
		}
	}
}

// componentBins are the binaries a cluster runs ("" when not wanted).
type componentBins struct {
	apiserver, etcd, controller, scheduler string
}

func (c *Cluster) start(ctx context.Context, bins componentBins, opts Options) error {
	ports, err := freePorts(5)
	if err != nil {
		return fmt.Errorf("kube: free ports: %w", err)
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	c.etcd, err = startProcess(filepath.Join(c.dir, "etcd.log"), bins.etcd,
		"--name=default",
		"--data-dir="+filepath.Join(c.dir, "etcd"),
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=default="+peerURL,
		"--listen-metrics-urls=",
		"--log-level=warn",
	)
	if err != nil {
		return fmt.Errorf("kube: start etcd: %w", err)
	}

	tokens := map[string]string{AdminUser: randomToken(), ControllerManagerUser: randomToken(), SchedulerUser: randomToken()}
	adminToken := tokens[AdminUser]
	files, err := c.writeFiles(tokens)
	if err != nil {
		return err
	}
	c.saKeyFile = files.saKey
	auds := opts.APIAudiences
	if len(auds) == 0 {
		auds = []string{Issuer}
	}
	port := ports[2]
	args := []string{
		"--etcd-servers=" + etcdURL,
		"--etcd-prefix=/registry",
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + files.servingCert,
		"--tls-private-key-file=" + files.servingKey,
		"--token-auth-file=" + files.tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=" + Issuer,
		"--service-account-key-file=" + files.saKey,
		"--service-account-signing-key-file=" + files.saKey,
		"--api-audiences=" + strings.Join(auds, ","),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		// Kubelets (kubelet.Kubelet with an API) serve on localhost, with
		// certificates from the cluster CA, and verify this client
		// certificate.
		"--kubelet-preferred-address-types=Hostname,InternalIP",
		"--kubelet-certificate-authority=" + files.caCert,
		"--kubelet-client-certificate=" + files.kubeletClientCert,
		"--kubelet-client-key=" + files.kubeletClientKey,
		// Published in kube-system/extension-apiserver-authentication,
		// which the controller manager and the scheduler read.
		"--client-ca-file=" + files.caCert,
		"--cert-dir=" + filepath.Join(c.dir, "pki"),
		"--v=0",
	}
	args = append(args, opts.ExtraArgs...)
	c.apiserver, err = startProcess(filepath.Join(c.dir, "kube-apiserver.log"), bins.apiserver, args...)
	if err != nil {
		return fmt.Errorf("kube: start kube-apiserver: %w", err)
	}

	c.cfg = &rest.Config{
		Host:            "https://127.0.0.1:" + strconv.Itoa(port),
		BearerToken:     adminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: files.caPEM},
		QPS:             100,
		Burst:           200,
	}
	timeout := opts.StartTimeout
	if timeout <= 0 {
		timeout = 90 * time.Second
	}
	if err := c.waitReady(ctx, timeout); err != nil {
		return err
	}
	c.client, err = kubernetes.NewForConfig(c.Config())
	if err != nil {
		return fmt.Errorf("kube: client: %w", err)
	}
	c.kubeconfig = filepath.Join(c.dir, "kubeconfig")
	if err := c.writeKubeconfig(c.kubeconfig, "ambit-admin", adminToken, files.caPEM); err != nil {
		return err
	}
	// The API server's kubelet client may proxy to every kubelet's API (the
	// stand-in kubelet authorizes it with a SubjectAccessReview).
	if _, err := c.client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: KubeletClientUser},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:kubelet-api-admin"},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: KubeletClientUser}},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("kube: kubelet client binding: %w", err)
	}
	if bins.controller != "" {
		kc := filepath.Join(c.dir, "kube-controller-manager.kubeconfig")
		if err := c.writeKubeconfig(kc, ControllerManagerUser, tokens[ControllerManagerUser], files.caPEM); err != nil {
			return err
		}
		args := []string{
			"--kubeconfig=" + kc,
			"--authentication-kubeconfig=" + kc,
			"--authorization-kubeconfig=" + kc,
			"--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(ports[3]),
			"--cert-dir=" + filepath.Join(c.dir, "kube-controller-manager"),
			"--leader-elect=false",
			"--use-service-account-credentials=true",
			"--service-account-private-key-file=" + files.saKey,
			"--root-ca-file=" + files.servingCert,
			"--cluster-signing-cert-file=" + files.caCert,
			"--cluster-signing-key-file=" + files.caKey,
			"--v=1",
		}
		c.controller, err = startProcess(filepath.Join(c.dir, "kube-controller-manager.log"), bins.controller, append(args, opts.ControllerManagerArgs...)...)
		if err != nil {
			return fmt.Errorf("kube: start kube-controller-manager: %w", err)
		}
	}
	if bins.scheduler != "" {
		kc := filepath.Join(c.dir, "kube-scheduler.kubeconfig")
		if err := c.writeKubeconfig(kc, SchedulerUser, tokens[SchedulerUser], files.caPEM); err != nil {
			return err
		}
		args := []string{
			"--kubeconfig=" + kc,
			"--authentication-kubeconfig=" + kc,
			"--authorization-kubeconfig=" + kc,
			"--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(ports[4]),
			"--cert-dir=" + filepath.Join(c.dir, "kube-scheduler"),
			"--leader-elect=false",
			"--v=1",
		}
		c.scheduler, err = startProcess(filepath.Join(c.dir, "kube-scheduler.log"), bins.scheduler, append(args, opts.SchedulerArgs...)...)
		if err != nil {
			return fmt.Errorf("kube: start kube-scheduler: %w", err)
		}
	}
	if c.controller != nil {
		if err := waitHealthy(ctx, timeout, "kube-controller-manager", ports[3], c.controller); err != nil {
			return err
		}
		// The service-account controller is running once the default
		// namespace has its "default" service account (pods need it).
		if err := c.waitDefaultServiceAccount(ctx, timeout); err != nil {
			return err
		}
	}
	if c.scheduler != nil {
		if err := waitHealthy(ctx, timeout, "kube-scheduler", ports[4], c.scheduler); err != nil {
			return err
		}
	}
	return nil
}

// writeKubeconfig writes a kubeconfig for user (token) at path.
func (c *Cluster) writeKubeconfig(path, user, token string, caPEM []byte) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["ambit"] = &clientcmdapi.Cluster{Server: c.cfg.Host, CertificateAuthorityData: caPEM}
	kc.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	kc.Contexts["ambit"] = &clientcmdapi.Context{Cluster: "ambit", AuthInfo: user, Namespace: "default"}
	kc.CurrentContext = "ambit"
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		return fmt.Errorf("kube: write kubeconfig: %w", err)
	}
	return nil
}

// waitHealthy polls a component's /healthz on its secure port (its own
// self-signed certificate in its --cert-dir: not verified, a local probe of
// a child process) until it answers 200, the process exits or the timeout
// passes.
func waitHealthy(ctx context.Context, timeout time.Duration, name string, port int, p *process) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // a local health probe
	}}
	defer hc.CloseIdleConnections()
	url := "https://127.0.0.1:" + strconv.Itoa(port) + "/healthz"
	var last string
	for {
		select {
		case <-p.done:
			return fmt.Errorf("kube: %s exited: %v\n%s", name, p.err, p.tail(30))
		case <-ctx.Done():
			return fmt.Errorf("kube: %s not healthy after %s (last: %s)\n%s", name, timeout, last, p.tail(30))
		case <-time.After(200 * time.Millisecond):
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := hc.Do(req)
		if err != nil {
			last = err.Error()
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return nil
		}
		last = fmt.Sprintf("%d %s", resp.StatusCode, body)
	}
}

func (c *Cluster) waitDefaultServiceAccount(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		_, err := c.client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			return nil
		}
		select {
		case <-c.controller.done:
			return fmt.Errorf("kube: kube-controller-manager exited: %v\n%s", c.controller.err, c.controller.tail(30))
		case <-ctx.Done():
			return fmt.Errorf("kube: no default service account after %s (%v)\n%s", timeout, err, c.controller.tail(30))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// waitReady polls /readyz until it answers 200 (RBAC's bootstrap roles are
// in place by then), one of the processes exits, or the timeout passes.
func (c *Cluster) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tr, err := rest.TransportFor(c.Config())
	if err != nil {
		return fmt.Errorf("kube: transport: %w", err)
	}
	hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	var last string
	for {
		select {
		case <-c.etcd.done:
			return fmt.Errorf("kube: etcd exited: %v\n%s", c.etcd.err, c.etcd.tail(30))
		case <-c.apiserver.done:
			return fmt.Errorf("kube: kube-apiserver exited: %v\n%s", c.apiserver.err, c.apiserver.tail(30))
		case <-ctx.Done():
			return fmt.Errorf("kube: kube-apiserver not ready after %s (last: %s)\n%s", timeout, last, c.apiserver.tail(30))
		case <-time.After(200 * time.Millisecond):
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.cfg.Host+"/readyz", nil)
		resp, err := hc.Do(req)
		if err != nil {
			last = err.Error()
			continue
		}
		body := make([]byte, 512)
		n, _ := resp.Body.Read(body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return nil
		}
		last = fmt.Sprintf("%d %s", resp.StatusCode, body[:n])
	}
}

// Config returns a copy of the admin client configuration.
func (c *Cluster) Config() *rest.Config { return rest.CopyConfig(c.cfg) }

// ConfigForToken returns a client configuration that authenticates with
// token (e.g. a service-account token) instead of the admin token, so tests
// can exercise RBAC.
func (c *Cluster) ConfigForToken(token string) *rest.Config {
	cfg := rest.AnonymousClientConfig(c.cfg)
	cfg.BearerToken = token
	return cfg
}

// Client returns an admin clientset.
func (c *Cluster) Client() kubernetes.Interface { return c.client }

// Kubeconfig returns the path of an admin kubeconfig (for kubectl).
func (c *Cluster) Kubeconfig() string { return c.kubeconfig }

// ServiceAccountKeyFile returns the path of the PEM (SEC 1) ECDSA P-256 key
// that signs service-account tokens, for tests that forge tokens the
// TokenRequest API would not issue (expired ones, say).
func (c *Cluster) ServiceAccountKeyFile() string { return c.saKeyFile }

// ServiceAccountToken mints a token for namespace/serviceAccount with the
// TokenRequest API, valid for an hour, for the given audiences (nil: the API
// server's). When boundPod is not empty the token is bound to that pod in the
// same namespace (the pod must exist; the token then names the pod and its
// node, and stops verifying when the pod is deleted). The service account
// must exist.
func (c *Cluster) ServiceAccountToken(ctx context.Context, namespace, serviceAccount string, audiences []string, boundPod string) (string, error) {
	exp := int64(3600)
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: &exp}}
	if boundPod != "" {
		pod, err := c.client.CoreV1().Pods(namespace).Get(ctx, boundPod, metav1.GetOptions{})
		if err != nil {
			return "", fmt.Errorf("kube: token: bound pod: %w", err)
		}
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	resp, err := c.client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, serviceAccount, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("kube: token for %s/%s: %w", namespace, serviceAccount, err)
	}
	return resp.Status.Token, nil
}

// Close stops kube-apiserver and etcd and deletes their data. It is
// idempotent.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		var errs []error
		if c.scheduler != nil {
			errs = append(errs, c.scheduler.stop())
		}
		if c.controller != nil {
			errs = append(errs, c.controller.stop())
		}
		if c.apiserver != nil {
			errs = append(errs, c.apiserver.stop())
		}
		if c.etcd != nil {
			errs = append(errs, c.etcd.stop())
		}
		errs = append(errs, os.RemoveAll(c.dir))
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

type clusterFiles struct {
	servingCert, servingKey, tokens, saKey string
	caCert, caKey                          string // the cluster CA (kubelets)
	kubeletClientCert, kubeletClientKey    string
	caPEM                                  []byte // the API server's serving certificate (self-signed)
}

// writeFiles writes the serving certificate (self-signed, for 127.0.0.1 and
// localhost), the token file (a token per user), the service-account
// signing key, and the cluster CA with the API server's kubelet client
// certificate.
func (c *Cluster) writeFiles(tokens map[string]string) (clusterFiles, error) {
	var f clusterFiles
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return f, fmt.Errorf("kube: serving key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		Subject:               pkix.Name{CommonName: "ambit test kube-apiserver"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		// 10.96.0.1: the cluster IP of default/kubernetes, where pods reach
		// the API server (kubelet.Kubelet.ServiceProxy).
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.IPv4(10, 96, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return f, fmt.Errorf("kube: serving cert: %w", err)
	}
	f.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return f, fmt.Errorf("kube: serving key: %w", err)
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return f, fmt.Errorf("kube: service-account key: %w", err)
	}
	saDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return f, fmt.Errorf("kube: service-account key: %w", err)
	}
	c.ca, err = newAuthority("ambit test cluster CA")
	if err != nil {
		return f, err
	}
	clientCert, clientKey, err := c.ca.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: KubeletClientUser},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return f, err
	}
	caKey, err := x509.MarshalPKCS8PrivateKey(c.ca.key)
	if err != nil {
		return f, fmt.Errorf("kube: CA key: %w", err)
	}
	var tokenLines strings.Builder
	for _, user := range []string{AdminUser, ControllerManagerUser, SchedulerUser} {
		group := ""
		if user == AdminUser {
			group = "system:masters"
		}
		fmt.Fprintf(&tokenLines, "%s,%s,%s-uid,%q\n", tokens[user], user, strings.ReplaceAll(user, ":", "-"), group)
	}
	f.caCert = filepath.Join(c.dir, "ca.crt")
	f.caKey = filepath.Join(c.dir, "ca.key")
	f.kubeletClientCert = filepath.Join(c.dir, "kubelet-client.crt")
	f.kubeletClientKey = filepath.Join(c.dir, "kubelet-client.key")
	f.servingCert = filepath.Join(c.dir, "serving.crt")
	f.servingKey = filepath.Join(c.dir, "serving.key")
	f.tokens = filepath.Join(c.dir, "tokens.csv")
	f.saKey = filepath.Join(c.dir, "sa.key")
	for _, w := range []struct {
		path string
		data []byte
	}{
		{f.servingCert, f.caPEM},
		{f.servingKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})},
		{f.tokens, []byte(tokenLines.String())},
		{f.saKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER})},
		{f.caCert, c.ca.certPEM},
		{f.caKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: caKey})},
		{f.kubeletClientCert, clientCert},
		{f.kubeletClientKey, clientKey},
	} {
		if err := os.WriteFile(w.path, w.data, 0o600); err != nil {
			return f, fmt.Errorf("kube: %w", err)
		}
	}
	return f, nil
}

func findEtcd(path string) (string, error) {
	if path == "" {
		path = os.Getenv("AMBIT_ETCD")
	}
	if path == "" {
		path = "etcd"
	}
	p, err := exec.LookPath(path)
	if err != nil {
		return "", fmt.Errorf("%w: etcd not found (%v); install it with: apt-get install -y etcd-server, or set AMBIT_ETCD", ErrUnavailable, err)
	}
	return p, nil
}

func findAPIServer(path string) (string, error) {
	return findComponent("kube-apiserver", path, "AMBIT_KUBE_APISERVER")
}

// findComponent finds the binary of a Kubernetes component: path, else
// $env, else build.sh's cache.
func findComponent(name, path, env string) (string, error) {
	if path == "" {
		path = os.Getenv(env)
	}
	if path != "" {
		p, err := exec.LookPath(path)
		if err != nil {
			return "", fmt.Errorf("%w: %s %s: %v", ErrUnavailable, name, path, err)
		}
		return p, nil
	}
	cache := os.Getenv("AMBIT_CACHE")
	if cache == "" {
		if d, err := os.UserCacheDir(); err == nil {
			cache = filepath.Join(d, "ambit")
		}
	}
	version := os.Getenv("AMBIT_KUBE_VERSION")
	if version == "" {
		version = DefaultVersion
	}
	cached := filepath.Join(cache, name+"-"+version, name)
	if isExecutable(cached) {
		return cached, nil
	}
	// Never built here: a cold build takes longer than a test's timeout, and
	// parallel test binaries would each start one. make tools builds it once.
	return "", fmt.Errorf("%w: %s %s is not built at %s: run `make tools` (integration/apiserver/build.sh) or set %s", ErrUnavailable, name, version, cached, env)
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func randomToken() string {
	b := make([]byte, 24)
	rand.Read(b)
	return fmt.Sprintf("%x", b)
}

// process is a child process whose output goes to a log file.
type process struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when the process has exited; err is set then
	err  error
}

func startProcess(logPath, bin string, args ...string) (*process, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Die with the test binary even when it is killed, and get a process
	// group of its own.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	p := &process{cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p, nil
}

// stop sends SIGTERM, then SIGKILL after 10 s, and waits for the exit.
func (p *process) stop() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	return nil
}

func (p *process) tail(n int) string {
	if p == nil {
		return ""
	}
	b, err := os.ReadFile(p.log)
	if err != nil {
		return err.Error()
	}
	return lastLines(string(b), n)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// crdGVR is the resource of CustomResourceDefinitions.
var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// WaitCRDsEstablished waits until every CustomResourceDefinition in the
// cluster reports Established=True, or ctx ends. Use it instead of
// `kubectl wait --for=condition=Established crd --all`, which fails at once
// ("accessor error") on a CRD created so recently that it has no conditions.
func (c *Cluster) WaitCRDsEstablished(ctx context.Context) error {
	dyn, err := dynamic.NewForConfig(c.Config())
	if err != nil {
		return fmt.Errorf("kube: %w", err)
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		list, err := dyn.Resource(crdGVR).List(ctx, metav1.ListOptions{})
		var pending []string
		if err == nil {
			for _, crd := range list.Items {
				if !established(crd.Object) {
					pending = append(pending, crd.GetName())
				}
			}
			if len(pending) == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return fmt.Errorf("kube: CRDs not established: %w", err)
			}
			return fmt.Errorf("kube: CRDs not established: %s: %w", strings.Join(pending, ", "), ctx.Err())
		case <-tick.C:
		}
	}
}

func established(obj map[string]any) bool {
	conds, _, _ := unstructured.NestedSlice(obj, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}

// WaitAuthorized waits until the API server's authorizer allows user (with
// groups) every one of attrs: RBAC objects just written reach the
// authorizer through its informers, a moment later. A test that acts as a
// service account right after binding its roles waits here first.
func (c *Cluster) WaitAuthorized(ctx context.Context, user string, groups []string, attrs ...authorizationv1.ResourceAttributes) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, a := range attrs {
		for {
			sar, err := c.client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
				Spec: authorizationv1.SubjectAccessReviewSpec{User: user, Groups: groups, ResourceAttributes: &a},
			}, metav1.CreateOptions{})
			if err == nil && sar.Status.Allowed {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("kube: %s not allowed to %s %s/%s %s: %v", user, a.Verb, a.Namespace, a.Resource, a.Name, err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}
