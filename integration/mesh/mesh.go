// Package mesh brings up ambit for real on one machine: a network-namespace
// topology of nodes (integration/netns), istiod-lite as a process in the
// first node's namespace (local mode on a YAML directory, or cluster mode on
// a kubeconfig), and one ztunnel process with eBPF capture per node, the way
// manifests/ would run them. The demo, the integration scenarios and the
// benchmarks use it; tests kill and restart its processes to prove what
// happens when a component goes away.
package mesh

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ambit-mesh/ambit/bpf"
	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/telemetry"
)

// Build compiles ztunnel, istiod-lite and waypoint from the module at repo
// into dir.
func Build(ctx context.Context, repo, dir string) error {
	// As they ship (the Makefile's build, ambitctl/images): static, gRPC
	// without x/net/trace.
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-tags=grpcnotrace", "-o", dir+string(os.PathSeparator), "./cmd/ztunnel", "./cmd/istiod-lite", "./cmd/waypoint")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build binaries: %w: %s", err, out)
	}
	return nil
}

// Options describe a mesh to start.
type Options struct {
	// BinDir holds the ztunnel, istiod-lite and waypoint binaries (see
	// Build). Required.
	BinDir string
	// WorkDir receives logs, credentials and the CA; required.
	WorkDir string
	// Nodes of the topology; istiod-lite runs in the first one.
	Nodes []netns.NodeConfig
	// Prefix names the topology's namespaces (netns.Config.Prefix).
	Prefix string
	// ConfigDir selects local mode: istiod-lite reads this YAML directory.
	ConfigDir string
	// Kubeconfig selects cluster mode (istiod-lite watches that API server).
	Kubeconfig string
	// TokenFile, in cluster mode, returns the token file a node's ztunnel
	// presents to the CA (a service-account token bound to its pod); nil in
	// local mode, where each node gets a generated host secret.
	TokenFile func(node string) (string, error)
	// CARoots is the PEM file of roots ztunnels verify istiod-lite with. In
	// local mode it defaults to the CA directory's roots.pem; in cluster
	// mode the caller writes it (from the ambit-ca-root ConfigMap) before
	// starting ztunnels.
	CARoots string
	// Waypoints, in local mode, are the waypoints ("<namespace>/<gateway>")
	// that get a line in istiod-lite's host credentials (format: package
	// istiod-lite/auth) and a secret file, which StartWaypoint presents.
	Waypoints []string
	// Setup, when set, runs once the topology exists and before istiod-lite
	// starts (e.g. to make the API server reachable from the first node).
	Setup func(*netns.Topology) error
	// IstiodArgs are more flags for istiod-lite.
	IstiodArgs []string
	// ZtunnelArgs, when set, returns more flags for node's ztunnel (e.g.
	// --identity=spire and its agent's socket).
	ZtunnelArgs func(node string) []string
	// CertTTL, when set, is the lifetime of workload certificates.
	CertTTL time.Duration
	// Logger receives the harness's progress; nil discards.
	Logger *slog.Logger
}

// Mesh is a running mesh. Close tears everything down.
type Mesh struct {
	Topo *netns.Topology
	opts Options
	log  *slog.Logger

	mu        sync.Mutex       // guards istiod, ztunnels, waypoints
	istiod    *Proc            // nil while stopped
	ztunnels  map[string]*Proc // by node; missing while stopped
	waypoints map[string]*Proc // by WaypointOptions.Name; missing while stopped
}

// Proc is a component's process.
type Proc struct {
	Name string
	Log  string // path of its combined stdout/stderr
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set before done closes
}

// XDSAddr is istiod-lite's address as ztunnels reach it.
func (m *Mesh) XDSAddr() netip.AddrPort {
	return netip.AddrPortFrom(m.Topo.Nodes[0].IP, model.PortXDS)
}

// Start builds the topology and starts istiod-lite; ztunnels start with
// StartZtunnel (after the pods' networks exist, so capture finds them).
func Start(ctx context.Context, opts Options) (_ *Mesh, err error) {
	if opts.BinDir == "" || opts.WorkDir == "" || len(opts.Nodes) == 0 {
		return nil, errors.New("mesh: BinDir, WorkDir and Nodes are required")
	}
	if (opts.ConfigDir == "") == (opts.Kubeconfig == "") {
		return nil, errors.New("mesh: exactly one of ConfigDir (local mode) and Kubeconfig (cluster mode)")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	topo, err := netns.Build(netns.Config{Prefix: opts.Prefix, Nodes: opts.Nodes})
	if err != nil {
		return nil, fmt.Errorf("mesh: %w", err)
	}
	m := &Mesh{Topo: topo, opts: opts, log: log, ztunnels: map[string]*Proc{}, waypoints: map[string]*Proc{}}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	if opts.ConfigDir != "" {
		if err := m.writeHostCredentials(); err != nil {
			return nil, err
		}
	}
	if opts.Setup != nil {
		if err := opts.Setup(topo); err != nil {
			return nil, fmt.Errorf("mesh: setup: %w", err)
		}
	}
	if err := m.StartIstiod(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *Mesh) credentialsFile() string { return filepath.Join(m.opts.WorkDir, "host-credentials") }
func (m *Mesh) hostSecretFile(node string) string {
	return filepath.Join(m.opts.WorkDir, "host-secret-"+node)
}
func (m *Mesh) waypointSecretFile(key string) string {
	return filepath.Join(m.opts.WorkDir, "waypoint-secret-"+strings.ReplaceAll(key, "/", "."))
}
func (m *Mesh) caDir() string { return filepath.Join(m.opts.WorkDir, "ca") }

// CARootsFile is the PEM file of roots the ztunnels verify istiod-lite with.
func (m *Mesh) CARootsFile() string { return m.rootsFile() }

func (m *Mesh) rootsFile() string {
	if m.opts.CARoots != "" {
		return m.opts.CARoots
	}
	return filepath.Join(m.caDir(), "roots.pem")
}

// writeHostCredentials gives every node a random secret (local mode's CA
// credentials) and istiod-lite the file of all of them.
func (m *Mesh) writeHostCredentials() error {
	var lines []string
	for _, n := range m.Topo.Nodes {
		b := make([]byte, 24)
		rand.Read(b)
		secret := hex.EncodeToString(b)
		if err := os.WriteFile(m.hostSecretFile(n.Name), []byte(secret+"\n"), 0o600); err != nil {
			return fmt.Errorf("mesh: %w", err)
		}
		lines = append(lines, n.Name+" "+secret)
	}
	for _, key := range m.opts.Waypoints {
		b := make([]byte, 24)
		rand.Read(b)
		secret := hex.EncodeToString(b)
		if err := os.WriteFile(m.waypointSecretFile(key), []byte(secret+"\n"), 0o600); err != nil {
			return fmt.Errorf("mesh: %w", err)
		}
		lines = append(lines, "waypoint "+key+" "+secret)
	}
	return os.WriteFile(m.credentialsFile(), []byte(strings.Join(lines, "\n")+"\n"), 0o600)
}

// StartIstiod starts istiod-lite in the first node's namespace and waits
// until it serves.
func (m *Mesh) StartIstiod(ctx context.Context) error {
	node := m.Topo.Nodes[0]
	args := []string{
		"--listen", m.XDSAddr().String(),
		"--admin", "127.0.0.1:15014",
		// metrics for a scraper, on the node address (manifests: the pod's)
		"--monitoring-addr", netip.AddrPortFrom(node.IP, 15014).String(),
		"--serving-sans", node.IP.String(),
		"--log-level", "debug",
	}
	if m.opts.ConfigDir != "" {
		args = append(args, "--config-dir", m.opts.ConfigDir, "--ca-dir", m.caDir(), "--host-credentials", m.credentialsFile())
	} else {
		args = append(args, "--kubeconfig", m.opts.Kubeconfig)
	}
	if m.opts.CertTTL > 0 {
		args = append(args, "--cert-ttl", m.opts.CertTTL.String())
	}
	args = append(args, m.opts.IstiodArgs...)
	p, err := m.start(ctx, node.NS, node.Name, "istiod-lite", filepath.Join(m.opts.BinDir, "istiod-lite"), args...)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.istiod = p
	m.mu.Unlock()
	if err := waitTCP(ctx, node.NS, m.XDSAddr().String(), p); err != nil {
		return fmt.Errorf("istiod-lite did not start: %w\n%s", err, p.Tail(30))
	}
	if m.opts.ConfigDir != "" {
		if err := waitFile(ctx, m.rootsFile(), p); err != nil {
			return fmt.Errorf("istiod-lite wrote no trust bundle: %w\n%s", err, p.Tail(30))
		}
	}
	return nil
}

// StopIstiod kills istiod-lite (SIGKILL: a crash, not a drain).
func (m *Mesh) StopIstiod() error {
	m.mu.Lock()
	p := m.istiod
	m.istiod = nil
	m.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Kill()
}

// PinPath is where node's ztunnel pins its eBPF capture: bpffs is shared by
// every network namespace on the machine, so each simulated node has its own.
func (m *Mesh) PinPath(node string) string {
	return "/sys/fs/bpf/" + m.prefix() + "-" + node
}

func (m *Mesh) prefix() string {
	if m.opts.Prefix != "" {
		return m.opts.Prefix
	}
	return fmt.Sprintf("ambit%d", os.Getpid())
}

// StartZtunnel starts node's ztunnel with eBPF capture and waits until it is
// ready (config received, listeners up).
func (m *Mesh) StartZtunnel(ctx context.Context, node string) error {
	n := m.Topo.Node(node)
	if n == nil {
		return fmt.Errorf("mesh: no node %s", node)
	}
	tokenFile := m.hostSecretFile(node)
	if m.opts.TokenFile != nil {
		var err error
		if tokenFile, err = m.opts.TokenFile(node); err != nil {
			return fmt.Errorf("mesh: token for %s: %w", node, err)
		}
	}
	rootsFile := m.rootsFile()
	args := []string{
		"--node", node,
		"--xds-address", m.XDSAddr().String(),
		"--ca-roots", rootsFile,
		"--token-file", tokenFile,
		"--capture",
		"--bpf-pin-path", m.PinPath(node),
		"--uplinks", netns.Uplink,
		"--drain-timeout", "2s",
	}
	// A pod the config has not learned yet is never reached in clear.
	var cidrs []string
	for _, tn := range m.Topo.Nodes {
		cidrs = append(cidrs, tn.PodCIDR.String())
	}
	args = append(args, "--pod-cidrs", strings.Join(cidrs, ","))
	if m.opts.ZtunnelArgs != nil {
		args = append(args, m.opts.ZtunnelArgs(node)...)
	}
	p, err := m.start(ctx, n.NS, n.Name, "ztunnel-"+node, filepath.Join(m.opts.BinDir, "ztunnel"), args...)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.ztunnels[node] = p
	m.mu.Unlock()
	if err := m.waitReady(ctx, n.NS, p); err != nil {
		return fmt.Errorf("ztunnel on %s not ready: %w\n%s", node, err, p.Tail(40))
	}
	return nil
}

// StopZtunnel kills node's ztunnel (SIGKILL). Capture stays pinned.
func (m *Mesh) StopZtunnel(node string) error {
	m.mu.Lock()
	p := m.ztunnels[node]
	delete(m.ztunnels, node)
	m.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Kill()
}

// Ztunnel returns node's running ztunnel process, or nil.
func (m *Mesh) Ztunnel(node string) *Proc {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ztunnels[node]
}

// Istiod returns the running istiod-lite process, or nil.
func (m *Mesh) Istiod() *Proc {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.istiod
}

func (m *Mesh) waitReady(ctx context.Context, ns *netns.NS, p *Proc) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	client := httpClientIn(ns, time.Second)
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz/ready", model.PortReady)
	for {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-p.done:
			return fmt.Errorf("exited: %v", p.err)
		case <-ctx.Done():
			return fmt.Errorf("readiness: %w (last: %v)", ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Admin fetches path from node's ztunnel admin port and decodes its JSON.
func (m *Mesh) Admin(ctx context.Context, node, path string, v any) error {
	n := m.Topo.Node(node)
	if n == nil {
		return fmt.Errorf("mesh: no node %s", node)
	}
	client := httpClientIn(n.NS, 5*time.Second)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", model.PortAdmin, path), nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("admin %s on %s: %w", path, node, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("admin %s on %s: %s: %s", path, node, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func (m *Mesh) start(ctx context.Context, ns *netns.NS, where, name, bin string, args ...string) (*Proc, error) {
	logPath := filepath.Join(m.opts.WorkDir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("mesh: %w", err)
	}
	// Not CommandContext: the process outlives Start's context; Close ends it.
	// nsenter, not `ip netns exec`: that one also gives the process a private
	// mount namespace with a fresh /sys, so the bpffs ztunnel pins capture in
	// would die with the process (a DaemonSet mounts the host's /sys/fs/bpf).
	cmd := exec.Command("nsenter", append([]string{"--net=" + ns.Path(), "--", bin}, args...)...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("mesh: start %s: %w", name, err)
	}
	p := &Proc{Name: name, Log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	m.log.Info("started", "component", name, "in", where, "pid", cmd.Process.Pid)
	return p, nil
}

// Kill ends the process with SIGKILL and waits for it.
func (p *Proc) Kill() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
	return nil
}

// Terminate sends SIGTERM (graceful drain) and waits up to timeout, then
// kills.
func (p *Proc) Terminate(timeout time.Duration) error {
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(timeout):
		return p.Kill()
	}
}

// Pid is the process id (nsenter execs the binary, so it is the binary's).
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Tail returns the last n lines of the process's log.
func (p *Proc) Tail(n int) string {
	b, err := os.ReadFile(p.Log)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// AccessLog is one ztunnel access-log line (one per connection; Istio's
// ztunnel's field names, then ambit's: see docs/observability.md).
type AccessLog struct {
	Node         string `json:"node"`
	Direction    string `json:"direction"` // outbound, inbound
	Via          string `json:"via"`       // hbone, plaintext, passthrough, socks5 ...
	Src          string `json:"src.addr"`
	Dst          string `json:"dst.addr"`
	SrcPrincipal string `json:"src.identity"` // mutual TLS only
	DstPrincipal string `json:"dst.identity"`
	SrcWorkload  string `json:"src.workload"` // the pod's name
	SrcNamespace string `json:"src.namespace"`
	DstWorkload  string `json:"dst.workload"`
	DstNamespace string `json:"dst.namespace"`
	Service      string `json:"dst.service"`
	Route        string `json:"route"`
	Transport    string `json:"transport"` // h2 or h3: the HBONE transport
	Upstream     string `json:"upstream"`
	BytesSent    int64  `json:"bytes_sent"`
	BytesRecv    int64  `json:"bytes_recv"`
	Duration     string `json:"duration"`
	Flags        string `json:"response_flags"`
	Policy       string `json:"policy"`
	Outcome      string `json:"outcome"` // ok, denied, failed, aborted
	Reason       string `json:"reason"`
	Err          string `json:"error"`
}

// AccessLogs reads every access-log line that node's ztunnels (this run and
// earlier runs: the log file is appended to) have written.
func (m *Mesh) AccessLogs(node string) ([]AccessLog, error) {
	f, err := os.Open(filepath.Join(m.opts.WorkDir, "ztunnel-"+node+".log"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []AccessLog
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var head struct {
			Msg string `json:"msg"`
		}
		if json.Unmarshal(line, &head) != nil || head.Msg != telemetry.AccessLogMessage {
			continue
		}
		var a AccessLog
		if err := json.Unmarshal(line, &a); err == nil {
			out = append(out, a)
		}
	}
	return out, sc.Err()
}

// Metrics scrapes node's ztunnel metrics (Prometheus text format) and returns
// the samples of metric name whose labels include every pair in match.
func (m *Mesh) Metrics(ctx context.Context, node, name string, match map[string]string) (float64, error) {
	n := m.Topo.Node(node)
	if n == nil {
		return 0, fmt.Errorf("mesh: no node %s", node)
	}
	client := httpClientIn(n.NS, 5*time.Second)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/metrics", model.PortMetrics), nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, fmt.Errorf("metrics on %s: %w", node, err)
	}
	defer resp.Body.Close()
	return sumSamples(resp.Body, name, match)
}

// sumSamples adds up the samples of name in a Prometheus text exposition
// whose labels contain match.
func sumSamples(r io.Reader, name string, match map[string]string) (float64, error) {
	var total float64
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		labels := ""
		if strings.HasPrefix(rest, "{") {
			end := strings.LastIndex(rest, "}")
			if end < 0 {
				continue
			}
			labels, rest = rest[1:end], rest[end+1:]
		} else if !strings.HasPrefix(rest, " ") {
			continue // a longer metric name
		}
		ok := true
		for k, v := range match {
			if !strings.Contains(","+labels+",", ","+k+"="+strconv.Quote(v)+",") {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return 0, fmt.Errorf("metric %s: %w", line, err)
		}
		total += v
	}
	return total, sc.Err()
}

// Close kills every process, removes the eBPF capture of every node and
// deletes the topology. It is safe to call more than once.
func (m *Mesh) Close() error {
	m.mu.Lock()
	procs := []*Proc{m.istiod}
	for _, p := range m.ztunnels {
		procs = append(procs, p)
	}
	for _, p := range m.waypoints {
		procs = append(procs, p)
	}
	m.istiod = nil
	m.ztunnels = map[string]*Proc{}
	m.waypoints = map[string]*Proc{}
	m.mu.Unlock()
	for _, p := range procs {
		if p != nil {
			p.Kill()
		}
	}
	var errs []error
	if m.Topo != nil {
		for _, n := range m.Topo.Nodes {
			if _, err := os.Stat(m.PinPath(n.Name)); err == nil {
				if err := bpf.Uninstall(bpf.Options{PinPath: m.PinPath(n.Name), Netns: n.NS.Path()}); err != nil {
					errs = append(errs, err)
				}
			}
		}
		errs = append(errs, m.Topo.Close())
	}
	return errors.Join(errs...)
}

// httpClientIn returns an HTTP client whose connections are made inside ns
// (a node's localhost-only admin and readiness ports).
func httpClientIn(ns *netns.NS, timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return ns.Dial(ctx, nil, network, addr)
		},
		DisableKeepAlives: true, // a kept-alive socket would outlive the namespace's proxy restarts
	}}
}

func waitTCP(ctx context.Context, ns *netns.NS, addr string, p *Proc) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		c, err := ns.Dial(ctx, &net.Dialer{Timeout: 500 * time.Millisecond}, "tcp", addr)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("exited: %v", p.err)
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", addr, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func waitFile(ctx context.Context, path string, p *Proc) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if st, err := os.Stat(path); err == nil && st.Size() > 0 {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("exited: %v", p.err)
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
