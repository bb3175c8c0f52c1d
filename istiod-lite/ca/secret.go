package ca

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/certs"
)

// DefaultSecretName is the Secret that holds the generated CA.
const DefaultSecretName = "ambit-ca"

// SecretStore keeps the CA in a Kubernetes Secret (keys ca.crt, ca.key,
// roots.pem), for certs.LoadOrCreateCA in cluster mode. istiod-lite needs get
// and create on that Secret.
type SecretStore struct {
	// Client talks to the API server (required).
	Client kubernetes.Interface
	// Namespace and Name of the Secret (DefaultNamespace, DefaultSecretName
	// if empty).
	Namespace, Name string
}

var _ certs.RootStore = SecretStore{}

func (s SecretStore) key() (string, string) {
	ns, name := s.Namespace, s.Name
	if ns == "" {
		ns = DefaultNamespace
	}
	if name == "" {
		name = DefaultSecretName
	}
	return ns, name
}

// Load implements certs.RootStore.
func (s SecretStore) Load(ctx context.Context) (*certs.Material, error) {
	ns, name := s.key()
	sec, err := s.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("secret %s/%s: %w", ns, name, certs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get secret %s/%s: %w", ns, name, err)
	}
	m := &certs.Material{Cert: sec.Data[certs.CertFileName], Key: sec.Data[certs.KeyFileName], Roots: sec.Data[certs.RootsFileName]}
	if len(m.Cert) == 0 || len(m.Key) == 0 {
		return nil, fmt.Errorf("secret %s/%s lacks %s or %s", ns, name, certs.CertFileName, certs.KeyFileName)
	}
	return m, nil
}

// Create implements certs.RootStore.
func (s SecretStore) Create(ctx context.Context, m *certs.Material) error {
	ns, name := s.key()
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/part-of": "ambit"}},
		Type:       corev1.SecretTypeOpaque,
		Data:       map[string][]byte{certs.CertFileName: m.Cert, certs.KeyFileName: m.Key, certs.RootsFileName: m.Roots},
	}
	_, err := s.Client.CoreV1().Secrets(ns).Create(ctx, sec, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("secret %s/%s: %w", ns, name, certs.ErrExists)
	}
	if err != nil {
		return fmt.Errorf("create secret %s/%s: %w", ns, name, err)
	}
	return nil
}
