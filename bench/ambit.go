package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ambit-mesh/ambit/bpf"
	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/model"
)

// ztunnelPair is the ambit path: the real ztunnel binary in each node's
// namespace, with its eBPF capture and local-mode config naming the pods.
type ztunnelPair struct {
	procs_ []*process
	nodes  []*netns.Node
	pins   []string
}

// startZtunnels writes the local-mode config (the mesh pods enrolled, the
// plain ones not) and starts one ztunnel per node, one after the other (the
// first creates the CA in caDir, the second loads it).
func startZtunnels(ctx context.Context, niceness int, env []string, bin, dir, caDir, pinPrefix string, topo *netns.Topology, enrolled map[string]bool, waypoint *netns.Pod) (*ztunnelPair, error) {
	var y strings.Builder
	y.WriteString("workloads:\n")
	for _, n := range topo.Nodes {
		for _, p := range n.Pods {
			if p == waypoint {
				continue // below, with its service account
			}
			fmt.Fprintf(&y, "- {uid: bench/Pod/bench/%[1]s, name: %[1]s, namespace: bench, serviceAccount: %[1]s, node: %[2]s, addresses: [%[3]s], enrolled: %[4]v, ready: true, labels: {app: %[1]s}, quic: %[5]v}\n",
				p.Name, n.Name, p.IP, enrolled[p.Name], p.Name == quicServerPod)
		}
	}
	if waypoint != nil {
		// The waypoint path: its pod, and the service bound to it (see
		// benchModel, which the waypoint's own config is built from).
		ws, svcs := benchModel(topo, enrolled, waypoint)
		var rest []*model.Workload
		for _, w := range ws {
			if w.Name == waypoint.Name {
				rest = append(rest, w)
			}
		}
		b, err := json.Marshal(rest)
		if err != nil {
			return nil, fmt.Errorf("ztunnel config: %w", err)
		}
		y.WriteString("# the waypoint's pod and the service bound to it\n")
		fmt.Fprintf(&y, "- %s\n", strings.TrimSuffix(strings.TrimPrefix(string(b), "["), "]"))
		if b, err = json.Marshal(svcs); err != nil {
			return nil, fmt.Errorf("ztunnel config: %w", err)
		}
		fmt.Fprintf(&y, "services: %s\n", b)
	}
	cfg := filepath.Join(dir, "mesh.yaml")
	if err := os.WriteFile(cfg, []byte(y.String()), 0o644); err != nil {
		return nil, fmt.Errorf("ztunnel config: %w", err)
	}
	z := &ztunnelPair{}
	for _, n := range topo.Nodes {
		pin := pinPrefix + "-" + n.Name
		z.pins = append(z.pins, pin)
		z.nodes = append(z.nodes, n)
		p, err := startEnv(niceness, env, n.NS, "ztunnel-"+n.Name, filepath.Join(dir, "ztunnel-"+n.Name+".log"), bin,
			"--node", n.Name, "--config", cfg, "--ca-dir", caDir,
			"--capture", "--bpf-pin-path", pin, "--uplinks", netns.Uplink)
		if err != nil {
			z.stop()
			return nil, err
		}
		z.procs_ = append(z.procs_, p)
		if err := waitReady(ctx, n.NS, p); err != nil {
			z.stop()
			return nil, err
		}
	}
	return z, nil
}

// waitReady polls ztunnel's /healthz/ready on 15021 in its namespace.
func waitReady(ctx context.Context, ns *netns.NS, p *process) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if code, _, err := httpGet(ctx, ns, "http://127.0.0.1:15021/healthz/ready"); err == nil && code == http.StatusOK {
			return nil
		}
		if done, err := p.exited(); done {
			return fmt.Errorf("%s exited (%v): %s", p.Name, err, p.tail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after 30s: %s", p.Name, p.tail())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// connectionsOpened sums istio_tcp_connections_opened_total from ztunnel's
// metrics in ns: the proof that a run went through the proxy.
func connectionsOpened(ctx context.Context, ns *netns.NS) (float64, error) {
	return sumMetric(ctx, ns, "istio_tcp_connections_opened_total")
}

// sumMetric sums the samples of metric name on the metrics port (15020)
// of whatever listens in ns (a ztunnel, a waypoint).
func sumMetric(ctx context.Context, ns *netns.NS, name string) (float64, error) {
	code, body, err := httpGet(ctx, ns, "http://127.0.0.1:15020/metrics")
	if err != nil {
		return 0, err
	}
	if code != http.StatusOK {
		return 0, fmt.Errorf("metrics: status %d", code)
	}
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		fs := strings.Fields(line)
		v, err := strconv.ParseFloat(fs[len(fs)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum, sc.Err()
}

// httpGet fetches url from inside ns, within 5 seconds.
func httpGet(ctx context.Context, ns *netns.NS, url string) (int, string, error) {
	return httpGetTimeout(ctx, ns, url, 5*time.Second)
}

// httpGetTimeout fetches url from inside ns, within timeout.
func httpGetTimeout(ctx context.Context, ns *netns.NS, url string, timeout time.Duration) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return ns.Dial(ctx, nil, network, addr)
	}}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return resp.StatusCode, string(b), err
}

func (z *ztunnelPair) procs() []*process { return z.procs_ }

// stop stops the ztunnels and removes their pinned capture.
func (z *ztunnelPair) stop() {
	if z == nil {
		return
	}
	for _, p := range z.procs_ {
		p.stop(5 * time.Second)
	}
	for i, pin := range z.pins {
		_ = bpf.Uninstall(bpf.Options{PinPath: pin, Netns: z.nodes[i].NS.Path()})
	}
}
