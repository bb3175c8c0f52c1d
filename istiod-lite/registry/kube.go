package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

// Gateway API resources read.
var (
	GatewaysResource   = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}
	HTTPRoutesResource = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "httproutes"}
	GRPCRoutesResource = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "grpcroutes"}
	// DestinationRulesResource is Istio's networking.istio.io/v1.
	DestinationRulesResource = schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1", Resource: "destinationrules"}
)

// Kubernetes builds the model from a cluster through shared informers:
// Namespaces, Pods, Services, EndpointSlices, Nodes (their labels only: a
// node labelled ambit.dev/hbone-quic=enabled advertises QUIC for its pods),
// and, when their CRDs are
// installed, Gateways, HTTPRoutes, GRPCRoutes, DestinationRules,
// AuthorizationPolicies and PeerAuthentications. It publishes the first model once every informer has
// synced, then incremental updates. While the API server is unreachable the
// informers keep their caches, so the model stays as it was; when it returns
// they re-list and only real differences reach the model.
//
// Rejected objects are reported as Warning Events on them (component
// istiod-lite).
type Kubernetes struct {
	Client  kubernetes.Interface
	Dynamic dynamic.Interface
	Store   *model.Store
	Options translate.Options
	Logger  *slog.Logger // may be nil
	// Reporter, when set, replaces the Events (tests).
	Reporter Reporter

	once   sync.Once
	synced chan struct{} // closed after the first model is published
	b      *builder
}

// Synced is closed when the first model, built from synced caches, is in
// the store.
func (k *Kubernetes) Synced() <-chan struct{} {
	k.once.Do(func() { k.synced = make(chan struct{}) })
	return k.synced
}

// stripManagedFields saves memory: managedFields are never read.
func stripManagedFields(obj any) (any, error) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

// slimNode keeps of a Node only what translation reads: its name and
// labels (a node's status, images and conditions are large and change
// often; an update that leaves the labels alone changes nothing).
func slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown
	}
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion, Labels: n.Labels}}, nil
}

// Start runs the informers and the builder until ctx ends.
func (k *Kubernetes) Start(ctx context.Context) error {
	log := k.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	k.Synced()
	rep := k.Reporter
	var broadcaster record.EventBroadcaster
	if rep == nil {
		broadcaster = record.NewBroadcaster(record.WithContext(ctx))
		broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: k.Client.CoreV1().Events("")})
		defer broadcaster.Shutdown()
		rep = &eventReporter{rec: broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "istiod-lite"}), k: k}
	}
	k.b = newBuilder(k.Store, k.Options, log, rep)
	k.b.published = k.synced

	f := informers.NewSharedInformerFactoryWithOptions(k.Client, 0, informers.WithTransform(stripManagedFields))
	var syncs []cache.InformerSynced
	add := func(inf cache.SharedIndexInformer, zero any, conv func(any) (any, error)) error {
		_ = inf.SetTransform(stripManagedFields) // fails only once started; the typed factory sets it itself
		_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { k.set(log, obj, conv) },
			UpdateFunc: func(_, obj any) { k.set(log, obj, conv) },
			DeleteFunc: func(obj any) {
				key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
				if err == nil {
					k.b.del(zero, key)
				}
			},
		})
		syncs = append(syncs, inf.HasSynced)
		return err
	}
	typed := func(obj any) (any, error) { return obj, nil }
	for _, e := range []struct {
		inf  cache.SharedIndexInformer
		zero any
	}{
		{f.Core().V1().Namespaces().Informer(), &corev1.Namespace{}},
		{f.Core().V1().Pods().Informer(), &corev1.Pod{}},
		{f.Core().V1().Services().Informer(), &corev1.Service{}},
		{f.Discovery().V1().EndpointSlices().Informer(), &discoveryv1.EndpointSlice{}},
	} {
		if err := add(e.inf, e.zero, typed); err != nil {
			return fmt.Errorf("kubernetes: %w", err)
		}
	}
	nodes := f.Core().V1().Nodes().Informer()
	if err := add(nodes, &corev1.Node{}, typed); err != nil {
		return fmt.Errorf("kubernetes: %w", err)
	}
	_ = nodes.SetTransform(slimNode) // after add's; before the factory starts
	df := dynamicinformer.NewDynamicSharedInformerFactory(k.Dynamic, 0)
	for _, e := range []struct {
		gvr  schema.GroupVersionResource
		zero any
		new  func() any
	}{
		{GatewaysResource, &gwv1.Gateway{}, func() any { return &gwv1.Gateway{} }},
		{HTTPRoutesResource, &gwv1.HTTPRoute{}, func() any { return &gwv1.HTTPRoute{} }},
		{GRPCRoutesResource, &gwv1.GRPCRoute{}, func() any { return &gwv1.GRPCRoute{} }},
		{DestinationRulesResource, &networkingv1.DestinationRule{}, func() any { return &networkingv1.DestinationRule{} }},
		{security.AuthorizationPolicies, &security.AuthorizationPolicy{}, func() any { return &security.AuthorizationPolicy{} }},
		{security.PeerAuthentications, &security.PeerAuthentication{}, func() any { return &security.PeerAuthentication{} }},
	} {
		if ok, err := k.served(e.gvr); err != nil {
			return fmt.Errorf("kubernetes: discovery of %s: %w", e.gvr, err)
		} else if !ok {
			log.Warn("resource not served (CRD not installed?); not watched", "resource", e.gvr.String())
			continue
		}
		newObj := e.new
		conv := func(obj any) (any, error) {
			u, ok := obj.(*unstructured.Unstructured)
			if !ok {
				return nil, fmt.Errorf("unexpected %T", obj)
			}
			out := newObj()
			if _, isProto := out.(*networkingv1.DestinationRule); isProto {
				// Istio's types decode their protobuf specs with their own
				// UnmarshalJSON: go through JSON.
				b, err := json.Marshal(u.Object)
				if err != nil {
					return nil, err
				}
				if err := json.Unmarshal(b, out); err != nil {
					return nil, err
				}
				return out, nil
			}
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, out); err != nil {
				return nil, err
			}
			return out, nil
		}
		if err := add(df.ForResource(e.gvr).Informer(), e.zero, conv); err != nil {
			return fmt.Errorf("kubernetes: %w", err)
		}
	}
	f.Start(ctx.Done())
	df.Start(ctx.Done())
	defer f.Shutdown()
	defer df.Shutdown()

	ready := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); k.b.run(ctx, ready) }()
	if !cache.WaitForCacheSync(ctx.Done(), syncs...) {
		<-done
		return nil // ctx ended
	}
	log.Info("informers synced")
	close(ready)
	<-done
	return nil
}

// served reports whether the API server serves gvr.
func (k *Kubernetes) served(gvr schema.GroupVersionResource) (bool, error) {
	list, err := k.Client.Discovery().ServerResourcesForGroupVersion(gvr.GroupVersion().String())
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	for _, r := range list.APIResources {
		if r.Name == gvr.Resource {
			return true, nil
		}
	}
	return false, nil
}

func (k *Kubernetes) set(log *slog.Logger, obj any, conv func(any) (any, error)) {
	typed, err := conv(obj)
	if err != nil {
		m, _ := meta.Accessor(obj)
		kind := fmt.Sprintf("%T", obj)
		if u, ok := obj.(*unstructured.Unstructured); ok {
			kind = u.GetKind()
		}
		p := translate.Problem{Kind: kind, Reason: "InvalidObject", Message: err.Error()}
		if m != nil {
			p.Namespace, p.Name = m.GetNamespace(), m.GetName()
		}
		log.Warn("object does not decode; ignored", "kind", p.Kind, "namespace", p.Namespace, "name", p.Name, "error", err)
		k.b.report.Report(p)
		return
	}
	k.b.set(typed)
}

// eventReporter records a Warning Event on the object of each problem.
type eventReporter struct {
	rec record.EventRecorder
	k   *Kubernetes
}

func (r *eventReporter) Report(p translate.Problem) {
	ref := &corev1.ObjectReference{Kind: p.Kind, Namespace: p.Namespace, Name: p.Name}
	key := translate.Key(p.Namespace, p.Name)
	r.k.b.lookup(func(o *translate.Objects) {
		switch p.Kind {
		case "Pod":
			if x := o.Pods[key]; x != nil {
				ref.UID, ref.APIVersion, ref.ResourceVersion = x.UID, "v1", x.ResourceVersion
			}
		case "Service":
			if x := o.Services[key]; x != nil {
				ref.UID, ref.APIVersion, ref.ResourceVersion = x.UID, "v1", x.ResourceVersion
			}
		case "HTTPRoute":
			if x := o.HTTPRoutes[key]; x != nil {
				ref.UID, ref.APIVersion, ref.ResourceVersion = x.UID, "gateway.networking.k8s.io/v1", x.ResourceVersion
			}
		case "GRPCRoute":
			if x := o.GRPCRoutes[key]; x != nil {
				ref.UID, ref.APIVersion, ref.ResourceVersion = x.UID, "gateway.networking.k8s.io/v1", x.ResourceVersion
			}
		case translate.KindDestinationRule:
			if x := o.DestinationRules[key]; x != nil {
				ref.UID, ref.APIVersion, ref.ResourceVersion = x.UID, "networking.istio.io/v1", x.ResourceVersion
			}
		case security.KindAuthorizationPolicy:
			if x := o.AuthorizationPolicies[key]; x != nil {
				ref.UID, ref.APIVersion, ref.ResourceVersion = x.UID, "security.istio.io/v1", x.ResourceVersion
			}
		case security.KindPeerAuthentication:
			if x := o.PeerAuthentications[key]; x != nil {
				ref.UID, ref.APIVersion, ref.ResourceVersion = x.UID, "security.istio.io/v1", x.ResourceVersion
			}
		}
	})
	r.rec.Event(ref, corev1.EventTypeWarning, p.Reason, p.Message)
}
