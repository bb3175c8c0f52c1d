package deployer

import (
	"maps"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	appsv1ac "k8s.io/client-go/applyconfigurations/apps/v1"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/model"
)

// Labels and values on the objects the deployer owns (Istio's).
const (
	GatewayNameLabel  = "gateway.networking.k8s.io/gateway-name"
	ManagedLabel      = "gateway.istio.io/managed"
	ManagedValue      = "istio.io-mesh-controller"
	DataplaneModeKey  = "istio.io/dataplane-mode"
	TokenAudience     = "istio-ca"
	TokenDir          = "/var/run/secrets/tokens"
	TokenFile         = TokenDir + "/istio-token"
	CARootDir         = "/var/run/secrets/ambit-ca-root"
	CARootKey         = "root-cert.pem"
	proxyContainer    = "istio-proxy" // Istio's name; tools look for it
	proxyUID          = 1337
	tokenExpirySecs   = 43200
	terminationGraceS = 30 // the waypoint drains 5s (--drain-duration), then in-flight requests get up to 20s (--drain-timeout)
)

// objects builds the apply configurations of a waypoint Gateway's
// ServiceAccount, Deployment and Service: a pure function of the Gateway
// and the Config.
type objects struct {
	cfg *Config
	gw  *gwv1.Gateway
}

func (o objects) owner() *metav1ac.OwnerReferenceApplyConfiguration {
	return metav1ac.OwnerReference().
		WithAPIVersion(gwv1.GroupVersion.String()).
		WithKind("Gateway").
		WithName(o.gw.Name).
		WithUID(o.gw.UID).
		WithController(true)
}

// labels are the owned objects' labels: the Gateway's infrastructure
// labels, then the deployer's own (which win).
func (o objects) labels() map[string]string {
	l := map[string]string{}
	if inf := o.gw.Spec.Infrastructure; inf != nil {
		for k, v := range inf.Labels {
			l[string(k)] = string(v)
		}
	}
	l[GatewayNameLabel] = o.gw.Name
	l[ManagedLabel] = ManagedValue
	return l
}

func (o objects) annotations() map[string]string {
	a := map[string]string{}
	if inf := o.gw.Spec.Infrastructure; inf != nil {
		for k, v := range inf.Annotations {
			a[string(k)] = string(v)
		}
	}
	return a
}

// quic reports whether the Gateway asks for HBONE over QUIC:
// model.LabelHBONEQUIC is "enabled" among its labels or annotations, or its
// infrastructure's.
func (o objects) quic() bool {
	const key, on = model.LabelHBONEQUIC, "enabled"
	if o.gw.Labels[key] == on || o.gw.Annotations[key] == on {
		return true
	}
	inf := o.gw.Spec.Infrastructure
	return inf != nil && (inf.Labels[key] == on || inf.Annotations[key] == on)
}

func (o objects) serviceAccount() *corev1ac.ServiceAccountApplyConfiguration {
	sa := corev1ac.ServiceAccount(o.gw.Name, o.gw.Namespace).
		WithLabels(o.labels()).
		WithOwnerReferences(o.owner())
	if a := o.annotations(); len(a) > 0 {
		sa.WithAnnotations(a)
	}
	return sa
}

// RootConfigMapName is the name of the copy of istiod-lite's CA roots a
// waypoint mounts (a pod can mount only ConfigMaps of its namespace).
func RootConfigMapName(gateway string) string { return gateway + "-ca-root" }

// rootConfigMap is the waypoint's copy of istiod-lite's CA roots (PEM).
func (o objects) rootConfigMap(roots string) *corev1ac.ConfigMapApplyConfiguration {
	cm := corev1ac.ConfigMap(RootConfigMapName(o.gw.Name), o.gw.Namespace).
		WithLabels(o.labels()).
		WithOwnerReferences(o.owner()).
		WithData(map[string]string{CARootKey: roots})
	if a := o.annotations(); len(a) > 0 {
		cm.WithAnnotations(a)
	}
	return cm
}

func (o objects) service() *corev1ac.ServiceApplyConfiguration {
	svc := corev1ac.Service(o.gw.Name, o.gw.Namespace).
		WithLabels(o.labels()).
		WithOwnerReferences(o.owner()).
		WithSpec(corev1ac.ServiceSpec().
			WithType(corev1.ServiceTypeClusterIP).
			WithSelector(map[string]string{GatewayNameLabel: o.gw.Name}).
			WithPorts(
				corev1ac.ServicePort().WithName("mesh").WithProtocol(corev1.ProtocolTCP).
					WithPort(MeshPort).WithTargetPort(intstr.FromInt32(MeshPort)),
				corev1ac.ServicePort().WithName("status-port").WithProtocol(corev1.ProtocolTCP).
					WithPort(StatusPort).WithTargetPort(intstr.FromInt32(StatusPort)),
			))
	if a := o.annotations(); len(a) > 0 {
		svc.WithAnnotations(a)
	}
	return svc
}

func (o objects) deployment() *appsv1ac.DeploymentApplyConfiguration {
	c := o.cfg
	podLabels := o.labels()
	podLabels[DataplaneModeKey] = "none"
	podLabels["sidecar.istio.io/inject"] = "false"
	podLabels["service.istio.io/canonical-name"] = o.gw.Name
	podLabels["service.istio.io/canonical-revision"] = "latest"
	// The pod advertises QUIC exactly when it serves it (--hbone-quic):
	// its own label decides over its namespace's and node's.
	quic := o.quic()
	podLabels[model.LabelHBONEQUIC] = "disabled"
	if quic {
		podLabels[model.LabelHBONEQUIC] = "enabled"
	}
	podAnnotations := o.annotations()
	maps.Copy(podAnnotations, map[string]string{
		"prometheus.io/scrape": "true",
		"prometheus.io/port":   "15020",
		"prometheus.io/path":   "/stats/prometheus",
	})

	fieldEnv := func(name, path string) *corev1ac.EnvVarApplyConfiguration {
		return corev1ac.EnvVar().WithName(name).WithValueFrom(corev1ac.EnvVarSource().
			WithFieldRef(corev1ac.ObjectFieldSelector().WithAPIVersion("v1").WithFieldPath(path)))
	}
	env := []*corev1ac.EnvVarApplyConfiguration{
		corev1ac.EnvVar().WithName("XDS_ADDRESS").WithValue(c.XDSAddress),
		corev1ac.EnvVar().WithName("CA_ADDRESS").WithValue(c.XDSAddress),
		corev1ac.EnvVar().WithName("CA_ROOTS").WithValue(CARootDir + "/" + CARootKey),
		corev1ac.EnvVar().WithName("TOKEN_FILE").WithValue(TokenFile),
		corev1ac.EnvVar().WithName("TRUST_DOMAIN").WithValue(c.TrustDomain),
		corev1ac.EnvVar().WithName("GATEWAY_NAME").WithValue(o.gw.Name),
		fieldEnv("POD_NAME", "metadata.name"),
		fieldEnv("POD_NAMESPACE", "metadata.namespace"),
		fieldEnv("NODE_NAME", "spec.nodeName"),
		fieldEnv("INSTANCE_IP", "status.podIP"),
		fieldEnv("SERVICE_ACCOUNT", "spec.serviceAccountName"),
	}
	if c.SPIRESocketDir != "" {
		env = append(env,
			corev1ac.EnvVar().WithName("IDENTITY").WithValue("spire"),
			corev1ac.EnvVar().WithName("SPIRE_SOCKET").WithValue(c.SPIRESocketDir+"/agent.sock"))
	}

	container := corev1ac.Container().
		WithName(proxyContainer).
		WithImage(c.Image).
		WithImagePullPolicy(corev1.PullIfNotPresent).
		WithCommand(c.Command...).
		WithEnv(env...).
		WithPorts(
			corev1ac.ContainerPort().WithName("mesh").WithContainerPort(MeshPort).WithProtocol(corev1.ProtocolTCP),
			corev1ac.ContainerPort().WithName("metrics").WithContainerPort(MetricsPort).WithProtocol(corev1.ProtocolTCP),
			corev1ac.ContainerPort().WithName("status-port").WithContainerPort(StatusPort).WithProtocol(corev1.ProtocolTCP),
		).
		WithReadinessProbe(corev1ac.Probe().
			WithHTTPGet(corev1ac.HTTPGetAction().WithPath("/healthz/ready").
				WithPort(intstr.FromInt32(StatusPort)).WithScheme(corev1.URISchemeHTTP)).
			WithPeriodSeconds(5).WithTimeoutSeconds(1).WithFailureThreshold(4).WithSuccessThreshold(1)).
		WithResources(corev1ac.ResourceRequirements().
			WithRequests(corev1.ResourceList{
				corev1.ResourceCPU:    resource.MustParse("100m"),
				corev1.ResourceMemory: resource.MustParse("128Mi"),
			}).
			WithLimits(corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Gi")})).
		WithSecurityContext(corev1ac.SecurityContext().
			WithAllowPrivilegeEscalation(false).
			WithPrivileged(false).
			WithReadOnlyRootFilesystem(true).
			WithRunAsNonRoot(true).
			WithRunAsUser(proxyUID).
			WithRunAsGroup(proxyUID).
			WithCapabilities(corev1ac.Capabilities().WithDrop("ALL"))).
		WithVolumeMounts(
			corev1ac.VolumeMount().WithName("istio-token").WithMountPath(TokenDir).WithReadOnly(true),
			corev1ac.VolumeMount().WithName("ambit-ca-root").WithMountPath(CARootDir).WithReadOnly(true),
			corev1ac.VolumeMount().WithName("tmp").WithMountPath("/tmp"),
		)

	if quic {
		container.WithArgs("--hbone-quic").
			WithPorts(corev1ac.ContainerPort().WithName("mesh-quic").WithContainerPort(MeshPort).WithProtocol(corev1.ProtocolUDP))
	}
	if c.SPIRESocketDir != "" {
		container.WithVolumeMounts(corev1ac.VolumeMount().WithName("spire-agent-socket").WithMountPath(c.SPIRESocketDir).WithReadOnly(true))
	}
	pod := corev1ac.PodSpec().
		WithServiceAccountName(o.gw.Name).
		WithAutomountServiceAccountToken(false).
		WithTerminationGracePeriodSeconds(terminationGraceS).
		WithSecurityContext(corev1ac.PodSecurityContext().
			WithRunAsNonRoot(true).
			WithRunAsUser(proxyUID).
			WithRunAsGroup(proxyUID).
			WithFSGroup(proxyUID).
			WithSeccompProfile(corev1ac.SeccompProfile().WithType(corev1.SeccompProfileTypeRuntimeDefault))).
		WithContainers(container).
		WithVolumes(
			corev1ac.Volume().WithName("istio-token").WithProjected(corev1ac.ProjectedVolumeSource().
				WithSources(corev1ac.VolumeProjection().WithServiceAccountToken(
					corev1ac.ServiceAccountTokenProjection().
						WithAudience(TokenAudience).
						WithExpirationSeconds(tokenExpirySecs).
						WithPath("istio-token")))),
			// no roots yet: the pod waits (it could not trust istiod-lite)
			corev1ac.Volume().WithName("ambit-ca-root").WithConfigMap(corev1ac.ConfigMapVolumeSource().
				WithName(RootConfigMapName(o.gw.Name))),
			corev1ac.Volume().WithName("tmp").WithEmptyDir(corev1ac.EmptyDirVolumeSource()),
		)

	if c.SPIRESocketDir != "" {
		pod.WithVolumes(corev1ac.Volume().WithName("spire-agent-socket").WithHostPath(
			corev1ac.HostPathVolumeSource().WithPath(c.SPIRESocketDir).WithType(corev1.HostPathDirectory)))
	}
	d := appsv1ac.Deployment(o.gw.Name, o.gw.Namespace).
		WithLabels(o.labels()).
		WithOwnerReferences(o.owner()).
		WithSpec(appsv1ac.DeploymentSpec().
			WithSelector(metav1ac.LabelSelector().WithMatchLabels(map[string]string{GatewayNameLabel: o.gw.Name})).
			WithTemplate(corev1ac.PodTemplateSpec().
				WithLabels(podLabels).
				WithAnnotations(podAnnotations).
				WithSpec(pod)))
	if a := o.annotations(); len(a) > 0 {
		d.WithAnnotations(a)
	}
	return d
}
