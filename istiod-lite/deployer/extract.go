package deployer

import (
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	appsv1ac "k8s.io/client-go/applyconfigurations/apps/v1"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
)

// The same* functions report whether the fields the deployer manages on a
// live object (its managedFields entry, extracted) are already the wanted
// ones, so that a converged object is not applied again. Any doubt (an
// extraction error) means "apply".

func sameDeployment(have *appsv1.Deployment, want *appsv1ac.DeploymentApplyConfiguration) bool {
	got, err := appsv1ac.ExtractDeployment(have, FieldManager)
	return err == nil && equality.Semantic.DeepEqual(got, want)
}

func sameService(have *corev1.Service, want *corev1ac.ServiceApplyConfiguration) bool {
	got, err := corev1ac.ExtractService(have, FieldManager)
	return err == nil && equality.Semantic.DeepEqual(got, want)
}

func sameServiceAccount(have *corev1.ServiceAccount, want *corev1ac.ServiceAccountApplyConfiguration) bool {
	got, err := corev1ac.ExtractServiceAccount(have, FieldManager)
	return err == nil && equality.Semantic.DeepEqual(got, want)
}

func sameConfigMap(have *corev1.ConfigMap, want *corev1ac.ConfigMapApplyConfiguration) bool {
	got, err := corev1ac.ExtractConfigMap(have, FieldManager)
	return err == nil && equality.Semantic.DeepEqual(got, want)
}
