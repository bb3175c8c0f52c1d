package ca

import (
	"context"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
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
