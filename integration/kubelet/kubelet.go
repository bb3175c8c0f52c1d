// Package kubelet is the integration harness's stand-in for a kubelet and a
// CNI plugin: for one simulated node it watches the Pods bound to that node
// (spec.nodeName), gives each a network namespace and a veth with an address
// from the node's pod CIDR, runs the pod's workload (ambit's echo app on
// every declared container port) inside it, and writes the pod's status
// (podIP, Running, Ready). When the Pod is deleted it removes all of it.
//
// A container whose image is in Images runs that binary instead, as a
// process in the pod's namespace (env, $(VAR) expansion, emptyDir, configMap
// and projected token volumes; restarted when it exits; Ready once its HTTP
// readiness probe passes): that is how ambit's own images (the waypoint) run
// here. A pod annotated app.ambit.dev/protocol=http runs the app's HTTP mode
// (package app).
//
// A pod's start follows a CNI's order: its network and address exist and are
// published (podIP, not yet Ready) before Prepare runs and before its
// workload starts, so a mesh can capture it before its first packet. Pods
// with hostNetwork (ztunnel) get the node's address and run nothing, unless
// RunHostNetwork: then their mapped images run in the node's namespace.
//
// By default a mapped image's volume paths are rewritten in its arguments
// and env. With MountVolumes a pod gets a mount namespace instead, where the
// volumes (emptyDir, configMap, secret, projected token/configMap/secret/
// downward API, hostPath seen through HostPaths) are bind-mounted at their
// mountPaths, so manifests run unchanged (in-cluster clients find
// /var/run/secrets/kubernetes.io/serviceaccount). ServiceProxy stands in
// for kube-proxy: cluster IPs answer on every node and relay to ready
// endpoints, default/kubernetes to the API server, and containers get
// KUBERNETES_SERVICE_HOST/PORT. With
// PodHostnames every other pod also gets a UTS namespace of its own whose
// host name is the pod's name, which its processes (and exec'd commands)
// share.
//
// With a control plane (integration/kube with ControllerManager and
// Scheduler) the kubelet is a node of the cluster: Register creates its Node
// (capacity, Ready, the kubelet API's endpoint) and keeps its Lease and
// conditions fresh, so the scheduler binds pods to it. TLS serves the
// kubelet API the API server proxies to (pods/exec with or without a TTY,
// pods/portforward, pods/log), for clients with a verified certificate whom
// a SubjectAccessReview allows nodes/proxy.
package kubelet

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// Kubelet runs one node's pods. Client and Node are required.
type Kubelet struct {
	Client kubernetes.Interface
	Node   *netns.Node
	// Prepare, when set, runs after a pod's network exists and its podIP is
	// published, and before its workload starts: the moment a CNI plugin
	// (and ambit's capture) acts. An error removes the pod's network again;
	// the pod is retried on the next resync.
	Prepare func(ctx context.Context, pod *corev1.Pod, p *netns.Pod) error
	// Logger; nil discards.
	Logger *slog.Logger

	// Images maps container images to binaries on this machine; a
	// container of such an image runs the binary (see the package doc).
	// An image mapped to a directory runs the program there that the
	// container's command[0] names (ambit's image: "/istiod-lite" runs
	// <dir>/istiod-lite). Commands exec'd in the container find the
	// image's other programs on PATH, and arguments and env values that
	// name a file of the image (/cert.crt, --key=/cert.key) name it in
	// that directory.
	Images map[string]string
	// Entrypoints are the programs (relative to their directory in Images)
	// that images mapped to a directory run when a container names no
	// command: the images' ENTRYPOINTs.
	Entrypoints map[string]string
	// Token mints a projected serviceAccountToken volume's token for pod
	// (its service account, audience, bound to the pod). Default: a
	// TokenRequest with Client, bound to the pod, valid for an hour.
	Token func(ctx context.Context, pod *corev1.Pod, audience string) (string, error)
	// WorkDir receives image-run pods' volumes and logs (default: a
	// directory under os.TempDir()).
	WorkDir string
	// RestartDelay is the wait before an exited process starts again
	// (default 1s).
	RestartDelay time.Duration

	// Register makes the kubelet a node of the cluster: it creates the Node
	// named Node.Name (Capacity, addresses, Ready, the API's port), renews
	// its Lease in kube-node-lease every LeaseRenewInterval and refreshes
	// its conditions every StatusInterval.
	Register bool
	// Capacity is the registered Node's capacity and allocatable
	// (default: 8 CPUs, 16Gi memory, 110 pods, 100Gi ephemeral storage).
	Capacity corev1.ResourceList
	// TLS, when set, serves the kubelet API on APIAddress: the server's
	// certificate, and the client CAs it requires certificates from
	// (integration/kube's Cluster.KubeletTLS).
	TLS *tls.Config
	// APIAddress is where the kubelet API listens, in the test's own
	// network namespace, where the API server runs (default
	// 127.0.0.1:0). A registered Node publishes its port and the address
	// "localhost".
	APIAddress string
	// PodHostnames gives every pod (but hostNetwork ones) a UTS namespace
	// of its own whose host name is the pod's name, shared by its
	// processes and exec'd commands. Off, they share the machine's.
	PodHostnames bool
	// ClusterDNS serves the cluster's DNS on the node's address, port 53,
	// for Services (<service>.<namespace>.svc.cluster.local: the
	// ClusterIP), and gives every pod (but hostNetwork ones) a mount
	// namespace of its own in which /etc/resolv.conf names it (with a
	// kubelet's search path) and /etc/hosts the pod.
	ClusterDNS bool

	// MountVolumes gives every pod that runs a container from Images
	// (hostNetwork ones too) a mount namespace of its own, as a container
	// runtime does: each container's volumes are bind-mounted at their
	// mountPaths and the programs see the paths the manifest names (no
	// rewriting). The image's directory is mounted there too, under
	// /run/ambit-mnt/.image. Mount points missing on the machine are created
	// there as empty directories (a mount namespace isolates mounts, not
	// files); a volume may not be mounted at /, /run or /var/run.
	MountVolumes bool
	// HostPaths is this node's view of the machine's files: a hostPath
	// volume at or under a key is this directory (created if missing)
	// instead. The nodes share one kernel and one file system: e.g.
	// /sys/fs/bpf -> a per-node directory of the bpffs, so that each node's
	// ztunnel pins its own capture. Other hostPaths are the machine's.
	HostPaths map[string]string
	// RunHostNetwork runs hostNetwork pods' containers of Images as
	// processes in the node's network namespace (a DaemonSet's ztunnel).
	// Off, hostNetwork pods run nothing.
	RunHostNetwork bool
	// ServiceProxy is kube-proxy (userspace mode) on this node: every
	// Service's cluster IP is an address of the node's services' network
	// namespace (<node>-svc, routed from the node: ServiceCIDR), where a
	// relay takes TCP connections to one of its ready endpoints, the API server's
	// included (default/kubernetes: APIServer). Containers get
	// KUBERNETES_SERVICE_HOST and _PORT (the cluster IP of
	// default/kubernetes) as a kubelet injects them.
	ServiceProxy bool
	// SecurityContext runs image-run containers with their
	// securityContext, through setpriv(1): runAsUser/runAsGroup, the
	// capability set (a runtime's default, or none after drop ALL, plus
	// add, minus drop; privileged: all), no_new_privs for
	// allowPrivilegeEscalation: false, runAsNonRoot checked, volume files
	// owned by the user, and, with MountVolumes, a read-only root file
	// system for readOnlyRootFilesystem. Seccomp profiles are not applied.
	SecurityContext bool
	// ServiceCIDR is the API server's service-cluster-ip-range, which
	// the node routes to its services' namespace (default
	// DefaultServiceCIDR).
	ServiceCIDR netip.Prefix
	// APIServer is the API server's host:port, dialled from the
	// kubelet's own network namespace, where default/kubernetes leads
	// (default: the host of Client's REST config).
	APIServer string

	nodeUID types.UID // the registered Node's; set before the pod loop starts
	apiPort int       // the kubelet API's port (0 without TLS); set before the pod loop starts

	mu       sync.Mutex // guards pods
	pods     map[string]*running
	stopping sync.WaitGroup // deleted pods terminating
}

// running is a started pod.
type running struct {
	podRef
	containers []string                  // the pod's container names
	specs      map[string]*containerSpec // image-run containers, by name
	net        *netns.Pod                // nil for hostNetwork pods
	uts        string                    // the pinned UTS namespace, "" unless PodHostnames
	mnt        string                    // the pinned mount namespace, "" unless ClusterDNS or MountVolumes
	images     bool                      // mnt holds the volumes and images (MountVolumes)
	logs       []*os.File                // in-process workloads' container logs
	servers    []*app.Server
	https      []*app.HTTP
	procs      []*proc
	done       sync.WaitGroup
	stopped    chan struct{} // closed by teardown
	// terminating: deleted, its processes are stopping (guarded by
	// Kubelet.mu).
	terminating bool
	stopOnce    sync.Once
}

func newRunning(pod *corev1.Pod) *running {
	r := &running{
		podRef:  podRef{key: pod.Namespace + "/" + pod.Name, name: pod.Name, uid: pod.UID},
		specs:   map[string]*containerSpec{},
		stopped: make(chan struct{}),
	}
	for _, c := range pod.Spec.Containers {
		r.containers = append(r.containers, c.Name)
	}
	return r
}

// Start watches and runs the node's pods until ctx ends, then tears every pod
// down. It blocks.
func (k *Kubelet) Start(ctx context.Context) error {
	if k.Client == nil || k.Node == nil {
		return errors.New("kubelet: Client and Node are required")
	}
	log := k.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("node", k.Node.Name)
	k.mu.Lock()
	k.pods = map[string]*running{}
	k.mu.Unlock()

	var bg sync.WaitGroup
	defer bg.Wait()
	bgCtx, stopBg := context.WithCancel(ctx)
	defer stopBg()
	if k.TLS != nil {
		addr := k.APIAddress
		if addr == "" {
			addr = "127.0.0.1:0"
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("kubelet: api: %w", err)
		}
		k.apiPort = ln.Addr().(*net.TCPAddr).Port
		bg.Add(1)
		go func() {
			defer bg.Done()
			if err := k.serveAPI(bgCtx, ln, log); err != nil {
				log.Error("kubelet api", "err", err)
			}
		}()
	}
	if k.ClusterDNS {
		bg.Add(1)
		if err := k.startDNS(bgCtx, log, bg.Done); err != nil {
			bg.Done()
			return err
		}
	}
	if k.ServiceProxy {
		bg.Add(1)
		if err := k.startProxy(bgCtx, log, bg.Done); err != nil {
			bg.Done()
			return err
		}
	}
	if k.Register {
		if err := k.register(ctx, k.apiPort); err != nil {
			return err
		}
		if err := k.renewLease(ctx); err != nil {
			return err
		}
		bg.Add(1)
		go func() {
			defer bg.Done()
			k.heartbeat(bgCtx, log)
		}()
	}

	factory := informers.NewSharedInformerFactoryWithOptions(k.Client, 30*time.Second,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.Node.Name).String()
		}))
	inf := factory.Core().V1().Pods().Informer()
	queue := make(chan string, 1024)
	enqueue := func(obj any) {
		key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
		if err == nil {
			select {
			case queue <- key:
			case <-ctx.Done():
			}
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, n any) { enqueue(n) },
		DeleteFunc: enqueue,
	}); err != nil {
		return fmt.Errorf("kubelet: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	defer k.stopping.Wait()
	defer k.stopAll(log)
	defer stopBg() // the API and heartbeat end before the pods are torn down
	for {
		select {
		case <-ctx.Done():
			return nil
		case key := <-queue:
			obj, exists, err := inf.GetStore().GetByKey(key)
			if err != nil {
				log.Error("pod lookup", "pod", key, "err", err)
				continue
			}
			if !exists {
				k.stop(key, log, 3*time.Second)
				continue
			}
			pod := obj.(*corev1.Pod)
			if pod.DeletionTimestamp != nil {
				// As a kubelet: SIGTERM, SIGKILL after the grace period,
				// then the API object goes (the loop goes on meanwhile).
				if k.terminating(key) {
					k.stopping.Add(1)
					go func() {
						defer k.stopping.Done()
						k.stop(key, log, gracePeriod(pod))
						k.finalize(ctx, pod, log)
					}()
				}
				continue
			}
			if err := k.ensure(ctx, key, pod, log); err != nil {
				log.Error("pod start", "pod", key, "err", err)
				time.AfterFunc(time.Second, func() { enqueue(pod) }) // e.g. a ConfigMap not there yet
			}
		}
	}
}

func (k *Kubelet) ensure(ctx context.Context, key string, pod *corev1.Pod, log *slog.Logger) error {
	k.mu.Lock()
	r := k.pods[key]
	k.mu.Unlock()
	if r != nil {
		return nil
	}
	images := slices.ContainsFunc(pod.Spec.Containers, func(c corev1.Container) bool { _, ok := k.Images[c.Image]; return ok })
	hostNet := pod.Spec.HostNetwork
	if hostNet && (!k.RunHostNetwork || !images) {
		k.mu.Lock()
		k.pods[key] = newRunning(pod)
		k.mu.Unlock()
		return k.setStatus(ctx, pod, k.Node.IP.String(), true)
	}
	// An image-run container's volumes first: one that cannot be made yet
	// (a ConfigMap not there) is retried before any network or status
	// exists, whose writes would wake this loop again at once.
	dir := filepath.Join(k.workDir(), pod.Namespace+"."+pod.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	vols := map[string]map[string]string{} // container -> mountPath -> directory
	for _, c := range pod.Spec.Containers {
		if _, ok := k.Images[c.Image]; ok {
			v, err := k.volumes(ctx, pod, c, dir)
			if err != nil {
				return fmt.Errorf("container %s: %w", c.Name, err)
			}
			if k.SecurityContext {
				if err := chownVolumes(pod, c, v); err != nil {
					return fmt.Errorf("container %s: %w", c.Name, err)
				}
			}
			vols[c.Name] = v
		}
	}
	r = newRunning(pod)
	var pn podNet
	nsName := k.Node.NS.Name + "-" + pod.Namespace + "." + pod.Name
	if hostNet {
		pn = podNet{ns: k.Node.NS, ip: k.Node.IP}
	} else {
		p, err := k.Node.AddPod(pod.Namespace + "." + pod.Name)
		if err != nil {
			return err
		}
		r.net = p
		pn = podNet{ns: p.NS, ip: p.IP}
		nsName = p.NS.Name
	}
	if k.PodHostnames && !hostNet {
		r.uts = filepath.Join(utsDir, nsName)
		if err := newUTS(r.uts, pod.Name); err != nil {
			r.uts = ""
			k.teardown(r)
			return err
		}
	}
	mountVolumes := k.MountVolumes && images
	if k.ClusterDNS || mountVolumes {
		r.mnt = filepath.Join(mntDir, nsName)
		var binds []bindMount
		if mountVolumes {
			binds = k.podBinds(pod, r.mnt, vols)
		}
		if err := k.newMountNS(r.mnt, dir, pod, pn.ip, binds, mountVolumes && k.SecurityContext && k.readOnlyRoot(pod)); err != nil {
			r.mnt = ""
			k.teardown(r)
			return err
		}
		r.images = mountVolumes
	}
	if err := k.setStatus(ctx, pod, pn.ip.String(), false); err != nil {
		k.teardown(r)
		return err
	}
	if k.Prepare != nil && r.net != nil {
		if err := k.Prepare(ctx, pod, r.net); err != nil {
			k.teardown(r)
			return fmt.Errorf("prepare: %w", err)
		}
	}
	p := r.net
	ran := false
	for _, c := range pod.Spec.Containers {
		if _, ok := k.Images[c.Image]; ok {
			inImage := ""
			if r.images {
				inImage = imageDir(r.mnt, c.Name)
			}
			spec, err := k.resolve(ctx, pod, pn, c, dir, inImage)
			if err != nil {
				k.teardown(r)
				return fmt.Errorf("container %s: %w", c.Name, err)
			}
			spec.uts, spec.mnt = r.uts, r.mnt
			if k.SecurityContext {
				if spec.setpriv, err = setprivArgs(pod, c); err != nil {
					k.teardown(r)
					return err
				}
			}
			r.specs[c.Name] = spec
			r.procs = append(r.procs, k.startProc(pod, pn, pod.Namespace+"."+pod.Name+"."+c.Name, spec, dir, log))
			ran = true
			continue
		}
		if hostNet {
			continue // the node's own processes: nothing of the harness's to run
		}
		h, err := app.HTTPFromAnnotations(pod.Name, pod.Annotations)
		if err != nil {
			k.teardown(r)
			return err
		}
		// The in-process workload's log is its container's (kubectl logs).
		lf, err := os.OpenFile(k.LogFile(key, c.Name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			k.teardown(r)
			return err
		}
		r.logs = append(r.logs, lf)
		clog := slog.New(slog.NewTextHandler(lf, &slog.HandlerOptions{Level: slog.LevelDebug}))
		for _, port := range c.Ports {
			if port.Protocol != "" && port.Protocol != corev1.ProtocolTCP {
				continue
			}
			ln, err := p.NS.Listen(ctx, nil, "tcp", fmt.Sprintf(":%d", port.ContainerPort))
			if err != nil {
				k.teardown(r)
				return fmt.Errorf("listen on %d: %w", port.ContainerPort, err)
			}
			var serve func(net.Listener) error
			if h != nil {
				hs := &app.HTTP{Name: h.Name, FailRatio: h.FailRatio, Delay: h.Delay, Logger: clog}
				r.https = append(r.https, hs)
				serve = hs.Serve
				clog.Info("serving HTTP", "pod", pod.Name, "port", port.ContainerPort)
			} else {
				s := &app.Server{Name: pod.Name, Logger: clog}
				r.servers = append(r.servers, s)
				serve = s.Serve
				clog.Info("serving echo", "pod", pod.Name, "port", port.ContainerPort)
			}
			r.done.Add(1)
			go func() {
				defer r.done.Done()
				if err := serve(ln); err != nil {
					log.Error("app", "pod", key, "err", err)
				}
			}()
		}
	}
	k.mu.Lock()
	k.pods[key] = r
	k.mu.Unlock()
	if ran {
		log.Info("pod started; ready when its probe passes", "pod", key, "ip", pn.ip.String())
		return nil // the process supervisor publishes readiness
	}
	if err := k.setStatus(ctx, pod, pn.ip.String(), true); err != nil {
		return err
	}
	log.Info("pod running", "pod", key, "ip", pn.ip.String())
	return nil
}

// podNet is where a pod's processes run: its network namespace and
// address (a hostNetwork pod's: the node's).
type podNet struct {
	ns *netns.NS
	ip netip.Addr
}

// podBinds are the bind mounts of pod's mount namespace (pinned at mnt):
// each image-run container's volumes at their mountPaths and its image's
// directory at imageDir.
func (k *Kubelet) podBinds(pod *corev1.Pod, mnt string, vols map[string]map[string]string) []bindMount {
	var binds []bindMount
	for _, c := range pod.Spec.Containers {
		bin, ok := k.Images[c.Image]
		if !ok {
			continue
		}
		if st, err := os.Stat(bin); err == nil && !st.IsDir() {
			bin = filepath.Dir(bin)
		}
		binds = append(binds, bindMount{src: bin, dst: imageDir(mnt, c.Name), readOnly: true})
		for _, m := range c.VolumeMounts {
			if src, ok := vols[c.Name][m.MountPath]; ok {
				binds = append(binds, bindMount{src: src, dst: m.MountPath, readOnly: m.ReadOnly})
			}
		}
	}
	return binds
}

// setStatus publishes the pod's address, Running, and its readiness.
func (k *Kubelet) setStatus(ctx context.Context, pod *corev1.Pod, ip string, ready bool) error {
	cur, err := k.Client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get pod: %w", err)
	}
	now := metav1.Now()
	cond := corev1.ConditionFalse
	if ready {
		cond = corev1.ConditionTrue
	}
	st := cur.DeepCopy()
	st.Status.Phase = corev1.PodRunning
	st.Status.PodIP = ip
	st.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	st.Status.HostIP = k.Node.IP.String()
	st.Status.HostIPs = []corev1.HostIP{{IP: k.Node.IP.String()}}
	if st.Status.StartTime == nil {
		st.Status.StartTime = &now
	}
	// Conditions others own (PodScheduled) stay.
	for _, c := range []corev1.PodCondition{
		{Type: corev1.PodReadyToStartContainers, Status: corev1.ConditionTrue},
		{Type: corev1.PodInitialized, Status: corev1.ConditionTrue},
		{Type: corev1.ContainersReady, Status: cond},
		{Type: corev1.PodReady, Status: cond},
	} {
		c.LastTransitionTime = now
		i := slices.IndexFunc(st.Status.Conditions, func(o corev1.PodCondition) bool { return o.Type == c.Type })
		switch {
		case i < 0:
			st.Status.Conditions = append(st.Status.Conditions, c)
		case st.Status.Conditions[i].Status != c.Status:
			st.Status.Conditions[i] = c
		}
	}
	// Every container runs since the pod started, ready with the pod.
	st.Status.ContainerStatuses = nil
	for _, c := range pod.Spec.Containers {
		st.Status.ContainerStatuses = append(st.Status.ContainerStatuses, corev1.ContainerStatus{
			Name:        c.Name,
			Image:       c.Image,
			ImageID:     "ambit://" + c.Image,
			ContainerID: "ambit://" + pod.Namespace + "." + pod.Name + "." + c.Name,
			Ready:       ready,
			Started:     new(true),
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: *st.Status.StartTime}},
		})
	}
	if _, err := k.Client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, st, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update status: %w", err)
	}
	return nil
}

// stop tears the pod key down (its processes get grace after SIGTERM); it
// stays in Pod's view until it is gone.
func (k *Kubelet) stop(key string, log *slog.Logger, grace time.Duration) {
	k.mu.Lock()
	r := k.pods[key]
	k.mu.Unlock()
	if r == nil {
		return
	}
	r.stopOnce.Do(func() {
		k.teardownGrace(r, grace)
		log.Info("pod removed", "pod", key)
	})
	k.mu.Lock()
	if k.pods[key] == r {
		delete(k.pods, key)
	}
	k.mu.Unlock()
}

// terminating marks the running pod key as terminating; false when it is
// not running or already terminating.
func (k *Kubelet) terminating(key string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	r := k.pods[key]
	if r == nil || r.terminating {
		return false
	}
	r.terminating = true
	return true
}

// gracePeriod is the time a deleted pod's processes get between SIGTERM
// and SIGKILL: the deletion's grace period, else the pod's, else
// Kubernetes' default of 30s.
func gracePeriod(pod *corev1.Pod) time.Duration {
	switch {
	case pod.DeletionGracePeriodSeconds != nil:
		return time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	case pod.Spec.TerminationGracePeriodSeconds != nil:
		return time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	}
	return 30 * time.Second
}

// finalize deletes the terminated pod's API object (grace period 0), as a
// kubelet does once its containers are gone.
func (k *Kubelet) finalize(ctx context.Context, pod *corev1.Pod, log *slog.Logger) {
	err := k.Client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: new(int64),
		Preconditions:      &metav1.Preconditions{UID: &pod.UID},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) && ctx.Err() == nil {
		log.Error("pod delete", "pod", pod.Namespace+"/"+pod.Name, "err", err)
	}
}

func (k *Kubelet) teardown(r *running) { k.teardownGrace(r, 3*time.Second) }

func (k *Kubelet) teardownGrace(r *running, grace time.Duration) {
	for _, pr := range r.procs {
		pr.stop(grace)
	}
	for _, s := range r.servers {
		s.Close()
	}
	for _, s := range r.https {
		s.Close()
	}
	r.done.Wait()
	for _, f := range r.logs {
		f.Close()
	}
	if r.uts != "" {
		removeUTS(r.uts)
	}
	if r.mnt != "" {
		removeMountNS(r.mnt)
		if r.images {
			removeImageDirs(r.mnt)
		}
	}
	if r.net != nil {
		k.Node.RemovePod(r.net)
	}
	close(r.stopped)
}

func (k *Kubelet) stopAll(log *slog.Logger) {
	k.mu.Lock()
	keys := make([]string, 0, len(k.pods))
	for key := range k.pods {
		keys = append(keys, key)
	}
	k.mu.Unlock()
	for _, key := range keys {
		k.stop(key, log, 3*time.Second)
	}
}

// Pod returns the network of a running pod ("namespace/name"), or nil.
func (k *Kubelet) Pod(key string) *netns.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	if r := k.pods[key]; r != nil {
		return r.net
	}
	return nil
}

func (k *Kubelet) workDir() string {
	if k.WorkDir != "" {
		return k.WorkDir
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("ambit-kubelet-%d-%s", os.Getpid(), k.Node.Name))
}

// Kill ends the processes of the pod ("namespace/name") with SIGKILL, as a
// crash: they start again after RestartDelay. It returns how many it killed.
func (k *Kubelet) Kill(key string) int {
	k.mu.Lock()
	r := k.pods[key]
	k.mu.Unlock()
	n := 0
	if r != nil {
		for _, pr := range r.procs {
			if pr.kill() {
				n++
			}
		}
	}
	return n
}

// LogFile is the log of container of the pod ("namespace/name") run from
// Images.
func (k *Kubelet) LogFile(key, container string) string {
	ns, name, _ := strings.Cut(key, "/")
	return filepath.Join(k.workDir(), ns+"."+name, ns+"."+name+"."+container+".log")
}
