package bench

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/delayline"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// PathQUIC is ambit with HBONE over HTTP/3: client pod -> eBPF capture ->
// ztunnel node1 -(HBONE: mutual TLS 1.3, HTTP/3 CONNECT over QUIC, UDP
// 15008)-> ztunnel node2 -> pod. The same ztunnel binaries as the ambit
// path, run with --hbone-quic; the server pod advertises QUIC (the model's
// quic, what the label ambit.dev/hbone-quic=enabled sets), the ambit path's
// does not, so the ambit path stays on HTTP/2.
const PathQUIC = "quic"

// quicServerPod is the quic path's server pod on node2.
const quicServerPod = "server-quic"

// quicEnv turns QUIC on in the ztunnels (cmd/ztunnel's --hbone-quic).
const quicEnv = "AMBIT_HBONE_QUIC=true"

// LinkCondition is one setting of the delay line between the nodes: a
// delay each way (the round trip is twice it) and a loss each way.
type LinkCondition struct {
	Name  string        `json:"name"`
	Delay time.Duration `json:"delay"`
	Loss  float64       `json:"loss"`
}

// LinkConditions are the conditions the transports are compared under.
// "0 ms" is the delay line with no delay: the line's own cost (offloads
// off, every frame copied through user space), against which the others
// compare.
var LinkConditions = []LinkCondition{
	{Name: "0 ms", Delay: 0},
	{Name: "1 ms", Delay: time.Millisecond},
	{Name: "10 ms", Delay: 10 * time.Millisecond},
	{Name: "1 ms + 1% loss", Delay: time.Millisecond, Loss: 0.01},
}

// transportQPS is the request rate of the latency runs across the delay
// line: one connection, well under one request per round trip at 10 ms.
const transportQPS = 20

// TransportRun is one transport (the ambit path over HTTP/2, the quic path
// over HTTP/3) under one link condition.
type TransportRun struct {
	Condition string  `json:"condition"`
	DelayMs   float64 `json:"delayMsEachWay"`
	Loss      float64 `json:"loss"`
	Path      string  `json:"path"`
	Transport string  `json:"transport"` // h2 or h3
	// Throughput: iperf3, one connection, through the ztunnels.
	Gbps            float64 `json:"gbps"`
	CPUSecondsPerGB float64 `json:"cpuSecondsPerGB"`
	// Requests: fortio, one keep-alive connection at transportQPS, through
	// the ztunnels (the tunnel is already up).
	Requests      int64   `json:"requests"`
	RequestErrors int64   `json:"requestErrors"`
	RequestP50Ms  float64 `json:"requestP50Ms"`
	RequestP99Ms  float64 `json:"requestP99Ms"`
	// NewTunnelMs are the setup times of fresh tunnels (full handshake, no
	// resumption) from node1 to node2's ztunnel, until the CONNECT is
	// answered: TCP + TLS + HTTP/2 (3 round trips) or QUIC + HTTP/3 (2).
	NewTunnelMs    []float64 `json:"newTunnelMs"`
	NewTunnelP50Ms float64   `json:"newTunnelP50Ms"`
	NewTunnelMaxMs float64   `json:"newTunnelMaxMs"`
	Errors         []string  `json:"errors,omitempty"`
	LoadAvg        float64   `json:"loadavg"`
}

// hboneOpenedH3 sums ambit_hbone_connections_opened_total{transport="h3"}
// of the ztunnel in ns: the proof the quic path went over QUIC.
func hboneOpenedH3(ctx context.Context, ns *netns.NS) (float64, error) {
	const name = "ambit_hbone_connections_opened_total"
	code, body, err := httpGet(ctx, ns, "http://127.0.0.1:15020/metrics")
	if err != nil {
		return 0, err
	}
	if code != 200 {
		return 0, fmt.Errorf("metrics: status %d", code)
	}
	var sum float64
	for _, line := range strings.Split(body, "\n") {
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, `transport="h3"`) {
			continue
		}
		var v float64
		fs := strings.Fields(line)
		if _, err := fmt.Sscan(fs[len(fs)-1], &v); err == nil {
			sum += v
		}
	}
	return sum, nil
}

// measureTransports puts the delay line in front of node2 and, under each
// of LinkConditions, measures the ambit (HTTP/2) and quic (HTTP/3) paths
// side by side. The line stays off the other measurements: it turns the
// uplinks' offloads off, so this runs last.
func measureTransports(ctx context.Context, cfg Config, tools *Tools, work string, topo *netns.Topology, ca *certs.CA, h2p, h3p *path) ([]TransportRun, error) {
	log := cfg.Logger
	n1, n2 := topo.Node("node1"), topo.Node("node2")
	line, err := delayline.Insert(topo, n2, delayline.Config{}, 0)
	if err != nil {
		return nil, err
	}
	defer line.Close()
	td := identity.DefaultTrustDomain
	client, err := identity.Workload(td, "bench", "client-mesh")
	if err != nil {
		return nil, err
	}
	mgr := &certs.Manager{Issuer: ca}
	defer mgr.Close()
	mgr.SetIdentities([]spiffeid.ID{client})
	tunnels := 20
	if cfg.Rounds <= 1 {
		tunnels = 8
	}
	lat := cfg
	lat.QPS = transportQPS
	var out []TransportRun
	for i, lc := range LinkConditions {
		line.Set(delayline.Config{Delay: lc.Delay, Loss: lc.Loss})
		// Warm up both tunnels under the new condition (unmeasured): the
		// pooled connections' congestion state is the condition's, not the
		// previous one's or the line's insertion's.
		for _, p := range []*path{h2p, h3p} {
			if _, err := runIperf(ctx, cfg.Nice, tools.Iperf3, p.client.NS, p.iperfHost, p.iperfPort, time.Second); err != nil {
				log.Warn("warm-up", "condition", lc.Name, "path", p.name, "err", err)
			}
		}
		paths := []*path{h2p, h3p}
		if i%2 == 1 {
			paths = []*path{h3p, h2p} // alternate which goes first
		}
		runs := map[string]*TransportRun{}
		for _, p := range paths {
			tr := &TransportRun{Condition: lc.Name, DelayMs: float64(lc.Delay) / 1e6, Loss: lc.Loss, Path: p.name,
				Transport: map[string]string{PathAmbit: "h2", PathQUIC: "h3"}[p.name], LoadAvg: loadAvg()}
			runs[p.name] = tr
			r := runOne(ctx, cfg, tools, work, p, WorkThroughput, 1)
			tr.Gbps = r.Gbps
			if r.Bytes > 0 {
				var cpu float64
				for _, u := range r.Proxies {
					cpu += u.CPUSeconds
				}
				tr.CPUSecondsPerGB = cpu / (r.Bytes / 1e9)
			}
			if r.Error != "" {
				tr.Errors = append(tr.Errors, "throughput: "+r.Error)
			}
			r = runOne(ctx, lat, tools, work, p, WorkLatency, 1)
			tr.Requests, tr.RequestErrors = r.Requests, r.Errors
			tr.RequestP50Ms, tr.RequestP99Ms = r.FortioPercentilesMs["p50"], r.FortioPercentilesMs["p99"]
			if r.Error != "" {
				tr.Errors = append(tr.Errors, "latency: "+r.Error)
			}
			log.Info("transport run", "condition", lc.Name, "path", p.name, "gbps", tr.Gbps, "cpuPerGB", tr.CPUSecondsPerGB,
				"p50ms", tr.RequestP50Ms, "p99ms", tr.RequestP99Ms, "errors", tr.Errors)
		}
		// New tunnels, alternating transports.
		for range tunnels {
			for _, p := range paths {
				tr := runs[p.name]
				server, err := identity.Workload(td, "bench", serverPods[p.name])
				if err != nil {
					return out, err
				}
				ms, err := newTunnel(ctx, n1.NS, mgr, client, server, netip.MustParseAddr(p.iperfHost), tr.Transport == "h3")
				if err != nil {
					tr.Errors = append(tr.Errors, "new tunnel: "+err.Error())
					continue
				}
				tr.NewTunnelMs = append(tr.NewTunnelMs, ms)
			}
		}
		for _, p := range []*path{h2p, h3p} {
			tr := runs[p.name]
			if len(tr.NewTunnelMs) > 0 {
				tr.NewTunnelP50Ms, tr.NewTunnelMaxMs = median(tr.NewTunnelMs), slices.Max(tr.NewTunnelMs)
			}
			log.Info("new tunnels", "condition", lc.Name, "path", p.name, "p50ms", tr.NewTunnelP50Ms, "maxms", tr.NewTunnelMaxMs)
			out = append(out, *tr)
		}
		if err := ctx.Err(); err != nil {
			return out, err
		}
	}
	st := line.Stats()
	log.Info("delay line", "forwarded", st.Forwarded, "lost", st.Lost, "overflow", st.Overflow)
	return out, nil
}

// serverPods are the server pods of the ambit and quic paths.
var serverPods = map[string]string{PathAmbit: "server-mesh", PathQUIC: quicServerPod}

// newTunnel opens one fresh tunnel from ns to the ztunnel serving dst (its
// pod IP, port 15008: node2's capture steers it to the ztunnel) with a new
// dialer, so no pooled connection nor session ticket is reused, and
// returns the time until the CONNECT was answered, in ms. server is the
// identity the destination ztunnel presents for dst.
func newTunnel(ctx context.Context, ns *netns.NS, cs hbone.CertSource, client, server spiffeid.ID, dst netip.Addr, quic bool) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req := hbone.DialRequest{Source: client, Peers: []spiffeid.ID{server},
		Addr: netip.AddrPortFrom(dst, 15008), Target: netip.AddrPortFrom(dst, fortioPort)}
	type dialer interface {
		Dial(ctx context.Context, r hbone.DialRequest) (*hbone.Stream, error)
		Close() error
	}
	var d dialer
	if quic {
		d = &h3.Dialer{Certs: cs, ListenPacket: func(ctx context.Context, network, addr string) (net.PacketConn, error) {
			var pc net.PacketConn
			err := ns.Do(func() error {
				var err error
				pc, err = (&net.ListenConfig{}).ListenPacket(ctx, network, addr)
				return err
			})
			return pc, err
		}}
	} else {
		d = &hbone.Dialer{Certs: cs, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return ns.Dial(ctx, nil, network, addr)
		}}
	}
	defer d.Close()
	t0 := time.Now()
	st, err := d.Dial(ctx, req)
	if err != nil {
		return 0, err
	}
	ms := float64(time.Since(t0).Microseconds()) / 1000
	st.Close()
	return ms, nil
}

// transportsMarkdown is the report's section comparing the transports.
func (r *Results) transportsMarkdown(w func(format string, a ...any)) {
	if len(r.Transports) == 0 && r.TransportsError == "" {
		return
	}
	w("## HBONE over QUIC (h3) vs HTTP/2 (h2) across a delay line\n\n")
	w("The ambit path (HTTP/2) and the quic path (HTTP/3) through the same ztunnel binaries (`--hbone-quic`; only the quic path's server pod advertises QUIC), ")
	w("with integration/delayline (an AF_PACKET forwarder; offloads off, every frame copied through user space) in front of node2: the delay and loss apply each way. ")
	w("Throughput: iperf3, one connection; CPU: both ztunnels. Requests: fortio, %d-byte POST, one keep-alive connection at %d req/s. ", r.Config.PayloadBytes, transportQPS)
	w("New tunnel: a fresh in-process dialer in node1's namespace to node2's ztunnel (full handshake, no resumption, no 0-RTT) until the CONNECT is answered; median and max of the samples.\n\n")
	if r.TransportsError != "" {
		w("Not complete: %s\n\n", oneLine(r.TransportsError))
	}
	w("| condition | transport | Gbit/s | CPU s/GB | request p50 (ms) | request p99 (ms) | new tunnel p50 (ms) | new tunnel max (ms) | errors |\n")
	w("|---|---|---:|---:|---:|---:|---:|---:|---|\n")
	f := func(v float64) string {
		if v == 0 || math.IsNaN(v) {
			return "—"
		}
		return fmt.Sprintf("%.3g", v)
	}
	for _, t := range r.Transports {
		errs := "—"
		if n := len(t.Errors) + int(t.RequestErrors); n > 0 {
			errs = fmt.Sprintf("%d", n)
			if len(t.Errors) > 0 {
				errs += ": " + oneLine(t.Errors[0])
			}
		}
		w("| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", t.Condition, t.Transport, f(t.Gbps), f(t.CPUSecondsPerGB),
			f(t.RequestP50Ms), f(t.RequestP99Ms), f(t.NewTunnelP50Ms), f(t.NewTunnelMaxMs), errs)
	}
	w("\n")
}

// quicPath makes p go through the ztunnels z: their CPU is measured, and
// its connections count only when they went over QUIC.
func quicPath(p *path, z *ztunnelPair) {
	p.procs = z.procs()
	p.counted = func(ctx context.Context) (float64, error) {
		var sum float64
		for _, n := range z.nodes {
			v, err := hboneOpenedH3(ctx, n.NS)
			if err != nil {
				return 0, err
			}
			sum += v
		}
		return sum, nil
	}
}
