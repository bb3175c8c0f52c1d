// Command demo is `make demo`: ambit's local mesh on the embedded default.
// It reads the YAML in examples/local, builds one network namespace per node
// and per pod, runs istiod-lite in local mode on that directory (no API
// server), a ztunnel with eBPF capture on each node and the echo workload in
// each pod that declares a port, sends traffic between the pods, and prints
// who talked to whom, with which SPIFFE identities, whether the bytes crossed
// the wire encrypted, and the policy decisions. Its L7 act runs the
// waypoint of the examples (a pod labelled with a Gateway's name) with
// bin/waypoint, sends HTTP through each HTTPRoute from an enrolled client
// (eBPF -> ztunnel -> HBONE -> waypoint -> HBONE -> ztunnel -> pod) and
// prints the codes, the observed canary split, the retries the waypoint made
// and the identity it saw. Then it tears everything down (unless -keep). It
// needs root.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/mesh"
	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

func main() {
	var cfg config
	flag.StringVar(&cfg.examples, "examples", "", "directory of the mesh's YAML (default: examples/local of this repository)")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the mesh running after the summary, until interrupted")
	flag.BoolVar(&cfg.verbose, "v", false, "log the harness's progress")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

type config struct {
	examples string
	keep     bool
	verbose  bool
}

// pod is a pod of the examples with where it runs.
type pod struct {
	obj   *corev1.Pod
	ip    netip.Addr
	ports []int
	net   *netns.Pod
	http  *app.HTTP // the L7 backends' server (app.AnnotationProtocol http)
}

// l7 reports whether an object belongs to the L7 act only (label
// ambit.dev/demo-act=l7): it stays out of the L4 table.
func l7(labels map[string]string) bool { return labels[labelAct] == "l7" }

const labelAct = "ambit.dev/demo-act"

// waypointOf is the Gateway a waypoint pod runs for ("" for other pods).
func (p *pod) waypointOf() string { return p.obj.Labels[gatewayNameLabel] }

const gatewayNameLabel = "gateway.networking.k8s.io/gateway-name"

func (p *pod) key() string { return p.obj.Namespace + "/" + p.obj.Name }

func run(ctx context.Context, cfg config) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and loads eBPF programs (run it with sudo)")
	}
	repo, err := repoRoot()
	if err != nil {
		return err
	}
	if cfg.examples == "" {
		cfg.examples = filepath.Join(repo, "examples", "local")
	}
	log := slog.New(slog.DiscardHandler)
	if cfg.verbose {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	ex, err := readExamples(cfg.examples)
	if err != nil {
		return err
	}
	pods, svcs := ex.pods, ex.svcs
	var waypoints []string
	for _, p := range pods {
		if gw := p.waypointOf(); gw != "" {
			waypoints = append(waypoints, p.obj.Namespace+"/"+gw)
		}
	}
	nodes, err := nodesOf(pods)
	if err != nil {
		return err
	}

	work, err := os.MkdirTemp("", "ambit-demo-")
	if err != nil {
		return err
	}
	if !cfg.keep {
		defer os.RemoveAll(work)
	}
	step("building ztunnel, istiod-lite and waypoint")
	bin := filepath.Join(work, "bin")
	if err := mesh.Build(ctx, repo, bin); err != nil {
		return err
	}
	step(fmt.Sprintf("starting istiod-lite on %s (local mode: %s)", nodes[0].Name, cfg.examples))
	m, err := mesh.Start(ctx, mesh.Options{BinDir: bin, WorkDir: work, Nodes: nodes, Prefix: "ambit-demo", ConfigDir: cfg.examples, Waypoints: waypoints, Logger: log})
	if err != nil {
		return err
	}
	defer func() {
		if !cfg.keep {
			step("tearing down")
			m.Close()
		}
	}()

	// The pods' networks exist before ztunnel starts, as a CNI would make
	// them; ztunnel then captures the enrolled ones before they send anything.
	for _, p := range pods {
		n := m.Topo.Node(p.obj.Spec.NodeName)
		if p.net, err = n.AddPodIP(p.obj.Namespace+"."+p.obj.Name, p.ip); err != nil {
			return err
		}
	}
	for _, n := range nodes {
		step("starting ztunnel on " + n.Name + " (eBPF capture)")
		if err := m.StartZtunnel(ctx, n.Name); err != nil {
			return err
		}
	}
	var servers []*app.Server
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()
	var httpServers []*app.HTTP
	defer func() {
		for _, s := range httpServers {
			s.Close()
		}
	}()
	for _, p := range pods {
		if p.waypointOf() != "" {
			continue // runs bin/waypoint, below
		}
		if p.http, err = app.HTTPFromAnnotations(p.obj.Name, p.obj.Annotations); err != nil {
			return fmt.Errorf("pod %s: %w", p.key(), err)
		}
		for _, port := range p.ports {
			ln, err := p.net.NS.Listen(ctx, nil, "tcp", ":"+strconv.Itoa(port))
			if err != nil {
				return fmt.Errorf("pod %s: %w", p.key(), err)
			}
			if p.http != nil {
				httpServers = append(httpServers, p.http)
				go p.http.Serve(ln)
				continue
			}
			s := &app.Server{Name: p.key()}
			servers = append(servers, s)
			go s.Serve(ln)
		}
	}
	for _, p := range pods {
		if gw := p.waypointOf(); gw != "" {
			step(fmt.Sprintf("starting waypoint %s/%s in pod %s on %s", p.obj.Namespace, gw, p.obj.Name, p.obj.Spec.NodeName))
			t := time.Now()
			if _, err := m.StartWaypoint(ctx, mesh.WaypointOptions{Name: p.obj.Name, NS: p.net.NS, Namespace: p.obj.Namespace, Gateway: gw, Node: p.obj.Name}); err != nil {
				return err
			}
			step(fmt.Sprintf("waypoint %s ready after %s", p.obj.Name, time.Since(t).Round(10*time.Millisecond)))
		}
	}

	capFile := filepath.Join(work, "underlay.pcap")
	pcap, err := m.Topo.Underlay.StartCapture("br0", capFile, "tcp")
	if err != nil {
		return err
	}
	step("sending traffic")
	flows := plan(pods, svcs)
	for i, f := range flows {
		// A fixed client port per flow finds its access-log lines even when
		// the connect itself fails (a reset can beat connect's return).
		f.local = netip.AddrPortFrom(f.from.ip, uint16(41000+i)).String()
		f.exchange(ctx)
	}
	packets, err := pcap.Stop()
	if err != nil {
		return err
	}
	logs, err := settledAccessLogs(ctx, m, nodes)
	if err != nil {
		return err
	}
	report(os.Stdout, flows, logs, packets, m)
	if err := l7Act(ctx, os.Stdout, m, ex, nodes); err != nil {
		return fmt.Errorf("L7 act: %w", err)
	}
	fmt.Printf("\nmesh up, traffic and summary in %s.\n", time.Since(began).Round(100*time.Millisecond))
	if cfg.keep {
		fmt.Printf("kept running (-keep): logs in %s; node namespaces ambit-demo-<node>; interrupt to tear down.\n", work)
		<-ctx.Done()
		m.Close()
		os.RemoveAll(work)
	}
	return nil
}

var began = time.Now()

// settledAccessLogs reads every node's access log once no new line has
// arrived for a second (a proxy writes a connection's line when it ends,
// which can be just after the client saw the end), or after 10s.
func settledAccessLogs(ctx context.Context, m *mesh.Mesh, nodes []netns.NodeConfig) ([]mesh.AccessLog, error) {
	deadline := time.Now().Add(10 * time.Second)
	var last []mesh.AccessLog
	for {
		var logs []mesh.AccessLog
		for _, n := range nodes {
			l, err := m.AccessLogs(n.Name)
			if err != nil {
				return nil, err
			}
			logs = append(logs, l...)
		}
		if (last != nil && len(logs) == len(last)) || time.Now().After(deadline) {
			return logs, nil
		}
		last = logs
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func step(s string) {
	fmt.Fprintf(os.Stderr, "==> [%5.1fs] %s\n", time.Since(began).Seconds(), s)
}

func repoRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if ok {
		if root := filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..")); exists(filepath.Join(root, "go.mod")) {
			return root, nil
		}
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if exists(filepath.Join(d, "go.mod")) {
			return d, nil
		}
		if d == filepath.Dir(d) {
			return "", errors.New("cannot find the repository (go.mod); run from inside it")
		}
	}
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// examples are the objects of the examples directory the demo acts on.
type examples struct {
	pods   []*pod
	svcs   []*corev1.Service
	routes []*gwv1.HTTPRoute
}

// readExamples decodes the Pods, Services and HTTPRoutes of dir.
func readExamples(dir string) (*examples, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("no YAML in %s", dir)
	}
	var pods []*pod
	var svcs []*corev1.Service
	var routes []*gwv1.HTTPRoute
	for _, f := range files {
		r, err := os.Open(f)
		if err != nil {
			return nil, err
		}
		objs, _, err := translate.Decode(r)
		r.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		for _, o := range objs {
			switch o := o.(type) {
			case *gwv1.HTTPRoute:
				routes = append(routes, o)
			case *corev1.Pod:
				ip, err := netip.ParseAddr(o.Status.PodIP)
				if err != nil || o.Spec.NodeName == "" {
					return nil, fmt.Errorf("%s: pod %s/%s needs spec.nodeName and status.podIP", f, o.Namespace, o.Name)
				}
				p := &pod{obj: o, ip: ip}
				for _, c := range o.Spec.Containers {
					for _, port := range c.Ports {
						p.ports = append(p.ports, int(port.ContainerPort))
					}
				}
				pods = append(pods, p)
			case *corev1.Service:
				svcs = append(svcs, o)
			}
		}
	}
	sort.Slice(pods, func(i, j int) bool { return pods[i].key() < pods[j].key() })
	sort.Slice(routes, func(i, j int) bool {
		return routes[i].Namespace+"/"+routes[i].Name < routes[j].Namespace+"/"+routes[j].Name
	})
	return &examples{pods: pods, svcs: svcs, routes: routes}, nil
}

// nodesOf derives the nodes (sorted by name) and their /24 pod CIDRs.
func nodesOf(pods []*pod) ([]netns.NodeConfig, error) {
	cidrs := map[string]netip.Prefix{}
	for _, p := range pods {
		c := netip.PrefixFrom(p.ip, 24).Masked()
		if old, ok := cidrs[p.obj.Spec.NodeName]; ok && old != c {
			return nil, fmt.Errorf("node %s has pods in %s and %s: the demo wants one /24 per node", p.obj.Spec.NodeName, old, c)
		}
		cidrs[p.obj.Spec.NodeName] = c
	}
	var nodes []netns.NodeConfig
	for name, c := range cidrs {
		nodes = append(nodes, netns.NodeConfig{Name: name, PodCIDR: c})
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
	return nodes, nil
}

// flow is one connection the demo makes.
type flow struct {
	from   *pod
	to     string // what the client dialled, for the table
	addr   string // ip:port
	local  string // the client's ip:port, to find the access-log lines
	res    app.Result
	err    error
	server *pod
}

// plan: every pod (as a client) to every server pod's ports, and to every
// service, skipping a pod talking to itself and the L7 act's objects.
func plan(pods []*pod, svcs []*corev1.Service) []*flow {
	var flows []*flow
	for _, c := range pods {
		if l7(c.obj.Labels) {
			continue
		}
		for _, s := range svcs {
			if l7(s.Labels) {
				continue
			}
			for _, ip := range s.Spec.ClusterIPs {
				for _, port := range s.Spec.Ports {
					flows = append(flows, &flow{from: c, to: fmt.Sprintf("svc %s.%s:%d", s.Name, s.Namespace, port.Port), addr: net.JoinHostPort(ip, strconv.Itoa(int(port.Port)))})
				}
			}
		}
		for _, s := range pods {
			if s == c || l7(s.obj.Labels) {
				continue
			}
			for _, port := range s.ports {
				flows = append(flows, &flow{from: c, to: fmt.Sprintf("pod %s:%d", s.key(), port), addr: net.JoinHostPort(s.ip.String(), strconv.Itoa(port)), server: s})
			}
		}
	}
	return flows
}

func (f *flow) exchange(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	f.res, f.err = app.Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
		d := &net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(f.local))}
		return f.from.net.NS.Dial(ctx, d, "tcp", f.addr)
	}, 64<<10)
}

func report(w *os.File, flows []*flow, logs []mesh.AccessLog, packets []netns.Packet, m *mesh.Mesh) {
	bySrc := map[string][]mesh.AccessLog{}
	for _, l := range logs {
		bySrc[l.Src] = append(bySrc[l.Src], l)
	}
	// Which client addresses' payload crossed the underlay in clear.
	clear := map[string]bool{}
	var hbone, total int
	for _, p := range packets {
		total++
		if p.Src.Port() == model.PortHBONE || p.Dst.Port() == model.PortHBONE {
			hbone++
		}
		if strings.Contains(string(p.Payload), app.Marker) {
			clear[p.Src.String()] = true
			clear[p.Dst.String()] = true
		}
	}

	fmt.Fprintln(w)
	fmt.Fprintf(w, "ambit demo: who talked to whom (identities are spiffe://%s/...)\n\n", identity.DefaultTrustDomain.Name())
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM\tTO\tRESULT\tON THE WIRE\tIDENTITIES\tPOLICY")
	var leaks []string
	for _, f := range flows {
		result := "ok"
		if f.err != nil {
			result = "failed: " + shortErr(f.err)
		} else if f.res.Server != "" {
			result = "ok (" + f.res.Server + ")"
		}
		var out, in *mesh.AccessLog
		for i, l := range bySrc[f.local] {
			switch l.Direction {
			case "outbound":
				out = &bySrc[f.local][i]
			case "inbound":
				in = &bySrc[f.local][i]
			}
		}
		wire := "plain TCP, not captured"
		ids := "-"
		switch {
		case out != nil && (out.Route == "hbone" || out.Route == "waypoint"):
			wire = "HBONE mTLS"
			ids = shortID(out.SrcPrincipal) + " -> " + shortID(out.DstPrincipal)
		case out != nil:
			wire = "plain TCP (" + out.Route + ": destination outside the mesh)"
		case in != nil && in.Via != "hbone":
			wire = "plain TCP, captured at the destination"
		}
		if clear[f.local] {
			wire += "; payload seen in clear"
			if out != nil && (out.Route == "hbone" || out.Route == "waypoint") {
				leaks = append(leaks, f.from.key()+" -> "+f.to)
			}
		}
		policy := "-"
		switch {
		case in != nil && in.Outcome == "denied":
			policy = "DENIED: " + nonEmpty(in.Reason, "policy")
		case in != nil && in.Outcome == "ok":
			policy = "allowed"
		case out != nil && out.Outcome == "denied":
			policy = "DENIED: " + nonEmpty(out.Reason, "the destination answered 401")
		}
		if f.err != nil && f.noKubeProxy() {
			result = "failed: no route to the VIP"
			policy = "(no kube-proxy in the demo: only enrolled pods reach service VIPs, through ztunnel)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", f.from.key(), f.to, result, wire, ids, policy)
	}
	tw.Flush()
	fmt.Fprintf(w, "\nunderlay capture: %d TCP packets crossed between the nodes, %d of them HBONE (port %d).\n", total, hbone, model.PortHBONE)
	if len(leaks) == 0 {
		fmt.Fprintf(w, "plaintext marker: seen only in connections that bypass the mesh (%d); never in a tunnelled one.\n", countClientFlows(flows, clear))
	} else {
		fmt.Fprintf(w, "PLAINTEXT LEAK: the marker crossed the underlay in tunnelled connections: %s\n", strings.Join(leaks, "; "))
	}
	for _, n := range m.Topo.Nodes {
		var held []struct {
			ID       string    `json:"identity"`
			NotAfter time.Time `json:"notAfter"`
		}
		if err := m.Admin(context.Background(), n.Name, "/debug/certificates", &held); err == nil {
			var ids []string
			for _, c := range held {
				ids = append(ids, fmt.Sprintf("%s (expires in %s)", shortID(c.ID), time.Until(c.NotAfter).Round(time.Minute)))
			}
			fmt.Fprintf(w, "%s's ztunnel holds certificates for: %s\n", n.Name, strings.Join(ids, ", "))
		}
	}
}

// noKubeProxy reports a failed dial to a service VIP from a pod outside the
// mesh: without kube-proxy nothing routes VIPs for such pods.
func (f *flow) noKubeProxy() bool {
	return strings.HasPrefix(f.to, "svc ") && strings.Contains(f.err.Error(), "unreachable")
}

func shortID(id string) string {
	return strings.TrimPrefix(id, "spiffe://"+identity.DefaultTrustDomain.Name()+"/")
}

func countClientFlows(flows []*flow, clear map[string]bool) int {
	n := 0
	for _, f := range flows {
		if clear[f.local] {
			n++
		}
	}
	return n
}

func shortErr(err error) string {
	s := err.Error()
	switch {
	case strings.Contains(s, "connection refused"):
		return "connection refused"
	case strings.Contains(s, "connection reset"):
		return "connection reset"
	case strings.Contains(s, "EOF"):
		return "closed by the mesh"
	case strings.Contains(s, "timeout"), strings.Contains(s, "deadline"):
		return "timed out"
	}
	return s
}

func nonEmpty(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
