// Package status writes the status translation computes, the Gateway API
// and Istio way, on the objects users wrote:
//
//   - HTTPRoute and GRPCRoute status.parents: one entry per Service parent
//     (GAMMA) with controllerName istio.io/mesh-controller, the parentRef as
//     written, conditions Accepted, ResolvedRefs (and PartiallyInvalid when
//     some rules answer 500) with Gateway API reasons and the route's
//     generation as observedGeneration. Entries of other controllers are
//     kept as they are.
//   - Service status.conditions: istio.io/WaypointBound (True, reason
//     WaypointAccepted, naming the waypoint; False when the waypoint is
//     missing, not ready or does not take service traffic), written with
//     server-side apply on the status subresource (field manager
//     istiod-lite), so that it owns that one condition and nothing else.
//   - AuthorizationPolicy status.conditions: WaypointAccepted for a policy
//     with targetRefs (a waypoint enforces it), ZtunnelAccepted for a
//     selector policy (ztunnel enforces it; False, UnsupportedValue, when it
//     does not as written: an L7 rule is dropped from an ALLOW policy and
//     widened in a DENY one), in Istio's condition format. Conditions of
//     other types are kept.
//
// The Writer watches those objects and the ones their status depends on
// (Namespaces, Gateways) with its own informers, translates them
// (translate.Build: the status is exactly translation's, for exactly the
// object generation in its cache, with every problem) at most once per
// Interval, and writes an object only when its part of the status differs
// (a converged cluster costs no writes), at a bounded rate, with the
// object's resourceVersion as precondition where the list is shared
// (routes, policies); a conflict is retried from the fresh object.
//
// Run it only on the elected replica (istiod-lite/leader), alongside the
// waypoint deployer, on the same Lease:
//
//	w := status.New(status.Config{Kube: cs, Gateway: gwcs, Dynamic: dyn, Options: opts})
//	el := &leader.Elector{Client: cs, Run: w.Start}
//	err := el.Start(ctx)
//
// Start's context is the term: when it ends, in-flight writes are
// cancelled and Start returns after its goroutines, before the Lease is
// released.
package status

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/client-go/util/workqueue"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gwinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"
	gwlisters "sigs.k8s.io/gateway-api/pkg/client/listers/apis/v1"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
)

// Defaults of Config.
const (
	DefaultQPS      = 20
	DefaultBurst    = 50
	DefaultInterval = 100 * time.Millisecond
	DefaultResync   = 10 * time.Minute
	defaultWorkers  = 2
)

// Config configures a Writer. Kube, Gateway and Dynamic are required.
type Config struct {
	// Kube reads Services and Namespaces and applies Service status.
	Kube kubernetes.Interface
	// Gateway reads Gateways, HTTPRoutes and GRPCRoutes and writes route
	// status.
	Gateway gwclient.Interface
	// Dynamic reads AuthorizationPolicies and writes their status.
	Dynamic dynamic.Interface
	// Options are translation's (the registry's: same domain suffix, root
	// namespace and trust domain).
	Options translate.Options

	// QPS and Burst bound the writes (defaults 20/s, burst 50).
	QPS   float32
	Burst int
	// Interval is the least time between two translations: changes that
	// arrive meanwhile are handled together (default 100 ms).
	Interval time.Duration
	// Resync is the informers' resync period (default 10 min): every
	// object's status is compared again (a write only if it differs).
	Resync time.Duration
	// Workers write in parallel (default 2; one object is never written by
	// two at once).
	Workers int
	// Reconciled, when set, is called after each object's status was
	// compared (wrote: a write was made), for metrics and tests.
	Reconciled func(kind, namespace, name string, wrote bool)
	// Logger receives the writer's logs (nil: discard).
	Logger *slog.Logger
}

// Writer writes statuses. Create it with New and Start it (once at a time;
// it may be started again after Start returned, as on each term of
// leadership).
type Writer struct {
	cfg Config
	log *slog.Logger

	mu   sync.Mutex // guards term
	term *term      // the running term (nil when not running)
}

// New returns a Writer for cfg, with defaults filled in.
func New(cfg Config) *Writer {
	if cfg.QPS <= 0 {
		cfg.QPS = DefaultQPS
	}
	if cfg.Burst <= 0 {
		cfg.Burst = DefaultBurst
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.Workers <= 0 {
		cfg.Workers = defaultWorkers
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Writer{cfg: cfg, log: log.With("component", "status")}
}

// Resync compares every object's status again (after the next
// translation), writing only differences. It does nothing while the
// Writer is not running.
func (w *Writer) Resync() {
	w.mu.Lock()
	t := w.term
	w.mu.Unlock()
	if t != nil {
		t.mu.Lock()
		t.all = true
		t.mu.Unlock()
		t.signal()
	}
}

// term is one run of Start: its caches, queue and write memory.
type term struct {
	w       *Writer
	q       workqueue.TypedRateLimitingInterface[ref]
	limiter flowcontrol.RateLimiter
	kick    chan struct{} // 1-buffered: translate again

	// listers, set before the workers start
	services   corelisters.ServiceLister
	httpRoutes gwlisters.HTTPRouteLister // nil when not served
	grpcRoutes gwlisters.GRPCRouteLister // nil when not served
	policies   cache.GenericLister       // nil when not served

	mu      sync.Mutex         // guards objs, touched, all
	objs    *translate.Objects // the informers' objects, for translation
	touched map[ref]bool       // objects changed since the last translation
	all     bool               // compare every object after the next translation

	wmu     sync.Mutex     // guards wants and written
	wants   map[ref]*want  // the last translation's
	written map[ref]*write // the last write of each object
}

// write is a status write: the object's resourceVersion before and after,
// and what it wrote. While the cache holds either version and the want is
// unchanged, the object is not written again: before the write's echo
// arrives that would repeat it, and after, a difference that persists is
// not this writer's to fight over (e.g. a condition another manager owns).
type write struct {
	from, to string
	want     *want
}

func (t *term) signal() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// stripManagedFields saves memory: managedFields are never read, and an
// update without them keeps the server's.
func stripManagedFields(obj any) (any, error) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

// Start watches the objects and writes their status until ctx is done. It
// returns nil then, or an error if the caches cannot sync.
func (w *Writer) Start(ctx context.Context) error {
	if w.cfg.Kube == nil || w.cfg.Gateway == nil || w.cfg.Dynamic == nil {
		return errors.New("status: Config.Kube, Config.Gateway and Config.Dynamic are required")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	t := &term{
		w: w,
		q: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[ref](),
			workqueue.TypedRateLimitingQueueConfig[ref]{Name: "status"}),
		limiter: flowcontrol.NewTokenBucketRateLimiter(w.cfg.QPS, w.cfg.Burst),
		kick:    make(chan struct{}, 1),
		objs:    translate.NewObjects(),
		touched: map[ref]bool{},
		wants:   map[ref]*want{},
		written: map[ref]*write{},
	}
	w.mu.Lock()
	if w.term != nil {
		w.mu.Unlock()
		return errors.New("status: already started")
	}
	w.term = t
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.term = nil
		w.mu.Unlock()
	}()

	kf := informers.NewSharedInformerFactoryWithOptions(w.cfg.Kube, w.cfg.Resync, informers.WithTransform(stripManagedFields))
	gf := gwinformers.NewSharedInformerFactoryWithOptions(w.cfg.Gateway, w.cfg.Resync, gwinformers.WithTransform(stripManagedFields))
	df := dynamicinformer.NewDynamicSharedInformerFactory(w.cfg.Dynamic, w.cfg.Resync)
	var syncs []cache.InformerSynced
	handle := func(inf cache.SharedIndexInformer, h cache.ResourceEventHandler) error {
		if _, err := inf.AddEventHandler(h); err != nil {
			return fmt.Errorf("status: event handler: %w", err)
		}
		syncs = append(syncs, inf.HasSynced)
		return nil
	}

	svcInf := kf.Core().V1().Services()
	t.services = svcInf.Lister()
	if err := handle(svcInf.Informer(), cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { t.set(obj, refOf(KindService, obj), true) },
		UpdateFunc: func(oldObj, newObj any) {
			o, n := oldObj.(*corev1.Service), newObj.(*corev1.Service)
			// A binding follows labels and spec; a status change (ours, or
			// another's) is only compared.
			t.set(n, refOf(KindService, n), !equality.Semantic.DeepEqual(o.Labels, n.Labels) || !equality.Semantic.DeepEqual(o.Spec, n.Spec))
		},
		DeleteFunc: func(obj any) { t.del(&corev1.Service{}, obj) },
	}); err != nil {
		return err
	}
	if err := handle(kf.Core().V1().Namespaces().Informer(), cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { t.set(obj, ref{}, true) },
		UpdateFunc: func(oldObj, newObj any) {
			t.set(newObj, ref{}, !equality.Semantic.DeepEqual(oldObj.(*corev1.Namespace).Labels, newObj.(*corev1.Namespace).Labels))
		},
		DeleteFunc: func(obj any) { t.del(&corev1.Namespace{}, obj) },
	}); err != nil {
		return err
	}

	served := func(gvr schema.GroupVersionResource) (bool, error) {
		ok, err := w.served(gvr)
		if err != nil {
			return false, fmt.Errorf("status: discovery of %s: %w", gvr, err)
		}
		if !ok {
			w.log.Warn("resource not served (CRD not installed?); not watched", "resource", gvr.String())
		}
		return ok, nil
	}
	gwGV := schema.GroupVersion{Group: gwv1.GroupName, Version: "v1"}
	if ok, err := served(gwGV.WithResource("gateways")); err != nil {
		return err
	} else if ok {
		if err := handle(gf.Gateway().V1().Gateways().Informer(), cache.ResourceEventHandlerFuncs{
			// Gateways move bindings (class, labels, addresses, Programmed).
			AddFunc:    func(obj any) { t.set(obj, ref{}, true) },
			UpdateFunc: func(_, obj any) { t.set(obj, ref{}, true) },
			DeleteFunc: func(obj any) { t.del(&gwv1.Gateway{}, obj) },
		}); err != nil {
			return err
		}
	}
	if ok, err := served(gwGV.WithResource("httproutes")); err != nil {
		return err
	} else if ok {
		inf := gf.Gateway().V1().HTTPRoutes()
		t.httpRoutes = inf.Lister()
		if err := handle(inf.Informer(), generationHandler(t, KindHTTPRoute, &gwv1.HTTPRoute{})); err != nil {
			return err
		}
	}
	if ok, err := served(gwGV.WithResource("grpcroutes")); err != nil {
		return err
	} else if ok {
		inf := gf.Gateway().V1().GRPCRoutes()
		t.grpcRoutes = inf.Lister()
		if err := handle(inf.Informer(), generationHandler(t, KindGRPCRoute, &gwv1.GRPCRoute{})); err != nil {
			return err
		}
	}
	if ok, err := served(security.AuthorizationPolicies); err != nil {
		return err
	} else if ok {
		inf := df.ForResource(security.AuthorizationPolicies)
		_ = inf.Informer().SetTransform(stripManagedFields)
		t.policies = inf.Lister()
		if err := handle(inf.Informer(), generationHandler(t, KindAuthorizationPolicy, &security.AuthorizationPolicy{})); err != nil {
			return err
		}
	}

	kf.Start(ctx.Done())
	gf.Start(ctx.Done())
	df.Start(ctx.Done())
	defer func() {
		t.q.ShutDown()
		cancel()
		kf.Shutdown()
		gf.Shutdown()
		df.Shutdown()
	}()
	if !cache.WaitForCacheSync(ctx.Done(), syncs...) {
		return nil // ctx ended
	}
	w.log.Info("writing status", "workers", w.cfg.Workers)

	var wg sync.WaitGroup
	wg.Go(func() { t.translateLoop(ctx) })
	for range w.cfg.Workers {
		wg.Go(func() {
			for t.next(ctx) {
			}
		})
	}
	t.signal() // the first translation, of the synced caches
	<-ctx.Done()
	t.q.ShutDown()
	wg.Wait()
	w.log.Info("stopped writing status")
	return nil
}

// served reports whether the API server serves gvr.
func (w *Writer) served(gvr schema.GroupVersionResource) (bool, error) {
	list, err := w.cfg.Kube.Discovery().ServerResourcesForGroupVersion(gvr.GroupVersion().String())
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

// generationHandler handles a route's or policy's events: a new generation
// (or a new or deleted object) is translated again; any other update (a
// status write, ours or another's; metadata) is only compared.
func generationHandler(t *term, kind string, zero any) cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { t.set(obj, refOf(kind, obj), true) },
		UpdateFunc: func(oldObj, newObj any) {
			o, errO := meta.Accessor(oldObj)
			n, errN := meta.Accessor(newObj)
			if errO != nil || errN != nil {
				return
			}
			t.set(newObj, refOf(kind, newObj), o.GetGeneration() != n.GetGeneration())
		},
		DeleteFunc: func(obj any) { t.del(zero, obj) },
	}
}

func refOf(kind string, obj any) ref {
	m, err := meta.Accessor(obj)
	if err != nil {
		return ref{}
	}
	return ref{Kind: kind, Namespace: m.GetNamespace(), Name: m.GetName()}
}

// set records an added or updated object. retranslate asks for a
// translation (which compares the object after it); otherwise the object
// is compared with the last translation's want at once.
func (t *term) set(obj any, r ref, retranslate bool) {
	typed := obj
	if u, ok := obj.(*unstructured.Unstructured); ok {
		ap := &security.AuthorizationPolicy{}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, ap); err != nil {
			// The registry reports it (a Warning Event); no status.
			t.w.log.Debug("object does not decode; no status", "namespace", u.GetNamespace(), "name", u.GetName(), "err", err)
			return
		}
		typed = ap
	}
	t.mu.Lock()
	t.objs.Set(typed)
	if retranslate && r.Kind != "" {
		t.touched[r] = true
	}
	t.mu.Unlock()
	if retranslate {
		t.signal()
	} else if r.Kind != "" {
		t.q.Add(r)
	}
}

// del records a deleted object.
func (t *term) del(zero, obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		utilruntime.HandleError(err)
		return
	}
	t.mu.Lock()
	t.objs.Delete(zero, key)
	t.mu.Unlock()
	t.signal()
}

// translateLoop translates on each signal, at most once per Interval, and
// queues the objects whose want changed or that changed themselves.
func (t *term) translateLoop(ctx context.Context) {
	opts := t.w.cfg.Options
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.kick:
		}
		start := time.Now()
		t.mu.Lock()
		r := translate.Build(t.objs, opts)
		wants := desired(t.objs, r, opts)
		touched, all := t.touched, t.all
		t.touched, t.all = map[ref]bool{}, false
		t.mu.Unlock()

		t.wmu.Lock()
		old := t.wants
		t.wants = wants
		for k := range t.written {
			if wants[k] == nil {
				delete(t.written, k) // the object is gone
			}
		}
		t.wmu.Unlock()
		n := 0
		for k, w := range wants {
			if all || touched[k] || !reflect.DeepEqual(old[k], w) {
				t.q.Add(k)
				n++
			}
		}
		t.w.log.Debug("translated", "objects", len(wants), "queued", n, "took", time.Since(start).Round(time.Microsecond))

		timer := time.NewTimer(t.w.cfg.Interval)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
	}
}

// next writes one object's status; it returns false when the queue is
// shut down.
func (t *term) next(ctx context.Context) bool {
	k, quit := t.q.Get()
	if quit {
		return false
	}
	defer t.q.Done(k)
	wrote, err := t.reconcile(ctx, k)
	if cb := t.w.cfg.Reconciled; cb != nil && err == nil {
		cb(k.Kind, k.Namespace, k.Name, wrote)
	}
	if err != nil {
		if ctx.Err() != nil {
			return true
		}
		if apierrors.IsConflict(err) {
			// The cache is behind: retried from the fresh object.
			t.w.log.Debug("status conflict; retrying", "object", k.String())
		} else {
			t.w.log.Warn("write status", "object", k.String(), "err", err, "retries", t.q.NumRequeues(k))
		}
		t.q.AddRateLimited(k)
		return true
	}
	t.q.Forget(k)
	return true
}

// reconcile compares one object's status with its want and writes the
// difference.
func (t *term) reconcile(ctx context.Context, k ref) (bool, error) {
	t.wmu.Lock()
	w := t.wants[k]
	t.wmu.Unlock()
	if w == nil {
		return false, nil // gone, or not translated yet
	}
	switch k.Kind {
	case KindHTTPRoute:
		return t.writeHTTPRoute(ctx, k, w)
	case KindGRPCRoute:
		return t.writeGRPCRoute(ctx, k, w)
	case KindService:
		return t.writeService(ctx, k, w)
	case KindAuthorizationPolicy:
		return t.writePolicy(ctx, k, w)
	}
	return false, nil
}

// skip reports whether an object at resourceVersion rv was already written
// for w (see write).
func (t *term) skip(k ref, rv string, w *want) bool {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	last := t.written[k]
	return last != nil && (rv == last.from || rv == last.to) && reflect.DeepEqual(last.want, w)
}

// wrote records a write.
func (t *term) wrote(k ref, from, to string, w *want) {
	t.wmu.Lock()
	t.written[k] = &write{from: from, to: to, want: w}
	t.wmu.Unlock()
}
