package ca

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/ambit-mesh/ambit/model"
)

// Workloads answers node authorization's question: is a workload running as
// namespace/serviceAccount scheduled on node?
type Workloads interface {
	OnNode(ctx context.Context, node, namespace, serviceAccount string) (bool, error)
}

// PodIndex answers Workloads from a pod informer indexed by spec.nodeName,
// with a live List as the fallback when the cache says no.
//
// Why both: certificate requests come in bursts (a node starting asks for
// every identity on it, every node renews twice a day per identity), so
// answering from a watch cache keeps the API server out of the hot path. But
// the cache lags: a pod that was just scheduled may not be in it yet, and a
// ztunnel asks for its identity right then. A "no" from the cache is
// therefore confirmed with a List (fieldSelector spec.nodeName, one
// namespace) before it becomes a denial; denials are rare, so that costs
// little. A "yes" for a pod deleted a moment ago is possible for as long as
// the watch lags, which is no worse than the pod's own still-valid
// certificate.
//
// The istiod-lite service account needs list and watch on pods.
type PodIndex struct {
	// Client talks to the API server (required).
	Client kubernetes.Interface
	// Logger (discard if nil).
	Logger *slog.Logger

	mu        sync.Mutex // guards indexer and synced
	indexer   cache.Indexer
	synced    bool
	initOnce  sync.Once
	ready     chan struct{} // closed once the cache has synced
	readyOnce sync.Once
}

const nodeIndex = "spec.nodeName"

func (p *PodIndex) init() {
	p.initOnce.Do(func() { p.ready = make(chan struct{}) })
}

// Start runs the informer until ctx is done (controller-runtime style: it
// blocks). Until its cache has synced, OnNode asks the API server directly.
// Call it once.
func (p *PodIndex) Start(ctx context.Context) error {
	p.init()
	log := p.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	factory := informers.NewSharedInformerFactoryWithOptions(p.Client, 0)
	inf := factory.Core().V1().Pods().Informer()
	// Keep only what authorization reads.
	if err := inf.SetTransform(slimPod); err != nil {
		return fmt.Errorf("pod index: %w", err)
	}
	if err := inf.AddIndexers(cache.Indexers{nodeIndex: func(obj any) ([]string, error) {
		pod, ok := obj.(*corev1.Pod)
		if !ok || pod.Spec.NodeName == "" {
			return nil, nil
		}
		return []string{pod.Spec.NodeName}, nil
	}}); err != nil {
		return fmt.Errorf("pod index: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		inf.RunWithContext(ctx)
	}()
	if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		p.mu.Lock()
		p.indexer, p.synced = inf.GetIndexer(), true
		p.mu.Unlock()
		p.readyOnce.Do(func() { close(p.ready) })
		log.Info("pod index synced", "pods", len(inf.GetIndexer().ListKeys()))
	}
	<-done
	if err := ctx.Err(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// Ready is closed once the cache has synced.
func (p *PodIndex) Ready() <-chan struct{} {
	p.init()
	return p.ready
}

func slimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // tombstones
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, ResourceVersion: pod.ResourceVersion},
		Spec:       corev1.PodSpec{NodeName: pod.Spec.NodeName, ServiceAccountName: pod.Spec.ServiceAccountName},
		Status:     corev1.PodStatus{Phase: pod.Status.Phase},
	}, nil
}

// OnNode implements Workloads.
func (p *PodIndex) OnNode(ctx context.Context, node, namespace, serviceAccount string) (bool, error) {
	if node == "" {
		return false, nil
	}
	p.mu.Lock()
	idx, synced := p.indexer, p.synced
	p.mu.Unlock()
	if synced {
		objs, err := idx.ByIndex(nodeIndex, node)
		if err != nil {
			return false, fmt.Errorf("pod index: %w", err)
		}
		for _, o := range objs {
			if podMatches(o.(*corev1.Pod), namespace, serviceAccount) {
				return true, nil
			}
		}
	}
	list, err := p.Client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(),
	})
	if err != nil {
		return false, fmt.Errorf("list pods on %s: %w", node, err)
	}
	for i := range list.Items {
		if podMatches(&list.Items[i], namespace, serviceAccount) {
			return true, nil
		}
	}
	return false, nil
}

func podMatches(pod *corev1.Pod, namespace, serviceAccount string) bool {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return pod.Namespace == namespace && sa == serviceAccount &&
		pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed
}

// StoreWorkloads answers Workloads from the model, for local mode: a host
// may obtain the identities of the workloads whose Node is that host.
type StoreWorkloads struct {
	Store *model.Store // required
}

// OnNode implements Workloads.
func (s StoreWorkloads) OnNode(_ context.Context, node, namespace, serviceAccount string) (bool, error) {
	if node == "" {
		return false, nil
	}
	for _, w := range s.Store.Load().Workloads {
		sa := w.ServiceAccount
		if sa == "" {
			sa = "default"
		}
		if w.Node == node && w.Namespace == namespace && sa == serviceAccount {
			return true, nil
		}
	}
	return false, nil
}
