// Package deployer is the waypoint deployment controller. For each Gateway
// whose class is served by istio.io/mesh-controller (istio-waypoint), it
// applies, server-side and owned by the Gateway, a ServiceAccount, a
// Deployment running the waypoint, a Service (mesh 15008, status-port
// 15021) and a copy of istiod-lite's CA roots (ConfigMap <name>-ca-root,
// which the pod mounts: it can mount only its own namespace's), re-applies them when they are edited or deleted, and writes the
// Gateway's status: Accepted, Programmed (once the Service has a cluster IP
// and the Deployment a ready replica), listener conditions with
// attachedRoutes, and status.addresses once programmed. It also accepts the
// GatewayClasses it serves (their Accepted condition).
//
// An existing object of one of those names that is not the Gateway's
// (neither controlled by it nor labelled gateway.istio.io/managed for it) is
// never written: the Gateway is then Programmed=False, reason Invalid,
// naming the object, and is looked at again every Config.ConflictRecheck.
//
// Run it only on the elected replica (istiod-lite/leader):
//
//	c := deployer.New(deployer.Config{Kube: cs, Gateway: gwcs, AttachedRoutes: routes.Count})
//	el := &leader.Elector{Client: cs, Run: c.Start}
//	err := el.Start(ctx)
//
// Writes are only those that change something: an owned object is applied
// when the fields the deployer manages differ from what it wants (so a
// converged cluster costs no writes), and the status is written, with the
// Gateway's resourceVersion as precondition, only when it changes.
package deployer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	appslisters "k8s.io/client-go/listers/apps/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gwinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"
	gwlisters "sigs.k8s.io/gateway-api/pkg/client/listers/apis/v1"
)

// Defaults of Config.
const (
	ControllerName = gwv1.GatewayController("istio.io/mesh-controller")
	WaypointClass  = "istio-waypoint"
	FieldManager   = "istiod-lite"
	DefaultImage   = "ghcr.io/ambit-mesh/ambit:latest"
	DefaultXDS     = "istiod-lite.ambit-system.svc:15012"
	DefaultDomain  = "cluster.local"
	DefaultRootNS  = "ambit-system"
	DefaultRootCM  = "ambit-ca-root"
	DefaultResync  = 10 * time.Minute
	// DefaultConflictRecheck is Config.ConflictRecheck's default.
	DefaultConflictRecheck = 30 * time.Second
	defaultWorkers         = 2
	defaultCommand         = "/waypoint"
	defaultTrustRoot       = "cluster.local"
)

// Config configures a Controller. Kube and Gateway are required; every
// other field has a default.
type Config struct {
	// Kube writes ServiceAccounts, Deployments and Services.
	Kube kubernetes.Interface
	// Gateway reads Gateways and GatewayClasses and writes Gateway status.
	Gateway gwclient.Interface

	// Image is the waypoint's container image (default DefaultImage).
	Image string
	// Command is the container's command (default ["/waypoint"]).
	Command []string
	// XDSAddress is istiod-lite's xDS and certificate address given to the
	// waypoint (default DefaultXDS).
	XDSAddress string
	// RootNamespace and RootConfigMap name the ConfigMap where istiod-lite
	// publishes its CA roots (key root-cert.pem; defaults ambit-system,
	// ambit-ca-root). Each waypoint gets a copy in its namespace,
	// <gateway>-ca-root, kept in step.
	RootNamespace, RootConfigMap string
	// TrustDomain is the mesh's SPIFFE trust domain (default cluster.local).
	TrustDomain string
	// ClusterDomain is the DNS suffix of status.addresses' hostname
	// (default cluster.local).
	ClusterDomain string
	// AttachedRoutes counts the routes attached to a waypoint (its
	// listeners' attachedRoutes). Nil: zero. Call Requeue when a count
	// changes.
	AttachedRoutes func(gwNamespace, gwName string) int32
	// Resync is the informers' resync period (default DefaultResync).
	Resync time.Duration
	// ConflictRecheck is how often a Gateway blocked by an unmanaged
	// namesake object (which the deployer does not watch) is reconciled
	// again (default DefaultConflictRecheck).
	ConflictRecheck time.Duration
	// SPIRESocketDir, when set, makes waypoints take their SVID from the
	// node's SPIRE agent (waypoint --identity=spire): this host directory,
	// holding the agent's Workload API socket agent.sock, is mounted
	// read-only at the same path.
	SPIRESocketDir string
	// Workers reconcile Gateways in parallel (default 2; one Gateway is
	// never reconciled by two at once).
	Workers int
	// Logger receives the controller's logs (nil: discard).
	Logger *slog.Logger
}

// Controller deploys waypoints. Create it with New; Start it (once at a
// time; it may be started again after Start returns, as on each term of
// leadership).
type Controller struct {
	cfg Config
	log *slog.Logger

	mu sync.Mutex // guards queue and written
	// queue is the running term's work queue (nil when not running).
	queue workqueue.TypedRateLimitingInterface[string]
	// written maps a Gateway key to its last status write.
	written map[string]*write
}

// write is a status write: the informer's echo of it is not reconciled,
// and a reconcile from a cache still older than it is put off until the
// echo arrives (it would compute from stale status and conflict).
type write struct {
	from, to string // the Gateway's resourceVersion before and after
	deferred bool   // a reconcile waits for the echo
}

// New returns a Controller for cfg, with defaults filled in.
func New(cfg Config) *Controller {
	if cfg.Image == "" {
		cfg.Image = DefaultImage
	}
	if len(cfg.Command) == 0 {
		cfg.Command = []string{defaultCommand}
	}
	if cfg.XDSAddress == "" {
		cfg.XDSAddress = DefaultXDS
	}
	if cfg.RootNamespace == "" {
		cfg.RootNamespace = DefaultRootNS
	}
	if cfg.RootConfigMap == "" {
		cfg.RootConfigMap = DefaultRootCM
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = defaultTrustRoot
	}
	if cfg.ClusterDomain == "" {
		cfg.ClusterDomain = DefaultDomain
	}
	if cfg.Resync == 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.ConflictRecheck <= 0 {
		cfg.ConflictRecheck = DefaultConflictRecheck
	}
	if cfg.Workers <= 0 {
		cfg.Workers = defaultWorkers
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Controller{cfg: cfg, log: log.With("component", "deployer"), written: map[string]*write{}}
}

// listers of one term.
type listers struct {
	gateways    gwlisters.GatewayLister
	classes     gwlisters.GatewayClassLister
	deployments appslisters.DeploymentLister
	services    corelisters.ServiceLister
	accounts    corelisters.ServiceAccountLister
	configMaps  corelisters.ConfigMapLister // the owned copies of the roots
	roots       corelisters.ConfigMapLister // the roots' source (one object)
}

// Start watches Gateways, GatewayClasses and the owned objects, and
// reconciles until ctx is done. It returns nil then, or an error if the
// caches cannot sync.
func (c *Controller) Start(ctx context.Context) error {
	if c.cfg.Kube == nil || c.cfg.Gateway == nil {
		return errors.New("deployer: Config.Kube and Config.Gateway are required")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	q := workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "waypoints"})
	c.mu.Lock()
	if c.queue != nil {
		c.mu.Unlock()
		return errors.New("deployer: already started")
	}
	c.queue = q
	clear(c.written) // another replica may have written since a past term
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.queue = nil
		c.mu.Unlock()
	}()

	gf := gwinformers.NewSharedInformerFactory(c.cfg.Gateway, c.cfg.Resync)
	kf := informers.NewSharedInformerFactoryWithOptions(c.cfg.Kube, c.cfg.Resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.LabelSelector = ManagedLabel + "=" + ManagedValue
		}))
	gwInf := gf.Gateway().V1().Gateways()
	classInf := gf.Gateway().V1().GatewayClasses()
	depInf := kf.Apps().V1().Deployments()
	svcInf := kf.Core().V1().Services()
	saInf := kf.Core().V1().ServiceAccounts()
	cmInf := kf.Core().V1().ConfigMaps()
	rf := informers.NewSharedInformerFactoryWithOptions(c.cfg.Kube, c.cfg.Resync,
		informers.WithNamespace(c.cfg.RootNamespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", c.cfg.RootConfigMap).String()
		}))
	rootInf := rf.Core().V1().ConfigMaps()
	l := listers{
		gateways: gwInf.Lister(), classes: classInf.Lister(),
		deployments: depInf.Lister(), services: svcInf.Lister(), accounts: saInf.Lister(),
		configMaps: cmInf.Lister(), roots: rootInf.Lister(),
	}

	if _, err := gwInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { c.enqueueObject(q, obj) },
		UpdateFunc: func(oldObj, newObj any) {
			o, n := oldObj.(*gwv1.Gateway), newObj.(*gwv1.Gateway)
			if c.isEcho(o, n) {
				return
			}
			c.enqueueObject(q, n)
		},
		DeleteFunc: func(obj any) {
			c.enqueueObject(q, obj)
		},
	}); err != nil {
		return fmt.Errorf("gateway handler: %w", err)
	}
	if _, err := classInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.enqueueClass(q, l, obj) },
		UpdateFunc: func(_, obj any) { c.enqueueClass(q, l, obj) },
		DeleteFunc: func(obj any) { c.enqueueClass(q, l, obj) },
	}); err != nil {
		return fmt.Errorf("gatewayclass handler: %w", err)
	}
	owned := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.enqueueOwner(q, obj) },
		UpdateFunc: func(_, obj any) { c.enqueueOwner(q, obj) },
		DeleteFunc: func(obj any) { c.enqueueOwner(q, obj) },
	}
	for _, inf := range []cache.SharedIndexInformer{depInf.Informer(), svcInf.Informer(), saInf.Informer(), cmInf.Informer()} {
		if _, err := inf.AddEventHandler(owned); err != nil {
			return fmt.Errorf("owned handler: %w", err)
		}
	}
	if _, err := rootInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.enqueueAll(q, l) },
		UpdateFunc: func(any, any) { c.enqueueAll(q, l) },
		DeleteFunc: func(any) { c.enqueueAll(q, l) },
	}); err != nil {
		return fmt.Errorf("roots handler: %w", err)
	}

	gf.Start(ctx.Done())
	kf.Start(ctx.Done())
	rf.Start(ctx.Done())
	defer func() {
		q.ShutDown()
		cancel()
		gf.Shutdown()
		kf.Shutdown()
		rf.Shutdown()
	}()
	for typ, ok := range gf.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return cacheErr(ctx, typ.String())
		}
	}
	for _, f := range []informers.SharedInformerFactory{kf, rf} {
		for typ, ok := range f.WaitForCacheSync(ctx.Done()) {
			if !ok {
				return cacheErr(ctx, typ.String())
			}
		}
	}
	c.log.Info("deploying waypoints", "workers", c.cfg.Workers)

	var wg sync.WaitGroup
	for range c.cfg.Workers {
		wg.Go(func() {
			for c.next(ctx, q, l) {
			}
		})
	}
	<-ctx.Done()
	q.ShutDown()
	wg.Wait()
	c.log.Info("stopped deploying waypoints")
	return nil
}

func cacheErr(ctx context.Context, what string) error {
	if ctx.Err() != nil {
		return nil // stopped while syncing
	}
	return fmt.Errorf("deployer: %s cache did not sync", what)
}

// Requeue asks for a Gateway's reconciliation (e.g. when its attached
// routes changed). It does nothing while the Controller is not running.
func (c *Controller) Requeue(namespace, name string) {
	c.mu.Lock()
	q := c.queue
	c.mu.Unlock()
	if q != nil {
		q.Add(namespace + "/" + name)
	}
}

// isEcho reports whether a Gateway update is only the informer's echo of
// this controller's own status write.
func (c *Controller) isEcho(o, n *gwv1.Gateway) bool {
	if o.Generation != n.Generation || o.ResourceVersion == n.ResourceVersion {
		return false // a spec change, or a resync
	}
	key := n.Namespace + "/" + n.Name
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.written[key]
	if w == nil || w.to != n.ResourceVersion {
		return false
	}
	if w.deferred {
		w.deferred = false
		return false
	}
	return true
}

// stale reports whether gw, from the cache, predates this controller's
// last status write to it; the reconcile is then put off to the echo.
func (c *Controller) stale(gw *gwv1.Gateway) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.written[gw.Namespace+"/"+gw.Name]
	if w == nil || w.from != gw.ResourceVersion {
		return false
	}
	w.deferred = true
	return true
}

func (c *Controller) enqueueObject(q workqueue.TypedRateLimitingInterface[string], obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		utilruntime.HandleError(err)
		return
	}
	q.Add(key)
}

// enqueueClass enqueues the Gateways of a class that changed.
func (c *Controller) enqueueClass(q workqueue.TypedRateLimitingInterface[string], l listers, obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	gc, ok := obj.(*gwv1.GatewayClass)
	if !ok {
		return
	}
	q.Add(classPrefix + gc.Name)
	gws, err := l.gateways.List(labels.Everything())
	if err != nil {
		return
	}
	for _, gw := range gws {
		if string(gw.Spec.GatewayClassName) == gc.Name {
			q.Add(gw.Namespace + "/" + gw.Name)
		}
	}
}

// enqueueAll enqueues every Gateway (the roots changed).
func (c *Controller) enqueueAll(q workqueue.TypedRateLimitingInterface[string], l listers) {
	gws, err := l.gateways.List(labels.Everything())
	if err != nil {
		return
	}
	for _, gw := range gws {
		q.Add(gw.Namespace + "/" + gw.Name)
	}
}

// enqueueOwner enqueues the Gateway controlling an owned object.
func (c *Controller) enqueueOwner(q workqueue.TypedRateLimitingInterface[string], obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	m, ok := obj.(metav1.Object)
	if !ok {
		return
	}
	if ref := metav1.GetControllerOf(m); ref != nil && ref.Kind == "Gateway" && ref.APIVersion == gwv1.GroupVersion.String() {
		q.Add(m.GetNamespace() + "/" + ref.Name)
	}
}

// next reconciles one key; it returns false when the queue is shut down.
func (c *Controller) next(ctx context.Context, q workqueue.TypedRateLimitingInterface[string], l listers) bool {
	key, quit := q.Get()
	if quit {
		return false
	}
	defer q.Done(key)
	err := c.reconcile(ctx, l, key)
	var ce *conflictError
	if errors.As(err, &ce) {
		// The namesake is not watched: look again later.
		c.log.Warn("waypoint blocked by an unmanaged object", "gateway", key, "object", ce.what)
		q.Forget(key)
		q.AddAfter(key, c.cfg.ConflictRecheck)
		return true
	}
	if err != nil {
		if ctx.Err() != nil {
			return true
		}
		c.log.Warn("reconcile waypoint", "gateway", key, "err", err, "retries", q.NumRequeues(key))
		q.AddRateLimited(key)
		return true
	}
	q.Forget(key)
	return true
}

// manages reports whether this controller serves gw's class: a
// GatewayClass of that name with controllerName istio.io/mesh-controller,
// or, with no such GatewayClass object, the built-in istio-waypoint (as
// Istio, which serves that class whether or not its object exists).
func (c *Controller) manages(l listers, gw *gwv1.Gateway) bool {
	gc, err := l.classes.Get(string(gw.Spec.GatewayClassName))
	if err != nil {
		return gw.Spec.GatewayClassName == WaypointClass
	}
	return gc.Spec.ControllerName == ControllerName
}

// reconcile converges one Gateway's owned objects and status.
func (c *Controller) reconcile(ctx context.Context, l listers, key string) error {
	if class, ok := strings.CutPrefix(key, classPrefix); ok {
		return c.reconcileClass(ctx, l, class)
	}
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	gw, err := l.gateways.Gateways(ns).Get(name)
	if apierrors.IsNotFound(err) {
		// Garbage collection deletes the owned objects.
		c.mu.Lock()
		delete(c.written, key)
		c.mu.Unlock()
		return nil
	}
	if err != nil {
		return fmt.Errorf("get gateway: %w", err)
	}
	if gw.DeletionTimestamp != nil {
		// Being deleted (e.g. foreground deletion, or a finalizer): the
		// garbage collector deletes the owned objects; re-creating them
		// would fight it.
		return nil
	}
	if c.stale(gw) {
		return nil
	}
	if !c.manages(l, gw) {
		// Not (or no longer) ours: remove what we deployed for it; its
		// status belongs to its own controller.
		return c.deleteOwned(ctx, l, gw)
	}

	v := judge(gw)
	var o observed
	if v.deploy {
		if o.conflict, err = c.conflict(ctx, l, gw); err != nil {
			return err
		}
		if o.conflict == "" {
			if o, err = c.apply(ctx, l, gw); err != nil {
				return err
			}
		}
	} else if err := c.deleteOwned(ctx, l, gw); err != nil {
		return err
	}
	if c.cfg.AttachedRoutes != nil {
		o.attached = c.cfg.AttachedRoutes(gw.Namespace, gw.Name)
	}
	if err := c.writeStatus(ctx, gw, gatewayStatus(gw, v, o, c.cfg.ClusterDomain, metav1.Now())); err != nil {
		return err
	}
	if o.conflict != "" {
		return &conflictError{what: o.conflict}
	}
	return nil
}

// conflictError reports a Gateway blocked by an unmanaged namesake (its
// status already says so).
type conflictError struct{ what string }

func (e *conflictError) Error() string { return "conflicting unmanaged object " + e.what }

// mine reports whether obj may be written for gw: controlled by it, or
// labelled as managed for it.
func mine(obj metav1.Object, gw *gwv1.Gateway) bool {
	l := obj.GetLabels()
	return controlledBy(obj, gw) || (l[ManagedLabel] == ManagedValue && l[GatewayNameLabel] == gw.Name)
}

// conflict names the first object gw would own that exists but is not
// gw's (neither controlled by it nor labelled as managed for it), or
// returns "". Such an object is never written: a Gateway named "default"
// must not take over the namespace's default ServiceAccount. The listers
// see only managed objects, so a miss (or another Gateway's object) is
// checked with a Get.
func (c *Controller) conflict(ctx context.Context, l listers, gw *gwv1.Gateway) (string, error) {
	ns := gw.Namespace
	type check struct {
		kind, name string
		cached     func(string) (metav1.Object, error)
		get        func(context.Context, string) (metav1.Object, error)
	}
	checks := []check{
		{"ServiceAccount", gw.Name,
			func(n string) (metav1.Object, error) { return l.accounts.ServiceAccounts(ns).Get(n) },
			func(ctx context.Context, n string) (metav1.Object, error) {
				return c.cfg.Kube.CoreV1().ServiceAccounts(ns).Get(ctx, n, metav1.GetOptions{})
			}},
		{"Deployment", gw.Name,
			func(n string) (metav1.Object, error) { return l.deployments.Deployments(ns).Get(n) },
			func(ctx context.Context, n string) (metav1.Object, error) {
				return c.cfg.Kube.AppsV1().Deployments(ns).Get(ctx, n, metav1.GetOptions{})
			}},
		{"Service", gw.Name,
			func(n string) (metav1.Object, error) { return l.services.Services(ns).Get(n) },
			func(ctx context.Context, n string) (metav1.Object, error) {
				return c.cfg.Kube.CoreV1().Services(ns).Get(ctx, n, metav1.GetOptions{})
			}},
		{"ConfigMap", RootConfigMapName(gw.Name),
			func(n string) (metav1.Object, error) { return l.configMaps.ConfigMaps(ns).Get(n) },
			func(ctx context.Context, n string) (metav1.Object, error) {
				return c.cfg.Kube.CoreV1().ConfigMaps(ns).Get(ctx, n, metav1.GetOptions{})
			}},
	}
	for _, ch := range checks {
		if obj, err := ch.cached(ch.name); err == nil && mine(obj, gw) {
			continue
		}
		obj, err := ch.get(ctx, ch.name)
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("get %s: %w", strings.ToLower(ch.kind), err)
		}
		if !mine(obj, gw) {
			return fmt.Sprintf("%s %s/%s", ch.kind, ns, ch.name), nil
		}
	}
	return "", nil
}

// classPrefix marks a GatewayClass's key in the queue (a colon is in no
// namespace's name).
const classPrefix = ":class:"

// reconcileClass accepts a GatewayClass served by this controller (its
// Accepted condition; other conditions are left as they are).
func (c *Controller) reconcileClass(ctx context.Context, l listers, name string) error {
	gc, err := l.classes.Get(name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("get gatewayclass: %w", err)
	}
	if gc.Spec.ControllerName != ControllerName {
		return nil
	}
	accepted := metav1.Condition{
		Type: string(gwv1.GatewayClassConditionStatusAccepted), Status: metav1.ConditionTrue,
		Reason: string(gwv1.GatewayClassReasonAccepted), Message: "Handled by istiod-lite's waypoint deployer",
		ObservedGeneration: gc.Generation,
	}
	conds := keepTimes(gc.Status.Conditions, metav1.Now(), accepted)
	st := gc.Status.DeepCopy()
	replaced := false
	for i := range st.Conditions {
		if st.Conditions[i].Type == accepted.Type {
			st.Conditions[i], replaced = conds[0], true
		}
	}
	if !replaced {
		st.Conditions = append(st.Conditions, conds[0])
	}
	if equality.Semantic.DeepEqual(gc.Status, *st) {
		return nil
	}
	upd := gc.DeepCopy()
	upd.Status = *st
	if _, err := c.cfg.Gateway.GatewayV1().GatewayClasses().UpdateStatus(ctx, upd, metav1.UpdateOptions{FieldManager: FieldManager}); err != nil {
		return fmt.Errorf("update gatewayclass status: %w", err)
	}
	c.log.Info("gatewayclass accepted", "name", name)
	return nil
}

// controlledBy reports whether obj is controlled by gw (by UID).
func controlledBy(obj metav1.Object, gw *gwv1.Gateway) bool {
	ref := metav1.GetControllerOf(obj)
	return ref != nil && ref.UID == gw.UID
}

// apply converges the owned objects, writing only those whose managed
// fields differ from the wanted ones.
func (c *Controller) apply(ctx context.Context, l listers, gw *gwv1.Gateway) (observed, error) {
	objs := objects{cfg: &c.cfg, gw: gw}
	opts := metav1.ApplyOptions{FieldManager: FieldManager, Force: true}
	var o observed

	// The roots first: the pod cannot start without them. With no roots
	// published yet, a copy made earlier is kept.
	if src, err := l.roots.ConfigMaps(c.cfg.RootNamespace).Get(c.cfg.RootConfigMap); err == nil && src.Data[CARootKey] != "" {
		cm := objs.rootConfigMap(src.Data[CARootKey])
		if have, err := l.configMaps.ConfigMaps(gw.Namespace).Get(RootConfigMapName(gw.Name)); err != nil || !sameConfigMap(have, cm) {
			if _, err := c.cfg.Kube.CoreV1().ConfigMaps(gw.Namespace).Apply(ctx, cm, opts); err != nil {
				return o, fmt.Errorf("apply root configmap: %w", err)
			}
			c.log.Info("applied", "kind", "ConfigMap", "namespace", gw.Namespace, "name", RootConfigMapName(gw.Name))
		}
	}

	sa := objs.serviceAccount()
	if have, err := l.accounts.ServiceAccounts(gw.Namespace).Get(gw.Name); err != nil || !sameServiceAccount(have, sa) {
		if _, err := c.cfg.Kube.CoreV1().ServiceAccounts(gw.Namespace).Apply(ctx, sa, opts); err != nil {
			return o, fmt.Errorf("apply service account: %w", err)
		}
		c.log.Info("applied", "kind", "ServiceAccount", "namespace", gw.Namespace, "name", gw.Name)
	}

	dep := objs.deployment()
	have, err := l.deployments.Deployments(gw.Namespace).Get(gw.Name)
	if err != nil || !sameDeployment(have, dep) {
		got, err := c.cfg.Kube.AppsV1().Deployments(gw.Namespace).Apply(ctx, dep, opts)
		if err != nil {
			return o, fmt.Errorf("apply deployment: %w", err)
		}
		c.log.Info("applied", "kind", "Deployment", "namespace", gw.Namespace, "name", gw.Name)
		have = got
	}
	o.deployment = have

	svc := objs.service()
	haveSvc, err := l.services.Services(gw.Namespace).Get(gw.Name)
	if err != nil || !sameService(haveSvc, svc) {
		got, err := c.cfg.Kube.CoreV1().Services(gw.Namespace).Apply(ctx, svc, opts)
		if err != nil {
			return o, fmt.Errorf("apply service: %w", err)
		}
		c.log.Info("applied", "kind", "Service", "namespace", gw.Namespace, "name", gw.Name)
		haveSvc = got
	}
	o.service = haveSvc
	return o, nil
}

// deleteOwned deletes the objects gw controls (UID precondition: never a
// namesake created since).
func (c *Controller) deleteOwned(ctx context.Context, l listers, gw *gwv1.Gateway) error {
	del := func(kind string, obj metav1.Object, err error, fn func(context.Context, string, metav1.DeleteOptions) error) error {
		if err != nil || !controlledBy(obj, gw) {
			return nil
		}
		uid := types.UID(obj.GetUID())
		if err := fn(ctx, obj.GetName(), metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}}); err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return fmt.Errorf("delete %s: %w", kind, err)
		}
		c.log.Info("deleted", "kind", kind, "namespace", gw.Namespace, "name", obj.GetName())
		return nil
	}
	d, err := l.deployments.Deployments(gw.Namespace).Get(gw.Name)
	if err := del("Deployment", d, err, c.cfg.Kube.AppsV1().Deployments(gw.Namespace).Delete); err != nil {
		return err
	}
	s, err := l.services.Services(gw.Namespace).Get(gw.Name)
	if err := del("Service", s, err, c.cfg.Kube.CoreV1().Services(gw.Namespace).Delete); err != nil {
		return err
	}
	cm, err := l.configMaps.ConfigMaps(gw.Namespace).Get(RootConfigMapName(gw.Name))
	if err := del("ConfigMap", cm, err, c.cfg.Kube.CoreV1().ConfigMaps(gw.Namespace).Delete); err != nil {
		return err
	}
	a, err := l.accounts.ServiceAccounts(gw.Namespace).Get(gw.Name)
	return del("ServiceAccount", a, err, c.cfg.Kube.CoreV1().ServiceAccounts(gw.Namespace).Delete)
}

// writeStatus writes st if it differs from gw's, with gw's resourceVersion
// as precondition (a stale writer gets a conflict, never overwrites).
func (c *Controller) writeStatus(ctx context.Context, gw *gwv1.Gateway, st gwv1.GatewayStatus) error {
	if statusEqual(gw.Status, st) {
		return nil
	}
	upd := gw.DeepCopy()
	upd.Status = st
	got, err := c.cfg.Gateway.GatewayV1().Gateways(gw.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{FieldManager: FieldManager})
	if err != nil {
		return fmt.Errorf("update gateway status: %w", err)
	}
	c.mu.Lock()
	c.written[gw.Namespace+"/"+gw.Name] = &write{from: gw.ResourceVersion, to: got.ResourceVersion}
	c.mu.Unlock()
	c.log.Info("gateway status", "namespace", gw.Namespace, "name", gw.Name, "programmed", conditionStatus(st.Conditions, string(gwv1.GatewayConditionProgrammed)))
	return nil
}

func conditionStatus(conds []metav1.Condition, t string) metav1.ConditionStatus {
	for _, c := range conds {
		if c.Type == t {
			return c.Status
		}
	}
	return metav1.ConditionUnknown
}
