package netns

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
)

// Addressing of a topology. Node i (0-based) has UnderlayIP(i) on its uplink
// and the pod CIDR 10.(i+1).0.0/24 unless NodeConfig.PodCIDR says otherwise;
// its pods get .2, .3, ... of that CIDR unless AddPodIP chooses.
// Pods reach their node through a gateway address that exists only as a
// static neighbour entry (the Calico trick), so the node's side of every pod
// veth carries no address.
const (
	// Uplink is the name of every node's underlay interface.
	Uplink = "eth0"
	// PodIfname is the name of the pod's side of its veth.
	PodIfname = "eth0"
	// HostVethMAC is the MAC address of every pod veth's node side.
	HostVethMAC = "ee:ee:ee:ee:ee:ee"
	// PodGateway is the pod's default gateway (answered by HostVethMAC).
	PodGateway = "169.254.1.1"
)

var topologies atomic.Int64 // for default prefixes

// UnderlayPrefix is the underlay network that joins the nodes.
var UnderlayPrefix = netip.MustParsePrefix("192.168.200.0/24")

// Config describes a topology to build.
type Config struct {
	// Prefix is prepended to every namespace name; topologies that exist at
	// the same time need different prefixes. Empty means "ambit<pid>-<n>",
	// unique in the process.
	Prefix string
	// Nodes to create, in order.
	Nodes []NodeConfig
}

// NodeConfig describes one node.
type NodeConfig struct {
	// Name of the node, unique in the topology.
	Name string
	// Pods to create on the node, by name (unique in the topology).
	Pods []string
	// PodCIDR is the node's pod network (an IPv4 /24 or larger); zero means
	// 10.(i+1).0.0/24 for the i-th node.
	PodCIDR netip.Prefix
}

// Topology is a set of nodes on one underlay bridge.
type Topology struct {
	// Underlay holds the bridge "br0" that joins the nodes' uplinks.
	Underlay *NS
	Nodes    []*Node

	prefix string
	mu     sync.Mutex // guards the Pods slices of every node
}

// Node is a network namespace standing for a Kubernetes node: it routes
// between its pods (on their veths) and the other nodes (on Uplink).
type Node struct {
	NS      *NS
	Name    string
	Index   int
	IP      netip.Addr   // on Uplink
	PodCIDR netip.Prefix // routed to this node by the other nodes
	Pods    []*Pod       // guarded by the topology's lock

	topo    *Topology
	nextPod int // guarded by the topology's lock
}

// Pod is a network namespace with one interface, PodIfname, whose peer
// HostIfname sits in the node's namespace.
type Pod struct {
	NS         *NS
	Name       string
	IP         netip.Addr
	Node       *Node
	HostIfname string
}

// Build creates the namespaces, links, addresses and routes of cfg. On error,
// whatever was built is removed.
func Build(cfg Config) (_ *Topology, err error) {
	if len(cfg.Nodes) == 0 || len(cfg.Nodes) > 250 {
		return nil, fmt.Errorf("build topology: need 1 to 250 nodes, have %d", len(cfg.Nodes))
	}
	t := &Topology{prefix: cfg.Prefix}
	if t.prefix == "" {
		t.prefix = fmt.Sprintf("ambit%d-%d", os.Getpid(), topologies.Add(1))
	}
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	if t.Underlay, err = New(t.prefix + "-underlay"); err != nil {
		return nil, err
	}
	if err := t.Underlay.IP("link add br0 type bridge\nlink set br0 up"); err != nil {
		return nil, err
	}
	for i, nc := range cfg.Nodes {
		n, err := t.addNode(i, nc.Name, nc.PodCIDR)
		if err != nil {
			return nil, err
		}
		t.Nodes = append(t.Nodes, n)
	}
	for _, n := range t.Nodes {
		var routes []string
		for _, o := range t.Nodes {
			if o != n {
				routes = append(routes, fmt.Sprintf("route add %s via %s dev %s", o.PodCIDR, o.IP, Uplink))
			}
		}
		if len(routes) > 0 {
			if err := n.NS.IP(strings.Join(routes, "\n")); err != nil {
				return nil, err
			}
		}
	}
	for i, nc := range cfg.Nodes {
		for _, name := range nc.Pods {
			if _, err := t.Nodes[i].AddPod(name); err != nil {
				return nil, err
			}
		}
	}
	return t, nil
}

func (t *Topology) addNode(i int, name string, podCIDR netip.Prefix) (*Node, error) {
	if !podCIDR.IsValid() {
		podCIDR = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i + 1), 0, 0}), 24)
	}
	if !podCIDR.Addr().Is4() || podCIDR.Bits() > 24 {
		return nil, fmt.Errorf("add node %s: pod CIDR %s must be IPv4 and /24 or larger", name, podCIDR)
	}
	ns, err := New(t.prefix + "-" + name)
	if err != nil {
		return nil, err
	}
	ip := UnderlayPrefix.Addr().As4()
	ip[3] = byte(i + 1)
	n := &Node{
		NS:      ns,
		Name:    name,
		Index:   i,
		IP:      netip.AddrFrom4(ip),
		PodCIDR: podCIDR.Masked(),
		topo:    t,
	}
	port := fmt.Sprintf("u%d", i)
	err = t.Underlay.IP(fmt.Sprintf("link add %s type veth peer name %s netns %s\nlink set %s master br0 up",
		port, Uplink, ns.Name, port))
	if err == nil {
		err = ns.IP(fmt.Sprintf("addr add %s/%d dev %s\nlink set %s up", n.IP, UnderlayPrefix.Bits(), Uplink, Uplink))
	}
	if err == nil {
		err = ns.Sysctl("net.ipv4.ip_forward", "1")
	}
	if err != nil {
		ns.Delete()
		return nil, err
	}
	return n, nil
}

// AddPod creates a pod on the node: its namespace, its veth, its address and
// the routes both ways. The pod is reachable when AddPod returns; nothing runs
// in it until the caller starts something there.
func (n *Node) AddPod(name string) (*Pod, error) {
	return n.AddPodIP(name, netip.Addr{})
}

// AddPodIP is AddPod with a chosen address from the node's pod CIDR; the zero
// Addr picks the next free one (.2, .3, ...).
func (n *Node) AddPodIP(name string, ip netip.Addr) (*Pod, error) {
	t := n.topo
	t.mu.Lock()
	idx := n.nextPod
	n.nextPod++
	t.mu.Unlock()
	if idx > 250 {
		return nil, fmt.Errorf("add pod %s: node %s is full", name, n.Name)
	}
	if !ip.IsValid() {
		a := n.PodCIDR.Addr().As4()
		a[3] = byte(idx + 2)
		ip = netip.AddrFrom4(a)
	}
	if !n.PodCIDR.Contains(ip) {
		return nil, fmt.Errorf("add pod %s: %s is not in node %s's pod CIDR %s", name, ip, n.Name, n.PodCIDR)
	}
	ns, err := New(t.prefix + "-" + name)
	if err != nil {
		return nil, err
	}
	p := &Pod{NS: ns, Name: name, IP: ip, Node: n, HostIfname: fmt.Sprintf("pv%d", idx)}
	fail := func(err error) (*Pod, error) {
		ns.Delete()
		return nil, err
	}
	if err := n.NS.IP(fmt.Sprintf("link add %s address %s type veth peer name %s netns %s\nlink set %s up\nroute add %s/32 dev %s scope link src %s",
		p.HostIfname, HostVethMAC, PodIfname, ns.Name, p.HostIfname, p.IP, p.HostIfname, n.IP)); err != nil {
		return fail(err)
	}
	if err := ns.IP(fmt.Sprintf("addr add %s/32 dev %s\nlink set %s up\nroute add %s dev %s scope link\nroute add default via %s dev %s\nneigh add %s lladdr %s dev %s nud permanent",
		p.IP, PodIfname, PodIfname, PodGateway, PodIfname, PodGateway, PodIfname, PodGateway, HostVethMAC, PodIfname)); err != nil {
		n.NS.IP("link del " + p.HostIfname)
		return fail(err)
	}
	t.mu.Lock()
	n.Pods = append(n.Pods, p)
	t.mu.Unlock()
	return p, nil
}

// RemovePod deletes the pod's namespace and its veth.
func (n *Node) RemovePod(p *Pod) error {
	t := n.topo
	t.mu.Lock()
	for i, q := range n.Pods {
		if q == p {
			n.Pods = append(n.Pods[:i], n.Pods[i+1:]...)
			break
		}
	}
	t.mu.Unlock()
	return errors.Join(n.NS.IP("link del "+p.HostIfname), p.NS.Delete())
}

// Node returns the node called name, or nil.
func (t *Topology) Node(name string) *Node {
	for _, n := range t.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Pod returns the pod called name, or nil.
func (t *Topology) Pod(name string) *Pod {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, n := range t.Nodes {
		for _, p := range n.Pods {
			if p.Name == name {
				return p
			}
		}
	}
	return nil
}

// Close deletes every namespace of the topology. It is safe to call on a
// partly built topology and more than once.
func (t *Topology) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for _, n := range t.Nodes {
		for _, p := range n.Pods {
			errs = append(errs, p.NS.Delete())
		}
		n.Pods = nil
		errs = append(errs, n.NS.Delete())
	}
	t.Nodes = nil
	if t.Underlay != nil {
		errs = append(errs, t.Underlay.Delete())
		t.Underlay = nil
	}
	return errors.Join(errs...)
}
