package kubelet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// DefaultServiceCIDR is the API server's service-cluster-ip-range in
// integration/kube, Kubelet.ServiceCIDR's default.
var DefaultServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")

// The link between a node and its services' namespace: proxyLink on the
// node (proxyNodeAddr), eth0 in the services' namespace (proxySvcAddr).
const (
	proxyLink     = "ksvc0"
	proxyNodeAddr = "169.254.96.1"
	proxySvcAddr  = "169.254.96.2"
)

// serviceProxy is kube-proxy in its userspace mode, for one node: every
// TCP port of every Service with a cluster IP is a listener on that IP in a
// network namespace of the node's services (<node>-svc, where the node
// routes the service CIDR), which relays each connection to one of the
// Service's ready endpoints, dialled from the node's namespace. Pods reach
// it through their default route (the node), hostNetwork processes by the
// node's route. The listeners are not in the node's own namespace, where
// they would hold ports a node's process needs on every address (a
// waypoint Service's 15008 and ztunnel's).
// default/kubernetes goes to the API server (Kubelet.APIServer), dialled
// from the kubelet's own network namespace, where the API server runs (its
// endpoints cannot name a loopback address). There is no netfilter here (no iptables or nft on the machine), and
// a DNAT would rewrite the destination that ambit's capture keeps.
type serviceProxy struct {
	k      *Kubelet
	svc    *netns.NS // the services' namespace
	log    *slog.Logger
	slices discoverylisters.EndpointSliceLister
	next   atomic.Uint64 // round robin over endpoints

	mu        sync.Mutex // guards listeners
	listeners map[string]*proxyListener
	failed    map[string]bool // Service ports that could not listen, logged once (the sync loop's)
	wg        sync.WaitGroup  // listeners' accept loops and relays
}

// proxyListener serves one Service port.
type proxyListener struct {
	ns, name, port string // the Service and its port's name
	ln             net.Listener
}

// startProxy syncs Services and EndpointSlices, then keeps the listeners in
// step until ctx ends; done is called when everything stopped.
func (k *Kubelet) startProxy(ctx context.Context, log *slog.Logger, done func()) error {
	cidr := k.ServiceCIDR
	if !cidr.IsValid() {
		cidr = DefaultServiceCIDR
	}
	svcNS, err := netns.New(k.Node.NS.Name + "-svc")
	if err != nil {
		return fmt.Errorf("kubelet: service proxy: %w", err)
	}
	err = k.Node.NS.IP(fmt.Sprintf("link add %s type veth peer name eth0 netns %s\nlink set %s up\naddr add %s/30 dev %s\nroute add %s via %s dev %s",
		proxyLink, svcNS.Name, proxyLink, proxyNodeAddr, proxyLink, cidr, proxySvcAddr, proxyLink))
	if err == nil {
		err = svcNS.IP(fmt.Sprintf("addr add %s/30 dev eth0\nlink set eth0 up\nroute add default via %s dev eth0", proxySvcAddr, proxyNodeAddr))
	}
	if err != nil {
		svcNS.Delete()
		return fmt.Errorf("kubelet: service proxy: %w", err)
	}
	factory := informers.NewSharedInformerFactory(k.Client, 0)
	svcs := factory.Core().V1().Services()
	eps := factory.Discovery().V1().EndpointSlices()
	p := &serviceProxy{k: k, svc: svcNS, log: log, slices: eps.Lister(), listeners: map[string]*proxyListener{}, failed: map[string]bool{}}
	kick := make(chan struct{}, 1)
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { poke(kick) },
		UpdateFunc: func(_, _ any) { poke(kick) },
		DeleteFunc: func(any) { poke(kick) },
	}
	if _, err := svcs.Informer().AddEventHandler(h); err != nil {
		return fmt.Errorf("kubelet: service proxy: %w", err)
	}
	eps.Informer()
	factory.Start(ctx.Done())
	for _, ok := range factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			factory.Shutdown()
			svcNS.Delete()
			return errors.New("kubelet: service proxy: informers not synced")
		}
	}
	lister := svcs.Lister()
	p.sync(ctx, lister)
	go func() {
		defer done()
		defer factory.Shutdown()
		for {
			select {
			case <-ctx.Done():
				p.mu.Lock()
				for key, l := range p.listeners {
					l.ln.Close()
					delete(p.listeners, key)
				}
				p.mu.Unlock()
				p.wg.Wait()
				k.Node.NS.IP("link del " + proxyLink)
				svcNS.Delete()
				return
			case <-kick:
				p.sync(ctx, lister)
			}
		}
	}()
	return nil
}

func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// sync opens a listener for every Service port that has none and closes
// those of Services gone.
func (p *serviceProxy) sync(ctx context.Context, lister interface {
	List(labels.Selector) ([]*corev1.Service, error)
}) {
	svcs, err := lister.List(labels.Everything())
	if err != nil {
		return
	}
	want := map[string]bool{}
	for _, s := range svcs {
		ip, err := netip.ParseAddr(s.Spec.ClusterIP)
		if err != nil || !ip.Is4() {
			continue // headless, or none yet
		}
		for _, sp := range s.Spec.Ports {
			if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
				continue
			}
			addr := netip.AddrPortFrom(ip, uint16(sp.Port)).String()
			key := s.Namespace + "/" + s.Name + "/" + sp.Name + "@" + addr
			want[key] = true
			p.mu.Lock()
			_, have := p.listeners[key]
			p.mu.Unlock()
			if have {
				continue
			}
			// The address may be there already (another port).
			_ = p.svc.IP(fmt.Sprintf("addr add %s/32 dev lo", ip))
			ln, err := p.svc.Listen(ctx, nil, "tcp", addr)
			if err != nil {
				if !p.failed[key] {
					p.failed[key] = true
					p.log.Error("service proxy: listen", "service", key, "err", err)
				}
				continue
			}
			l := &proxyListener{ns: s.Namespace, name: s.Name, port: sp.Name, ln: ln}
			p.mu.Lock()
			p.listeners[key] = l
			p.mu.Unlock()
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.serve(ctx, l)
			}()
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, l := range p.listeners {
		if !want[key] {
			l.ln.Close()
			delete(p.listeners, key)
		}
	}
}

func (p *serviceProxy) serve(ctx context.Context, l *proxyListener) {
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer c.Close()
			up, err := p.dial(ctx, l)
			if err != nil {
				p.log.Warn("service proxy: no endpoint", "service", l.ns+"/"+l.name, "port", l.port, "err", err)
				return
			}
			defer up.Close()
			stop := context.AfterFunc(ctx, func() { c.Close(); up.Close() })
			defer stop()
			relay(c, up)
		}()
	}
}

// dial connects to one of the Service port's ready endpoints, round robin.
func (p *serviceProxy) dial(ctx context.Context, l *proxyListener) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if l.ns == "default" && l.name == "kubernetes" {
		var d net.Dialer
		return d.DialContext(dctx, "tcp", p.k.apiServer())
	}
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: l.name})
	slices, err := p.slices.EndpointSlices(l.ns).List(sel)
	if err != nil {
		return nil, err
	}
	var addrs []string
	for _, s := range slices {
		if s.AddressType != discoveryv1.AddressTypeIPv4 {
			continue
		}
		for _, sp := range s.Ports {
			if sp.Port == nil || (sp.Name != nil && *sp.Name != l.port) || (sp.Name == nil && l.port != "") {
				continue
			}
			for _, ep := range s.Endpoints {
				if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
					continue
				}
				for _, a := range ep.Addresses {
					addrs = append(addrs, net.JoinHostPort(a, strconv.Itoa(int(*sp.Port))))
				}
			}
		}
	}
	if len(addrs) == 0 {
		return nil, errors.New("no ready endpoints")
	}
	addr := addrs[p.next.Add(1)%uint64(len(addrs))]
	return p.k.Node.NS.Dial(dctx, nil, "tcp", addr)
}

// relay copies both ways with half-close until both directions end.
func relay(a, b net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(b, a)
		closeWrite(b)
	}()
	io.Copy(a, b)
	closeWrite(a)
	<-done
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(interface{ CloseWrite() error }); ok {
		tc.CloseWrite()
	} else {
		c.Close()
	}
}

// apiServer is the API server's host:port as the kubelet reaches it.
func (k *Kubelet) apiServer() string {
	if k.APIServer != "" {
		return k.APIServer
	}
	return k.Client.Discovery().RESTClient().Get().URL().Host
}

// apiService is the API server's Service (default/kubernetes): its cluster
// IP and HTTPS port, as a kubelet injects them into containers.
func (k *Kubelet) apiService(ctx context.Context) (host, port string, ok bool) {
	s, err := k.Client.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil || s.Spec.ClusterIP == "" || len(s.Spec.Ports) == 0 {
		return "", "", false
	}
	for _, sp := range s.Spec.Ports {
		if sp.Name == "https" {
			return s.Spec.ClusterIP, strconv.Itoa(int(sp.Port)), true
		}
	}
	return s.Spec.ClusterIP, strconv.Itoa(int(s.Spec.Ports[0].Port)), true
}
