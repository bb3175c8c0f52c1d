package auth

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/identity"
)

// Defaults of KubeAuthenticator.
const (
	DefaultAudience  = "istio-ca"
	DefaultNamespace = identity.ControlPlaneNamespace // istiod-lite's own
)

// DefaultNodeProxies are the service accounts of ztunnels.
var DefaultNodeProxies = []string{DefaultNamespace + "/ztunnel"}

// LabelGatewayName is the pod label Gateway API implementations (Istio's
// waypoint deployments among them) set to the name of the pod's Gateway.
const LabelGatewayName = "gateway.networking.k8s.io/gateway-name"

// KubeAuthenticator verifies Kubernetes service-account tokens with a
// TokenReview. A token must be bound to a pod (TokenRequest with a pod
// boundObjectRef, as kubelet's projected tokens are) and issued for one of
// Audiences; the caller's node is the bound pod's spec.nodeName, read from the
// API server (it needs get on pods and create on tokenreviews). The kind
// of caller follows from the pod: see the package doc.
type KubeAuthenticator struct {
	// Client talks to the API server (required).
	Client kubernetes.Interface
	// Audiences the token must be issued for (default [DefaultAudience]).
	Audiences []string
	// TrustDomain of Workload and Waypoint callers' identities
	// (identity.DefaultTrustDomain if zero).
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
	if gw, ok := waypointOf(pod); ok {
		c.Kind, c.Waypoint = Waypoint, gw
	}
	return c, nil
}

// waypointOf reports the waypoint pod runs as: its Gateway label names a
// Gateway whose name is also the pod's service account (Istio's naming for
// waypoint deployments). Requiring both keeps a waypoint caller's identity
// (its service account) the one ztunnels expect from that waypoint: a pod
// that only carries the label, under another service account, is a
// Workload.
func waypointOf(pod *corev1.Pod) (WaypointRef, bool) {
	gw := pod.Labels[LabelGatewayName]
	if gw == "" || gw != pod.Spec.ServiceAccountName {
		return WaypointRef{}, false
	}
	return WaypointRef{Namespace: pod.Namespace, Name: gw}, true
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
