// Package bench is ambit's end-to-end benchmark harness (make bench). On a
// network-namespace topology of two nodes it measures three paths between a
// client pod on node1 and a server pod on node2, in interleaved rounds:
//
//	direct   pod to pod, nothing in between (the limit)
//	haproxy  client pod -> HAProxy on node1 -(mutual TLS 1.3)-> HAProxy on node2 -> pod
//	ambit    client pod -> eBPF capture -> ztunnel node1 -(HBONE: mutual TLS,
//	         HTTP/2 CONNECT)-> ztunnel node2 -> pod
//	quic     the same over HTTP/3 (QUIC, UDP 15008) to a pod advertising it;
//	         it also compares both transports across a delay line (quic.go)
//
// and, for the waypoint (L7) comparison, three HTTP proxies each in its own
// pod on node2 (see l7.go): ambit's waypoint (client -> ztunnel -> waypoint
// -> ztunnel -> server), nginx and HAProxy in HTTP mode.
//
// Each round runs, for every path in turn: single-connection throughput
// (iperf3), latency of 1 KB HTTP/1.1 requests at a fixed rate over 1 and 64
// connections (fortio), and new connections per second (fortio without
// keep-alive). The proxies' CPU time and memory come from /proc. Report
// writes latest.json, latest.md and PNG latency plots.
package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// Path names.
const (
	PathDirect  = "direct"
	PathHAProxy = "haproxy"
	PathAmbit   = "ambit"
)

// Workload names.
const (
	WorkThroughput = "throughput"
	WorkLatency    = "latency"
	WorkConnRate   = "connrate"
)

// Config is one benchmark run. The zero value of every field but RepoDir
// means its default.
type Config struct {
	// RepoDir is the module root, where ./cmd/ztunnel is built from.
	RepoDir string
	// WorkDir holds configs, certificates and logs (a temporary directory
	// if empty; kept when KeepWork is set).
	WorkDir  string
	KeepWork bool
	// CacheDir keeps the fortio build (CacheDir() if empty).
	CacheDir string
	// Paths to measure (all seven if empty: direct, haproxy, ambit, quic
	// and the L7 paths waypoint, nginx, haproxy-http). With both ambit and
	// quic, the transports are also compared across a delay line (quic.go).
	Paths []string
	// Rounds of every workload on every path (3).
	Rounds int
	// QPS is the fixed request rate of the latency runs (1000).
	QPS int
	// Connections are the latency runs' connection counts (1 and 64).
	Connections []int
	// Payload is the request and response body size of the latency runs (1024).
	Payload int
	// LatencyTime, ThroughputTime and ConnRateTime are the lengths of one
	// run (10s, 5s, 3s).
	LatencyTime, ThroughputTime, ConnRateTime time.Duration
	// ConnRateConns is the concurrency of the new-connection runs (4).
	ConnRateConns int
	// Nice is the niceness of every process the harness starts (servers,
	// proxies, clients): below 0 shields the measurement from other work
	// on a shared machine, the same for every path. 0 leaves it alone.
	Nice int
	// ZtunnelEnv are extra environment variables (KEY=value) for the
	// ztunnels, e.g. Go runtime settings such as GOMAXPROCS or GOMEMLIMIT.
	ZtunnelEnv []string
	// ProfileDir, if set, is where CPU and heap profiles of the ztunnels
	// are written, taken during extra, unmeasured runs after the rounds
	// with a build of ztunnel that serves net/http/pprof.
	ProfileDir string
	// Logger receives progress; nil discards it.
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if len(c.Paths) == 0 {
		c.Paths = []string{PathDirect, PathHAProxy, PathAmbit, PathQUIC, PathWaypoint, PathNginx, PathHAProxyHTTP}
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.Rounds, 3)
	def(&c.QPS, 1000)
	def(&c.Payload, 1024)
	def(&c.ConnRateConns, 4)
	if len(c.Connections) == 0 {
		c.Connections = []int{1, 64}
	}
	defd(&c.LatencyTime, 10*time.Second)
	defd(&c.ThroughputTime, 5*time.Second)
	defd(&c.ConnRateTime, 3*time.Second)
	if c.CacheDir == "" {
		c.CacheDir = CacheDir()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Run is one workload on one path in one round.
type Run struct {
	Round       int     `json:"round"`
	Path        string  `json:"path"`
	Workload    string  `json:"workload"`
	Connections int     `json:"connections"`
	Seconds     float64 `json:"seconds"`
	// Throughput runs.
	Bytes float64 `json:"bytes,omitempty"`
	Gbps  float64 `json:"gbps,omitempty"`
	// Latency and connection-rate runs.
	RequestedQPS float64 `json:"requestedQps,omitempty"`
	ActualQPS    float64 `json:"actualQps,omitempty"`
	Requests     int64   `json:"requests,omitempty"`
	Errors       int64   `json:"errors,omitempty"`
	// FortioPercentilesMs are fortio's own per-run percentiles.
	FortioPercentilesMs map[string]float64 `json:"fortioPercentilesMs,omitempty"`
	MinSeconds          float64            `json:"minSeconds,omitempty"`
	MaxSeconds          float64            `json:"maxSeconds,omitempty"`
	Histogram           []Bucket           `json:"histogram,omitempty"`
	// Proxies is each proxy process's usage during the run.
	Proxies []ProxyUsage `json:"proxies,omitempty"`
	// ZtunnelConnections is how many connections the ztunnels counted
	// (istio_tcp_connections_opened_total) during an ambit run: the proof
	// the traffic went through them.
	ZtunnelConnections float64 `json:"ztunnelConnections,omitempty"`
	// WaypointRequests is how many requests the waypoint counted
	// (istio_requests_total) during a waypoint run.
	WaypointRequests float64 `json:"waypointRequests,omitempty"`
	Error            string  `json:"error,omitempty"`
	// LoadAvg is the machine's 1-minute load average when the run started.
	LoadAvg float64 `json:"loadavg"`
}

// path is one way from a client pod to a server pod.
type path struct {
	name      string
	client    *netns.Pod
	httpURL   string
	iperfHost string
	iperfPort int
	procs     []*process // the proxies, measured
	// counted, if set, returns the connections the proxies have counted.
	counted func(ctx context.Context) (float64, error)
	err     error // why the path is not measured
}

// Measure builds the topology, runs every workload on every path and
// returns the raw results. It cleans up everything it started.
func Measure(ctx context.Context, cfg Config) (_ *Results, err error) {
	cfg.setDefaults()
	log := cfg.Logger
	res := &Results{Config: cfg.public(), Started: time.Now().UTC(), NotMeasured: map[string]string{}}
	res.Machine = machineInfo()

	work := cfg.WorkDir
	if work == "" {
		if work, err = os.MkdirTemp("", "ambit-bench-"); err != nil {
			return nil, fmt.Errorf("work dir: %w", err)
		}
		if !cfg.KeepWork {
			defer os.RemoveAll(work)
		}
	} else if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, fmt.Errorf("work dir: %w", err)
	}
	tools, err := findTools(ctx, cfg.RepoDir, cfg.CacheDir, work, log)
	if err != nil {
		return nil, err
	}
	res.Tools = tools.Versions

	// Topology: node1 holds the client pods, node2 the server pods; the
	// "mesh" pods are enrolled in ambit, the "plain" ones are not (so the
	// direct and HAProxy paths are not captured).
	prefix := fmt.Sprintf("ab%d", os.Getpid()%100000)
	log.Info("building topology", "prefix", prefix)
	node2Pods := []string{"server-plain", "server-mesh"}
	for _, p := range cfg.Paths {
		if pod := l7Pods[p]; pod != "" {
			node2Pods = append(node2Pods, pod) // the L7 proxies' own pods
		}
		if p == PathQUIC {
			node2Pods = append(node2Pods, quicServerPod)
		}
		if p == PathWaypoint {
			// The waypoint's server: a pod behind a waypoint-bound service
			// accepts only the waypoint, so not server-mesh (the ambit path's).
			node2Pods = append(node2Pods, waypointServerPod)
		}
	}
	topo, err := netns.Build(netns.Config{Prefix: prefix, Nodes: []netns.NodeConfig{
		{Name: "node1", Pods: []string{"client-plain", "client-mesh"}},
		{Name: "node2", Pods: node2Pods},
	}})
	if err != nil {
		return nil, fmt.Errorf("topology: %w", err)
	}
	defer topo.Close()
	n1, n2 := topo.Node("node1"), topo.Node("node2")
	cp, cm, sp, sm := topo.Pod("client-plain"), topo.Pod("client-mesh"), topo.Pod("server-plain"), topo.Pod("server-mesh")
	// Many short connections per run: let clients reuse TIME_WAIT ports.
	for _, ns := range []*netns.NS{cp.NS, cm.NS, n1.NS, n2.NS} {
		if err := errors.Join(ns.Sysctl("net.ipv4.ip_local_port_range", "1024 65000"), ns.Sysctl("net.ipv4.tcp_tw_reuse", "1")); err != nil {
			return nil, err
		}
	}

	var stops []func()
	defer func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}()
	servers := []*netns.Pod{sp, sm}
	if pod := topo.Pod(waypointServerPod); pod != nil {
		servers = append(servers, pod)
	}
	if pod := topo.Pod(quicServerPod); pod != nil {
		servers = append(servers, pod)
	}
	for _, pod := range servers {
		ps, err := startServers(cfg.Nice, tools.Fortio, tools.Iperf3, work, pod)
		if err != nil {
			return nil, err
		}
		stops = append(stops, func() {
			for _, p := range ps {
				p.stop(2 * time.Second)
			}
		})
		for _, port := range []int{fortioPort, iperfPort} {
			if err := waitListening(ctx, n2.NS, netip.AddrPortFrom(pod.IP, uint16(port))); err != nil {
				return nil, fmt.Errorf("server in %s: %w", pod.Name, err)
			}
		}
	}

	// One CA for both proxies: ztunnels load it from caDir, HAProxy gets
	// certificates it issued.
	td := spiffeid.RequireTrustDomainFromString(identity.DefaultTrustDomain.Name())
	caDir := filepath.Join(work, "ca")
	ca, err := certs.LoadOrCreateCA(ctx, certs.FileStore{Dir: caDir}, td, certs.Options{}, log)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}

	url := func(host string, port int) string {
		return "http://" + net.JoinHostPort(host, strconv.Itoa(port)) + "/echo"
	}
	paths := map[string]*path{
		PathDirect: {name: PathDirect, client: cp, httpURL: url(sp.IP.String(), fortioPort), iperfHost: sp.IP.String(), iperfPort: iperfPort},
		PathHAProxy: {name: PathHAProxy, client: cp, httpURL: url(n1.IP.String(), haFortioPort),
			iperfHost: n1.IP.String(), iperfPort: haIperfPort},
		PathAmbit: {name: PathAmbit, client: cm, httpURL: url(sm.IP.String(), fortioPort), iperfHost: sm.IP.String(), iperfPort: iperfPort},
		PathQUIC:  {name: PathQUIC, client: cm},
		// The L7 paths carry HTTP only (no iperf3).
		PathWaypoint:    {name: PathWaypoint, client: cm, httpURL: url(serverVIP.String(), fortioPort)},
		PathNginx:       {name: PathNginx, client: cp},
		PathHAProxyHTTP: {name: PathHAProxyHTTP, client: cp},
	}
	if pod := topo.Pod(quicServerPod); pod != nil {
		paths[PathQUIC].httpURL, paths[PathQUIC].iperfHost, paths[PathQUIC].iperfPort = url(pod.IP.String(), fortioPort), pod.IP.String(), iperfPort
	}
	for _, name := range []string{PathNginx, PathHAProxyHTTP} {
		if pod := topo.Pod(l7Pods[name]); pod != nil {
			paths[name].httpURL = url(pod.IP.String(), l7ProxyPort)
		}
	}
	want := map[string]bool{}
	for _, p := range cfg.Paths {
		if paths[p] == nil {
			return nil, fmt.Errorf("unknown path %q (want %s, %s, %s, %s, %s, %s or %s)", p, PathDirect, PathHAProxy, PathAmbit, PathQUIC, PathWaypoint, PathNginx, PathHAProxyHTTP)
		}
		want[p] = true
	}

	if want[PathHAProxy] {
		hdir := filepath.Join(work, "haproxy")
		if err := os.MkdirAll(hdir, 0o755); err != nil {
			return nil, err
		}
		hp, err := startHAProxy(cfg.Nice, tools.HAProxy, hdir, ca, n1, n2, sp)
		if err != nil {
			return nil, err
		}
		stops = append(stops, hp.stop)
		paths[PathHAProxy].procs = hp.procs()
		for _, a := range []netip.AddrPort{netip.AddrPortFrom(n1.IP, haFortioPort), netip.AddrPortFrom(n1.IP, haIperfPort)} {
			if err := waitListening(ctx, cp.NS, a); err != nil {
				return nil, fmt.Errorf("haproxy: %w: %s", err, hp.client.tail())
			}
		}
	}
	upstream := netip.AddrPortFrom(sp.IP, fortioPort)
	if want[PathNginx] {
		p := paths[PathNginx]
		if tools.NginxErr != nil {
			p.err = fmt.Errorf("%w: %w", errNotMeasured, tools.NginxErr)
		} else if pr, err := startNginx(ctx, cfg.Nice, tools.Nginx, filepath.Join(work, "nginx"), topo.Pod(l7Pods[PathNginx]), upstream); err != nil {
			p.err = fmt.Errorf("%w: %w", errNotMeasured, err)
		} else {
			stops = append(stops, func() { pr.stop(3 * time.Second) })
			p.procs = []*process{pr}
		}
	}
	if want[PathHAProxyHTTP] {
		p := paths[PathHAProxyHTTP]
		if pr, err := startHAProxyHTTP(ctx, cfg.Nice, tools.HAProxy, filepath.Join(work, "haproxy-http"), topo.Pod(l7Pods[PathHAProxyHTTP]), upstream); err != nil {
			p.err = fmt.Errorf("%w: %w", errNotMeasured, err)
		} else {
			stops = append(stops, func() { pr.stop(3 * time.Second) })
			p.procs = []*process{pr}
		}
	}
	var wpPod *netns.Pod
	if want[PathWaypoint] {
		wpPod = topo.Pod(l7Pods[PathWaypoint])
	}
	var zt *ztunnelPair
	enrolled := map[string]bool{cm.Name: true, sm.Name: true, waypointServerPod: true, quicServerPod: true}
	pinPrefix := "/sys/fs/bpf/ambit-" + prefix
	ztEnv := cfg.ZtunnelEnv
	if want[PathQUIC] {
		ztEnv = append(slices.Clone(ztEnv), quicEnv)
	}
	if want[PathAmbit] || want[PathWaypoint] || want[PathQUIC] {
		p := paths[PathAmbit]
		if tools.ZtunnelErr != nil {
			p.err = fmt.Errorf("%w: %w", errNotMeasured, tools.ZtunnelErr)
			paths[PathWaypoint].err = p.err
			paths[PathQUIC].err = p.err
		} else {
			zdir := filepath.Join(work, "ztunnel")
			if err := os.MkdirAll(zdir, 0o755); err != nil {
				return nil, err
			}
			z, err := startZtunnels(ctx, cfg.Nice, ztEnv, tools.Ztunnel, zdir, caDir, pinPrefix, topo, enrolled, wpPod)
			zt = z
			if z != nil {
				stops = append(stops, z.stop)
			}
			if err != nil {
				p.err = fmt.Errorf("%w: ztunnel did not start: %w", errNotMeasured, err)
				paths[PathWaypoint].err = p.err
				paths[PathQUIC].err = p.err
			} else {
				p.procs = z.procs()
				quicPath(paths[PathQUIC], z)
				p.counted = func(ctx context.Context) (float64, error) {
					var sum float64
					for _, n := range z.nodes {
						v, err := connectionsOpened(ctx, n.NS)
						if err != nil {
							return 0, err
						}
						sum += v
					}
					return sum, nil
				}
			}
		}
	}

	if wp := paths[PathWaypoint]; want[PathWaypoint] && wp.err == nil {
		wp.err = startWaypointPath(ctx, cfg, work, caDir, topo, enrolled, wpPod, zt, wp, &stops)
	}

	// Smoke test every path; a path that fails is reported, not measured.
	var active []*path
	for _, name := range cfg.Paths {
		p := paths[name]
		if p.err == nil {
			p.err = smoke(ctx, cfg.Nice, tools, work, p)
		}
		if p.err != nil {
			log.Warn("path not measured", "path", name, "err", p.err)
			res.NotMeasured[name] = strings.TrimPrefix(p.err.Error(), errNotMeasured.Error()+": ")
			continue
		}
		active = append(active, p)
	}
	if len(active) == 0 {
		return res, errors.New("no path could be measured")
	}

	type work_ struct {
		kind  string
		conns int
	}
	works := []work_{{WorkThroughput, 1}}
	for _, c := range cfg.Connections {
		works = append(works, work_{WorkLatency, c})
	}
	works = append(works, work_{WorkConnRate, cfg.ConnRateConns})
	if slices.ContainsFunc(active, func(p *path) bool { return isL7(p.name) }) {
		works = append(works, work_{WorkHTTPThroughput, httpThroughputConns})
	}
	for round := 1; round <= cfg.Rounds; round++ {
		for _, w := range works {
			// Interleave: every path runs this workload before the next
			// workload starts, and the order rotates each round.
			for i := range active {
				p := active[(i+round-1)%len(active)]
				if err := ctx.Err(); err != nil {
					return res, err
				}
				if !runs(p.name, w.kind) {
					continue
				}
				r := runOne(ctx, cfg, tools, work, p, w.kind, w.conns)
				r.Round = round
				log.Info("run", "round", round, "path", p.name, "workload", w.kind, "conns", w.conns,
					"gbps", r.Gbps, "qps", r.ActualQPS, "p99ms", r.FortioPercentilesMs["p99"], "err", r.Error)
				res.Runs = append(res.Runs, r)
			}
		}
	}
	// Peak RSS over the whole run, before the processes go away.
	res.PeakRSS = map[string]int64{}
	for _, p := range active {
		for _, pr := range p.procs {
			if _, hwm, err := pr.mem(); err == nil {
				res.PeakRSS[pr.Name] = hwm
			}
		}
	}
	res.Finished = time.Now().UTC()
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		res.Machine["loadavgAtEnd"] = strings.Join(strings.Fields(string(b))[:3], " ")
	}

	if amb := paths[PathAmbit]; cfg.ProfileDir != "" && slices.Contains(active, amb) {
		log.Info("profiling the ztunnels (extra runs, not part of the results)")
		// Restart the ztunnels with the profiling build; capture stays
		// pinned in between, as in a ztunnel upgrade.
		pdir := filepath.Join(work, "ztunnel-pprof")
		bin, err := buildProfilingZtunnel(ctx, cfg.RepoDir, work)
		if err == nil {
			zt.stop()
			if err = os.MkdirAll(pdir, 0o755); err == nil {
				var z *ztunnelPair
				z, err = startZtunnels(ctx, cfg.Nice, ztEnv, bin, pdir, caDir, pinPrefix, topo, enrolled, wpPod)
				if z != nil {
					stops = append(stops, z.stop)
				}
				if err == nil {
					amb.procs = z.procs()
					quicPath(paths[PathQUIC], z)
					for _, w := range []struct {
						kind  string
						conns int
					}{{WorkLatency, slices.Max(cfg.Connections)}, {WorkThroughput, 1}} {
						var profs []Profile
						profs, err = profileRun(ctx, cfg, tools, work, cfg.ProfileDir, bin, z.nodes, amb, w.kind, w.conns)
						res.Profiles = append(res.Profiles, profs...)
						if err != nil {
							break
						}
					}
				}
			}
		}
		if err != nil {
			log.Warn("profiling failed", "err", err)
			res.ProfileError = err.Error()
		}
	}
	if amb, q := paths[PathAmbit], paths[PathQUIC]; slices.Contains(active, amb) && slices.Contains(active, q) {
		log.Info("comparing HTTP/2 and HTTP/3 across the delay line")
		res.Transports, err = measureTransports(ctx, cfg, tools, work, topo, ca, amb, q)
		if err != nil {
			log.Warn("transport comparison incomplete", "err", err)
			res.TransportsError = err.Error()
		}
	}
	return res, nil
}

// smoke sends a few requests over p and checks that they are answered (and,
// for ambit, counted by the ztunnels).
func smoke(ctx context.Context, niceness int, tools *Tools, work string, p *path) error {
	var before float64
	if p.counted != nil {
		var err error
		if before, err = p.counted(ctx); err != nil {
			return fmt.Errorf("%w: ztunnel metrics: %w", errNotMeasured, err)
		}
	}
	r, err := runFortio(ctx, niceness, tools.Fortio, p.client.NS, filepath.Join(work, "smoke-"+p.name+".json"),
		"-qps", "0", "-n", "20", "-c", "1", "-payload-size", "1024", p.httpURL)
	if err != nil {
		return fmt.Errorf("%w: smoke test: %w", errNotMeasured, err)
	}
	if ok, errs := r.ok(); errs > 0 || ok == 0 {
		return fmt.Errorf("%w: smoke test: %d of %d requests failed (%v)", errNotMeasured, errs, ok+errs, r.RetCodes)
	}
	if p.counted != nil {
		after, err := p.counted(ctx)
		if err != nil {
			return fmt.Errorf("%w: ztunnel metrics: %w", errNotMeasured, err)
		}
		if after <= before {
			return fmt.Errorf("%w: requests were answered but the proxies counted nothing (%s): traffic not captured", errNotMeasured, p.name)
		}
	}
	return nil
}

// runOne runs one workload on one path, measuring its proxies.
func runOne(ctx context.Context, cfg Config, tools *Tools, work string, p *path, kind string, conns int) Run {
	r := Run{Path: p.name, Workload: kind, Connections: conns, LoadAvg: loadAvg()}
	var before float64
	if p.counted != nil {
		before, _ = p.counted(ctx)
	}
	m := meter(p.procs)
	t0 := time.Now()
	var err error
	switch kind {
	case WorkThroughput:
		var ir *iperfResult
		if ir, err = runIperf(ctx, cfg.Nice, tools.Iperf3, p.client.NS, p.iperfHost, p.iperfPort, cfg.ThroughputTime); err == nil {
			r.Bytes = ir.End.SumReceived.Bytes
			r.Gbps = ir.End.SumReceived.BitsPerSecond / 1e9
		}
	case WorkLatency, WorkConnRate, WorkHTTPThroughput:
		args := []string{"-c", strconv.Itoa(conns)}
		switch kind {
		case WorkLatency:
			args = append(args, "-qps", strconv.Itoa(cfg.QPS), "-uniform", "-t", cfg.LatencyTime.String(), "-payload-size", strconv.Itoa(cfg.Payload))
			r.RequestedQPS = float64(cfg.QPS)
		case WorkHTTPThroughput:
			args = append(args, "-qps", "0", "-t", cfg.ThroughputTime.String(), "-payload-size", strconv.Itoa(cfg.Payload))
		default:
			args = append(args, "-qps", "-1", "-keepalive=false", "-t", cfg.ConnRateTime.String())
		}
		var fr *fortioResult
		jsonPath := filepath.Join(work, fmt.Sprintf("%s-%s-c%d.json", p.name, kind, conns))
		if fr, err = runFortio(ctx, cfg.Nice, tools.Fortio, p.client.NS, jsonPath, append(args, p.httpURL)...); err == nil {
			ok, errs := fr.ok()
			r.Requests, r.Errors = ok, errs+fr.ErrorsDurationHistogram.Count
			r.ActualQPS = fr.ActualQPS
			r.MinSeconds, r.MaxSeconds = fr.DurationHistogram.Min, fr.DurationHistogram.Max
			r.FortioPercentilesMs = map[string]float64{}
			for _, pc := range fr.DurationHistogram.Percentiles {
				r.FortioPercentilesMs["p"+strconv.FormatFloat(pc.Percentile, 'f', -1, 64)] = pc.Value * 1e3
			}
			if kind == WorkLatency {
				r.Histogram = fr.DurationHistogram.Data
			}
		}
	}
	r.Seconds = time.Since(t0).Seconds()
	r.Proxies = m.stop()
	if err != nil {
		r.Error = err.Error()
	}
	if p.counted != nil {
		if after, cerr := p.counted(ctx); cerr == nil {
			if p.name == PathWaypoint {
				r.WaypointRequests = after - before
			} else {
				r.ZtunnelConnections = after - before
			}
		}
	}
	return r
}

// waitListening dials addr from ns until it connects (10s at most).
func waitListening(ctx context.Context, ns *netns.NS, addr netip.AddrPort) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := ns.Dial(ctx, &net.Dialer{Timeout: time.Second}, "tcp", addr.String())
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listening on %s: %w", addr, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// loadAvg is the 1-minute load average (0 if unknown).
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// machineInfo describes where the numbers were taken.
func machineInfo() map[string]string {
	m := map[string]string{"cpus": strconv.Itoa(runtime.NumCPU()), "goarch": runtime.GOARCH}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu"] = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		m["loadavgAtStart"] = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	return m
}
