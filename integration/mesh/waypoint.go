package mesh

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/ambit-mesh/ambit/integration/netns"
	"github.com/ambit-mesh/ambit/model"
)

// WaypointOptions describe a waypoint process (cmd/waypoint) as its pod
// would run it.
type WaypointOptions struct {
	// Name names the process, its log (waypoint-<Name>.log) and its entry
	// for Waypoint and StopWaypoint; required.
	Name string
	// NS is the pod's network namespace the waypoint runs in; required. The
	// pod must not be captured (Istio's waypoint pods are labelled
	// istio.io/dataplane-mode=none): the waypoint speaks HBONE itself.
	NS *netns.NS
	// Namespace and Gateway name the waypoint's Gateway; required. Its
	// identity is spiffe://<td>/ns/<Namespace>/sa/<Gateway>.
	Namespace, Gateway string
	// Node is the xDS node id, the pod's name (default Name).
	Node string
	// TokenFile is its credential for istiod-lite: a pod-bound token in
	// cluster mode; in local mode the default is the waypoint's host secret
	// (Options.Waypoints).
	TokenFile string
	// Args are more command-line flags.
	Args []string
}

// StartWaypoint runs a waypoint against the mesh's istiod-lite and waits
// until it is ready (config and certificates in).
func (m *Mesh) StartWaypoint(ctx context.Context, o WaypointOptions) (*Proc, error) {
	if o.Name == "" || o.NS == nil || o.Namespace == "" || o.Gateway == "" {
		return nil, errors.New("mesh: waypoint Name, NS, Namespace and Gateway are required")
	}
	if o.Node == "" {
		o.Node = o.Name
	}
	if o.TokenFile == "" {
		o.TokenFile = m.waypointSecretFile(o.Namespace + "/" + o.Gateway)
	}
	args := append([]string{
		"--node", o.Node,
		"--namespace", o.Namespace,
		"--gateway", o.Gateway,
		"--xds-address", m.XDSAddr().String(),
		"--ca-roots", m.rootsFile(),
		"--token-file", o.TokenFile,
		"--drain-timeout", "2s",
	}, o.Args...)
	p, err := m.start(ctx, o.NS, o.NS.Name, "waypoint-"+o.Name, filepath.Join(m.opts.BinDir, "waypoint"), args...)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.waypoints[o.Name] = p
	m.mu.Unlock()
	if err := m.waitReady(ctx, o.NS, p); err != nil {
		return p, fmt.Errorf("waypoint %s not ready: %w\n%s", o.Name, err, p.Tail(40))
	}
	return p, nil
}

// StopWaypoint kills the waypoint called name (SIGKILL).
func (m *Mesh) StopWaypoint(name string) error {
	m.mu.Lock()
	p := m.waypoints[name]
	delete(m.waypoints, name)
	m.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Kill()
}

// Waypoint returns the running waypoint called name, or nil.
func (m *Mesh) Waypoint(name string) *Proc {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.waypoints[name]
}

// MetricsIn scrapes the metrics port (15020) of whatever listens in ns (a
// waypoint's pod) and sums the samples of name whose labels include match.
func MetricsIn(ctx context.Context, ns *netns.NS, name string, match map[string]string) (float64, error) {
	client := httpClientIn(ns, 5*time.Second)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/metrics", model.PortMetrics), nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, fmt.Errorf("metrics in %s: %w", ns.Name, err)
	}
	defer resp.Body.Close()
	return sumSamples(resp.Body, name, match)
}

// AdminIn fetches path from the admin port (15000, localhost) in ns and
// decodes its JSON into v.
func AdminIn(ctx context.Context, ns *netns.NS, path string, v any) error {
	client := httpClientIn(ns, 5*time.Second)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", model.PortAdmin, path), nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("admin %s in %s: %w", path, ns.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("admin %s in %s: %s: %s", path, ns.Name, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// RequestLog is one waypoint access-log line (one per request).
type RequestLog struct {
	Method          string `json:"method"`
	Path            string `json:"path"`
	Authority       string `json:"authority"`
	Code            int    `json:"response_code"`
	Flags           string `json:"response_flags"`
	Details         string `json:"response_code_details"`
	Duration        int64  `json:"duration"` // ms
	Route           string `json:"route_name"`
	UpstreamCluster string `json:"upstream_cluster"`
	UpstreamHost    string `json:"upstream_host"`
	Attempts        int    `json:"attempts"`
	SourcePrincipal string `json:"source_principal"`
	Downstream      string `json:"downstream_remote_address"`
	// Transport and UpstreamTransport are the HBONE transports (h2, h3) of
	// the client's tunnel and of the upstream one ("-": plain TCP).
	Transport         string `json:"transport"`
	UpstreamTransport string `json:"upstream_transport"`
}

// RequestLogs reads every access-log line of the waypoint called name (its
// log file is appended to across restarts).
func (m *Mesh) RequestLogs(name string) ([]RequestLog, error) {
	return ReadRequestLogs(filepath.Join(m.opts.WorkDir, "waypoint-"+name+".log"))
}

// ReadRequestLogs reads the access-log lines of a waypoint's log file.
func ReadRequestLogs(path string) ([]RequestLog, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []RequestLog
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var head struct {
			Msg string `json:"msg"`
		}
		if json.Unmarshal(line, &head) != nil || head.Msg != "waypoint: request" {
			continue
		}
		var r RequestLog
		if err := json.Unmarshal(line, &r); err == nil {
			out = append(out, r)
		}
	}
	return out, sc.Err()
}
