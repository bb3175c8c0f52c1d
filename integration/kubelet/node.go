package kubelet

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

// Version is the kubelet version a registered Node reports (the
// control plane's: integration/kube.DefaultVersion).
const Version = "v1.36.3"

// LeaseDuration is the duration of a registered node's Lease, and
// LeaseRenewInterval how often the kubelet renews it (a kubelet's
// defaults: 40s, a quarter of it).
const (
	LeaseDuration      = 40 * time.Second
	LeaseRenewInterval = 10 * time.Second
	// StatusInterval is how often the Node's conditions are refreshed
	// (their heartbeat time) when nothing changed.
	StatusInterval = time.Minute
)

// defaultCapacity is a registered node's capacity when Kubelet.Capacity is
// nil.
func defaultCapacity() corev1.ResourceList {
	return corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("8"),
		corev1.ResourceMemory:           resource.MustParse("16Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
}

// register creates (or takes over) the Node object: capacity, addresses,
// the kubelet API's port, Ready.
func (k *Kubelet) register(ctx context.Context, apiPort int) error {
	nodes := k.Client.CoreV1().Nodes()
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: k.Node.Name,
			Labels: map[string]string{
				corev1.LabelHostname:   k.Node.Name,
				corev1.LabelOSStable:   "linux",
				corev1.LabelArchStable: "amd64",
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: k.Node.PodCIDR.String(), PodCIDRs: []string{k.Node.PodCIDR.String()}},
	}
	cur, err := nodes.Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		cur, err = nodes.Get(ctx, k.Node.Name, metav1.GetOptions{})
	}
	if err != nil {
		return fmt.Errorf("kubelet: register node %s: %w", k.Node.Name, err)
	}
	k.nodeUID = cur.UID
	k.apiPort = apiPort
	return k.updateNodeStatus(ctx)
}

// updateNodeStatus writes the Node's status: capacity, addresses, daemon
// endpoint, node info, and conditions whose heartbeat is now (again on a
// conflict: the control plane writes the Node too).
func (k *Kubelet) updateNodeStatus(ctx context.Context) error {
	return retry.RetryOnConflict(retry.DefaultBackoff, func() error { return k.tryUpdateNodeStatus(ctx) })
}

func (k *Kubelet) tryUpdateNodeStatus(ctx context.Context) error {
	nodes := k.Client.CoreV1().Nodes()
	cur, err := nodes.Get(ctx, k.Node.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("kubelet: node %s: %w", k.Node.Name, err)
	}
	capacity := k.Capacity
	if capacity == nil {
		capacity = defaultCapacity()
	}
	now := metav1.Now()
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		c := corev1.NodeCondition{Type: t, Status: s, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
		for _, old := range cur.Status.Conditions {
			if old.Type == t && old.Status == s {
				c.LastTransitionTime = old.LastTransitionTime
			}
		}
		return c
	}
	st := cur.DeepCopy()
	st.Status.Capacity = capacity
	st.Status.Allocatable = capacity
	st.Status.Phase = corev1.NodeRunning
	st.Status.Conditions = []corev1.NodeCondition{
		cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
		cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
		cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
		cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "kubelet is posting ready status"),
	}
	// The pods' host address is the node's underlay address; the control
	// plane reaches the kubelet API on localhost (the API server prefers
	// Hostname: integration/kube).
	st.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: k.Node.IP.String()},
		{Type: corev1.NodeHostName, Address: "localhost"},
	}
	st.Status.DaemonEndpoints.KubeletEndpoint.Port = int32(k.apiPort)
	st.Status.NodeInfo = corev1.NodeSystemInfo{
		MachineID: k.Node.Name, SystemUUID: string(k.nodeUID), BootID: string(k.nodeUID),
		KernelVersion: "ambit", OSImage: "ambit integration harness", ContainerRuntimeVersion: "ambit://" + Version,
		KubeletVersion: Version, OperatingSystem: "linux", Architecture: "amd64",
	}
	if _, err := nodes.UpdateStatus(ctx, st, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("kubelet: node %s status: %w", k.Node.Name, err)
	}
	return nil
}

// renewLease creates or renews the node's Lease in kube-node-lease (owned
// by the Node, as a kubelet's), again on a conflict.
func (k *Kubelet) renewLease(ctx context.Context) error {
	return retry.RetryOnConflict(retry.DefaultBackoff, func() error { return k.tryRenewLease(ctx) })
}

func (k *Kubelet) tryRenewLease(ctx context.Context) error {
	leases := k.Client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	cur, err := leases.Get(ctx, k.Node.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: k.Node.Name, OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "v1", Kind: "Node", Name: k.Node.Name, UID: k.nodeUID,
			}}},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       new(k.Node.Name),
				LeaseDurationSeconds: new(int32(LeaseDuration / time.Second)),
				RenewTime:            &now,
			},
		}, metav1.CreateOptions{})
	} else if err == nil {
		cur.Spec.HolderIdentity = new(k.Node.Name)
		cur.Spec.LeaseDurationSeconds = new(int32(LeaseDuration / time.Second))
		cur.Spec.RenewTime = &now
		_, err = leases.Update(ctx, cur, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("kubelet: lease of %s: %w", k.Node.Name, err)
	}
	return nil
}

// heartbeat renews the Lease every LeaseRenewInterval and refreshes the
// Node's status every StatusInterval until ctx ends.
func (k *Kubelet) heartbeat(ctx context.Context, log *slog.Logger) {
	lease := time.NewTicker(LeaseRenewInterval)
	defer lease.Stop()
	status := time.NewTicker(StatusInterval)
	defer status.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-lease.C:
			if err := k.renewLease(ctx); err != nil && ctx.Err() == nil {
				log.Error("lease", "err", err)
			}
		case <-status.C:
			if err := k.updateNodeStatus(ctx); err != nil && ctx.Err() == nil {
				log.Error("node status", "err", err)
			}
		}
	}
}
