package ca

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/identity"
)

// ErrUnauthenticated is wrapped by Authenticators for credentials they
// refuse (as opposed to failures to check them); the server answers
// codes.Unauthenticated.
var ErrUnauthenticated = errors.New("unauthenticated")

// CallerKind says what a caller may obtain.
type CallerKind int

const (
	// NodeProxy callers (ztunnels, local hosts) may obtain the identities of
	// workloads on their node.
	NodeProxy CallerKind = iota + 1
	// Workload callers (waypoints, any other pod) may obtain only their own
	// identity.
	Workload
)

func (k CallerKind) String() string {
	switch k {
	case NodeProxy:
		return "node-proxy"
	case Workload:
		return "workload"
	}
	return fmt.Sprintf("CallerKind(%d)", int(k))
}

// Caller is an authenticated client of the certificate service.
type Caller struct {
	Kind CallerKind
	// Name identifies the caller in logs: "pod <namespace>/<name>" or
	// "host <name>".
	Name string
	// Node is the node the caller runs on.
	Node string
	// Identity is the caller's own SPIFFE ID (Workload callers).
	Identity spiffeid.ID
}

// Authenticator turns a bearer token into a Caller. Errors that wrap
// ErrUnauthenticated refuse the token; others mean it could not be checked.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (*Caller, error)
}

// AuthenticateIncoming authenticates the caller of an incoming gRPC call (or
// stream) with a, by the bearer token in its metadata
// ("authorization: Bearer <token>"). Every service on 15012 takes its callers
// from here. Errors wrap ErrUnauthenticated when the call carries no usable
// token or a refuses it; other errors mean the token could not be checked.
func AuthenticateIncoming(ctx context.Context, a Authenticator) (*Caller, error) {
	token, err := bearerToken(ctx)
	if err != nil {
		return nil, err
	}
	return a.Authenticate(ctx, token)
}

// Defaults of KubeAuthenticator.
const (
	DefaultAudience  = "istio-ca"
	DefaultNamespace = identity.ControlPlaneNamespace // istiod-lite's own
)

// DefaultNodeProxies are the service accounts of ztunnels.
var DefaultNodeProxies = []string{DefaultNamespace + "/ztunnel"}

// KubeAuthenticator verifies Kubernetes service-account tokens with a
// TokenReview. A token must be bound to a pod (TokenRequest with a pod
// boundObjectRef, as kubelet's projected tokens are) and issued for one of
// Audiences; the caller's node is the bound pod's spec.nodeName, read from the
// API server (it needs get on pods and create on tokenreviews).
type KubeAuthenticator struct {
	// Client talks to the API server (required).
	Client kubernetes.Interface
	// Audiences the token must be issued for (default [DefaultAudience]).
	Audiences []string
	// TrustDomain of Workload callers' identities (identity.DefaultTrustDomain
	// if zero).
	TrustDomain spiffeid.TrustDomain
	// NodeProxies are the "<namespace>/<serviceaccount>"s of ztunnels
	// (DefaultNodeProxies if nil).
	NodeProxies []string
}

// Extra keys that the API server sets for pod-bound tokens.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
)

// Authenticate implements Authenticator.
func (a *KubeAuthenticator) Authenticate(ctx context.Context, token string) (*Caller, error) {
	auds := a.Audiences
	if len(auds) == 0 {
		auds = []string{DefaultAudience}
	}
	tr, err := a.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: auds},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("token review: %w", err)
	}
	st := tr.Status
	if !st.Authenticated {
		msg := st.Error
		if msg == "" {
			msg = "token not authenticated"
		}
		return nil, fmt.Errorf("%w: %s", ErrUnauthenticated, msg)
	}
	if !slices.ContainsFunc(st.Audiences, func(s string) bool { return slices.Contains(auds, s) }) {
		return nil, fmt.Errorf("%w: token audiences %v, want one of %v", ErrUnauthenticated, st.Audiences, auds)
	}
	ns, sa, ok := parseServiceAccountUser(st.User.Username)
	if !ok {
		return nil, fmt.Errorf("%w: %q is not a service account", ErrUnauthenticated, st.User.Username)
	}
	podName, podUID := one(st.User.Extra[extraPodName]), one(st.User.Extra[extraPodUID])
	if podName == "" || podUID == "" {
		return nil, fmt.Errorf("%w: token of %s/%s is not bound to a pod", ErrUnauthenticated, ns, sa)
	}
	pod, err := a.Client.CoreV1().Pods(ns).Get(ctx, podName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("%w: bound pod %s/%s is gone", ErrUnauthenticated, ns, podName)
	}
	if err != nil {
		return nil, fmt.Errorf("get bound pod: %w", err)
	}
	name := "pod " + ns + "/" + podName
	switch {
	case string(pod.UID) != podUID:
		return nil, fmt.Errorf("%w: bound pod %s was replaced", ErrUnauthenticated, name)
	case pod.Spec.ServiceAccountName != sa:
		return nil, fmt.Errorf("%w: %s runs as %s, token is for %s", ErrUnauthenticated, name, pod.Spec.ServiceAccountName, sa)
	case pod.Spec.NodeName == "":
		return nil, fmt.Errorf("%w: %s is not scheduled", ErrUnauthenticated, name)
	}
	if n := one(st.User.Extra[extraNodeName]); n != "" && n != pod.Spec.NodeName {
		return nil, fmt.Errorf("%w: token names node %s, %s is on %s", ErrUnauthenticated, n, name, pod.Spec.NodeName)
	}
	c := &Caller{Kind: Workload, Name: name, Node: pod.Spec.NodeName}
	proxies := a.NodeProxies
	if proxies == nil {
		proxies = DefaultNodeProxies
	}
	if slices.Contains(proxies, ns+"/"+sa) {
		c.Kind = NodeProxy
		return c, nil
	}
	td := a.TrustDomain
	if td.IsZero() {
		td = identity.DefaultTrustDomain
	}
	if c.Identity, err = identity.Workload(td, ns, sa); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnauthenticated, err)
	}
	return c, nil
}

func parseServiceAccountUser(u string) (ns, sa string, ok bool) {
	rest, ok := strings.CutPrefix(u, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	ns, sa, ok = strings.Cut(rest, ":")
	return ns, sa, ok && ns != "" && sa != "" && !strings.Contains(sa, ":")
}

func one(v []string) string {
	if len(v) == 1 {
		return v[0]
	}
	return ""
}

// MinHostSecretLen is the shortest secret HostAuthenticator accepts.
const MinHostSecretLen = 16

// HostAuthenticator authenticates local-mode hosts (no cluster) by a bearer
// secret per host name. Hosts are NodeProxy callers whose node is the host
// name. Create it with NewHostAuthenticator or LoadHostCredentials.
type HostAuthenticator struct {
	hosts map[[sha256.Size]byte]string // sha256(secret) -> host; lookups by hash do not leak secret prefixes through timing
}

// NewHostAuthenticator takes host name -> secret. Secrets must be at least
// MinHostSecretLen bytes and distinct.
func NewHostAuthenticator(secrets map[string]string) (*HostAuthenticator, error) {
	a := &HostAuthenticator{hosts: make(map[[sha256.Size]byte]string, len(secrets))}
	for host, secret := range secrets {
		if host == "" {
			return nil, errors.New("host credentials: empty host name")
		}
		if len(secret) < MinHostSecretLen {
			return nil, fmt.Errorf("host credentials: secret of %s is shorter than %d bytes", host, MinHostSecretLen)
		}
		h := sha256.Sum256([]byte(secret))
		if other, dup := a.hosts[h]; dup {
			return nil, fmt.Errorf("host credentials: %s and %s share a secret", host, other)
		}
		a.hosts[h] = host
	}
	return a, nil
}

// LoadHostCredentials reads a file of "<host> <secret>" lines (blank lines
// and lines starting with # are ignored).
func LoadHostCredentials(path string) (*HostAuthenticator, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("host credentials: %w", err)
	}
	secrets := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("host credentials: %s:%d: want \"<host> <secret>\"", path, n)
		}
		if _, dup := secrets[f[0]]; dup {
			return nil, fmt.Errorf("host credentials: %s:%d: host %s listed twice", path, n, f[0])
		}
		secrets[f[0]] = f[1]
	}
	return NewHostAuthenticator(secrets)
}

// Authenticate implements Authenticator.
func (a *HostAuthenticator) Authenticate(_ context.Context, token string) (*Caller, error) {
	host, ok := a.hosts[sha256.Sum256([]byte(token))]
	if !ok || token == "" {
		return nil, fmt.Errorf("%w: unknown host credential", ErrUnauthenticated)
	}
	return &Caller{Kind: NodeProxy, Name: "host " + host, Node: host}, nil
}
