package waypoint

import (
	"cmp"
	"encoding/json"
	"net/http"
	"slices"
	"time"

	// The retry host predicate istiod-lite puts in RouteConfigurations:
	// registered so that /config_dump can render them.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
)

// adminHandler serves, on localhost (15000):
//
//	/config_dump  every resource of the current snapshot, with its version
//	/clusters     endpoints, health, ejections, circuit-breaker counters
//	/debug/flows  request and TCP flow events as JSON lines
func (p *Proxy) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", p.serveConfigDump)
	mux.HandleFunc("GET /clusters", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, p.dumpClusters()) })
	mux.Handle("GET /debug/flows", p.m.flows) // request and TCP flow events (telemetry.Flows)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, []string{"/config_dump", "/clusters", "/debug/flows"})
	})
	return mux
}

func (p *Proxy) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	h := promhttp.HandlerFor(p.m.reg, promhttp.HandlerOpts{})
	mux.Handle("GET /metrics", h)
	mux.Handle("GET /stats/prometheus", h)
	return mux
}

// Ready reports whether the waypoint serves: a config snapshot is in, the
// certificate is available, the HBONE listener is up, and it is not
// draining.
func (p *Proxy) Ready(r *http.Request) (bool, string) {
	switch {
	case p.draining.Load():
		return false, "draining"
	case !p.serving.Load():
		return false, "listener not up"
	case p.snap.Load() == nil:
		return false, "no config yet"
	}
	svid, err := p.cfg.Certs.GetX509SVID(r.Context(), p.cfg.Identity)
	if err != nil || len(svid.Certificates) == 0 || time.Now().After(svid.Certificates[0].NotAfter) {
		return false, "no certificate yet"
	}
	return true, "ready"
}

func (p *Proxy) readyHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		ok, why := p.Ready(r)
		if !ok {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// dumpedResource is one resource of the active snapshot in /config_dump.
type dumpedResource struct {
	Version string `json:"version"`
	Type    string `json:"type"` // the type URL, e.g. type.googleapis.com/envoy.config.route.v3.RouteConfiguration
	Name    string `json:"name"` // the cluster name for a ClusterLoadAssignment
	// Resource is the resource as a JSON Any; when a type inside it is not
	// known to this binary it is {"@type": Type} and Error says why.
	Resource json.RawMessage `json:"resource"`
	Error    string          `json:"error,omitempty"`
}

func (p *Proxy) serveConfigDump(w http.ResponseWriter, r *http.Request) {
	out := map[string]any{"identity": p.cfg.Identity.String()}
	if e := p.lastErr.Load(); e != nil {
		out["last_rejected"] = *e
	}
	res := []dumpedResource{}
	if snap := p.snap.Load(); snap != nil {
		for _, x := range snap.resources {
			res = append(res, dumpResource(x))
		}
	}
	out["resources"] = res
	writeJSON(w, out)
}

// dumpResource renders x for the config dump. Every resource of the snapshot
// is listed: one that cannot be rendered (an Any inside it of a type this
// binary does not link) keeps its version, type and name, with the error.
func dumpResource(x Resource) dumpedResource {
	d := dumpedResource{Version: x.Version, Name: resourceName(x.Resource)}
	a, err := anypb.New(x.Resource)
	if err == nil {
		d.Type = a.GetTypeUrl()
		var b []byte
		if b, err = protojson.Marshal(a); err == nil {
			d.Resource = b
			return d
		}
	} else {
		d.Type = "type.googleapis.com/" + string(x.Resource.ProtoReflect().Descriptor().FullName())
	}
	d.Error = err.Error()
	d.Resource, _ = json.Marshal(map[string]string{"@type": d.Type})
	return d
}

type hostDump struct {
	Address      string `json:"address"`
	Identity     string `json:"identity,omitempty"`
	HBONEPort    uint16 `json:"hbonePort,omitempty"`
	Workload     string `json:"workload,omitempty"`
	Healthy      bool   `json:"healthy"`
	EjectedUntil string `json:"ejectedUntil,omitempty"`
	Ejections    int    `json:"ejections"`
	Active       int64  `json:"activeRequests"`
	Conns        int64  `json:"connections"`
}

type clusterDump struct {
	Name            string     `json:"name"`
	LB              string     `json:"lbPolicy"`
	MaxConnections  int64      `json:"maxConnections"`
	MaxPending      int64      `json:"maxPendingRequests"`
	MaxRequests     int64      `json:"maxRequests"`
	MaxRetries      int64      `json:"maxRetries"`
	ActiveRequests  int64      `json:"activeRequests"`
	PendingRequests int64      `json:"pendingRequests"`
	ActiveRetries   int64      `json:"activeRetries"`
	Connections     int64      `json:"connections"`
	OverflowRq      uint64     `json:"upstreamRqPendingOverflow"`
	OverflowMaxRq   uint64     `json:"upstreamRqOverflow"`
	OverflowRetry   uint64     `json:"upstreamRqRetryOverflow"`
	Ejections       uint64     `json:"outlierEjectionsTotal"`
	Hosts           []hostDump `json:"hosts"`
}

func (p *Proxy) dumpClusters() []clusterDump {
	snap := p.snap.Load()
	out := []clusterDump{}
	if snap == nil {
		return out
	}
	now := time.Now()
	for _, v := range snap.clusters {
		c := v.c
		c.mu.Lock()
		pending := c.pending
		c.mu.Unlock()
		d := clusterDump{Name: v.s.name, LB: v.s.lb.String(), MaxConnections: v.s.maxConns, MaxPending: v.s.maxPending,
			MaxRequests: v.s.maxRequests, MaxRetries: v.s.maxRetries, ActiveRequests: c.active.Load(), PendingRequests: pending,
			ActiveRetries: c.retries.Load(), Connections: c.conns.Load(), OverflowRq: c.overflowPending.Load(),
			OverflowMaxRq: c.overflowRq.Load(), OverflowRetry: c.overflowRetry.Load(), Ejections: c.ejectionsTotal.Load(),
			Hosts: []hostDump{}}
		for _, h := range v.hosts {
			hd := hostDump{Address: h.spec.addr.String(), HBONEPort: h.spec.hbonePort, Workload: h.spec.labels.workload,
				Healthy: !h.ejected(now), Active: h.active.Load(), Conns: h.conns.Load()}
			if !h.spec.identity.IsZero() {
				hd.Identity = h.spec.identity.String()
			}
			if !hd.Healthy {
				hd.EjectedUntil = time.Unix(0, h.ejectedUntil.Load()).UTC().Format(time.RFC3339Nano)
			}
			h.mu.Lock()
			hd.Ejections = h.ejections
			h.mu.Unlock()
			d.Hosts = append(d.Hosts, hd)
		}
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b clusterDump) int { return cmp.Compare(a.Name, b.Name) })
	return out
}
