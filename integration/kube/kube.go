package kube

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
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

// ErrUnavailable is returned (wrapped) by New when etcd or kube-apiserver is
// not there (make tools builds kube-apiserver; make deps installs etcd).
var ErrUnavailable = errors.New("kube: etcd or kube-apiserver unavailable")

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
	etcd       *process
	apiserver  *process
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
	// Free ports are found by binding and releasing them, so another process
	// can take one before etcd or kube-apiserver binds it; start again then.
	for attempt := 1; ; attempt++ {
		dir, err := os.MkdirTemp("", "ambit-kube-")
		if err != nil {
			return nil, fmt.Errorf("kube: %w", err)
		}
		c := &Cluster{dir: dir}
		err = c.start(ctx, apiserverBin, etcdBin, opts)
		if err == nil {
			return c, nil
		}
		c.Close()
		if attempt == 3 || !strings.Contains(err.Error(), "address already in use") {
			return nil, err
		}
	}
}

func (c *Cluster) start(ctx context.Context, apiserverBin, etcdBin string, opts Options) error {
	ports, err := freePorts(3)
	if err != nil {
		return fmt.Errorf("kube: free ports: %w", err)
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	c.etcd, err = startProcess(filepath.Join(c.dir, "etcd.log"), etcdBin,
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

	adminToken := randomToken()
	files, err := c.writeFiles(adminToken)
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
		"--cert-dir=" + filepath.Join(c.dir, "pki"),
		"--v=0",
	}
	args = append(args, opts.ExtraArgs...)
	c.apiserver, err = startProcess(filepath.Join(c.dir, "kube-apiserver.log"), apiserverBin, args...)
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
	kc := clientcmdapi.NewConfig()
	kc.Clusters["ambit"] = &clientcmdapi.Cluster{Server: c.cfg.Host, CertificateAuthorityData: files.caPEM}
	kc.AuthInfos["ambit-admin"] = &clientcmdapi.AuthInfo{Token: adminToken}
	kc.Contexts["ambit"] = &clientcmdapi.Context{Cluster: "ambit", AuthInfo: "ambit-admin", Namespace: "default"}
	kc.CurrentContext = "ambit"
	if err := clientcmd.WriteToFile(*kc, c.kubeconfig); err != nil {
		return fmt.Errorf("kube: write kubeconfig: %w", err)
	}
	return nil
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
	caPEM                                  []byte
}

// writeFiles writes the serving certificate (self-signed, for 127.0.0.1 and
// localhost), the token file and the service-account signing key.
func (c *Cluster) writeFiles(adminToken string) (clusterFiles, error) {
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
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
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
		{f.tokens, []byte(adminToken + "," + AdminUser + ",ambit-admin-uid,\"system:masters\"\n")},
		{f.saKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER})},
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
	if path == "" {
		path = os.Getenv("AMBIT_KUBE_APISERVER")
	}
	if path != "" {
		p, err := exec.LookPath(path)
		if err != nil {
			return "", fmt.Errorf("%w: kube-apiserver %s: %v", ErrUnavailable, path, err)
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
	cached := filepath.Join(cache, "kube-apiserver-"+version, "kube-apiserver")
	if isExecutable(cached) {
		return cached, nil
	}
	// Never built here: a cold build takes longer than a test's timeout, and
	// parallel test binaries would each start one. make tools builds it once.
	return "", fmt.Errorf("%w: kube-apiserver %s is not built at %s: run `make tools` (integration/apiserver/build.sh) or set AMBIT_KUBE_APISERVER", ErrUnavailable, version, cached)
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
