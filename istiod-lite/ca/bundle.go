package ca

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/certs"
)

// Where istiod-lite publishes the trust bundle for ztunnels to mount (the
// counterpart of Istio's istio-ca-root-cert): ConfigMap
// ambit-system/ambit-ca-root, key root-cert.pem.
const (
	DefaultBundleConfigMap = "ambit-ca-root"
	BundleConfigMapKey     = "root-cert.pem"
)

// PublishBundle writes bundle's roots (PEM) into the ConfigMap
// namespace/name (DefaultNamespace, DefaultBundleConfigMap if empty),
// creating or updating it. istiod-lite needs get, create and update on it.
func PublishBundle(ctx context.Context, client kubernetes.Interface, namespace, name string, bundle *x509bundle.Bundle) error {
	if namespace == "" {
		namespace = DefaultNamespace
	}
	if name == "" {
		name = DefaultBundleConfigMap
	}
	data := string(certs.EncodeCertificates(bundle.X509Authorities()))
	cms := client.CoreV1().ConfigMaps(namespace)
	cm, err := cms.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: map[string]string{"app.kubernetes.io/part-of": "ambit"}},
			Data:       map[string]string{BundleConfigMapKey: data},
		}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return PublishBundle(ctx, client, namespace, name, bundle) // lost a create race: update instead
		}
	} else if err == nil && cm.Data[BundleConfigMapKey] != data {
		cm = cm.DeepCopy()
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[BundleConfigMapKey] = data
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("publish bundle to configmap %s/%s: %w", namespace, name, err)
	}
	return nil
}

// BundleFile is an x509bundle.Source backed by a PEM file (e.g. the mounted
// ambit-ca-root ConfigMap), re-read when its content changes, so a rotated
// root reaches new handshakes without a restart. The zero value with Path
// set is usable.
type BundleFile struct {
	// Path of the PEM roots (required).
	Path string
	// TrustDomain of the roots (certs.DefaultTrustDomain if zero).
	TrustDomain spiffeid.TrustDomain

	mu     sync.Mutex // guards raw and bundle
	raw    []byte
	bundle *x509bundle.Bundle
}

var _ x509bundle.Source = (*BundleFile)(nil)

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (b *BundleFile) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	own := b.TrustDomain
	if own.IsZero() {
		own = certs.DefaultTrustDomain
	}
	if td != own {
		return nil, fmt.Errorf("bundle file %s: no bundle for trust domain %s", b.Path, td)
	}
	raw, err := os.ReadFile(b.Path)
	if err != nil {
		return nil, fmt.Errorf("bundle file: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.bundle != nil && bytes.Equal(raw, b.raw) {
		return b.bundle, nil
	}
	roots, err := certs.ParseCertificates(raw)
	if err != nil {
		return nil, fmt.Errorf("bundle file %s: %w", b.Path, err)
	}
	b.raw, b.bundle = raw, x509bundle.FromX509Authorities(own, roots)
	return b.bundle, nil
}
