package ztunnel

import (
	"cmp"
	"encoding/json"
	"net/http"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/model"
)

// adminHandler serves JSON dumps on the admin listener (15000, localhost):
//
//	/debug/workloads     the model's workloads (local ones flagged)
//	/debug/services      services
//	/debug/policies      authorization policies and peer authentications
//	/debug/certificates  the local identities' certificates, with expiry
//	/debug/connections   live connections, with bytes so far
//	/debug/config_dump   all of the above
func (p *Proxy) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/workloads", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, p.dumpWorkloads(p.cfg.Store.Load()))
	})
	mux.HandleFunc("GET /debug/services", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, dumpServices(p.cfg.Store.Load()))
	})
	mux.HandleFunc("GET /debug/policies", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, dumpPolicies(p.cfg.Store.Load()))
	})
	mux.HandleFunc("GET /debug/certificates", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, p.dumpCertificates(r))
	})
	mux.HandleFunc("GET /debug/connections", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, p.dumpConnections())
	})
	mux.HandleFunc("GET /debug/config_dump", func(w http.ResponseWriter, r *http.Request) {
		snap := p.cfg.Store.Load()
		writeJSON(w, map[string]any{
			"node":         p.cfg.Node,
			"workloads":    p.dumpWorkloads(snap),
			"services":     dumpServices(snap),
			"policies":     dumpPolicies(snap),
			"certificates": p.dumpCertificates(r),
			"connections":  p.dumpConnections(),
		})
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, []string{"/debug/workloads", "/debug/services", "/debug/policies",
			"/debug/certificates", "/debug/connections", "/debug/config_dump"})
	})
	return mux
}

func (p *Proxy) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(p.m.reg, promhttp.HandlerOpts{}))
	mux.Handle("GET /stats/prometheus", promhttp.HandlerFor(p.m.reg, promhttp.HandlerOpts{}))
	return mux
}

// readyHandler answers 200 on /healthz/ready once config is in and the
// listeners serve, 503 before and while draining.
func (p *Proxy) readyHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		switch {
		case p.draining.Load():
			http.Error(w, "draining", http.StatusServiceUnavailable)
		case !p.serving.Load():
			http.Error(w, "listeners not up", http.StatusServiceUnavailable)
		case !p.synced():
			http.Error(w, "no config (or capture) yet", http.StatusServiceUnavailable)
		default:
			w.Write([]byte("ready\n"))
		}
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

type workloadDump struct {
	*model.Workload
	Identity string `json:"identity"`
	Local    bool   `json:"local"`
}

func (p *Proxy) dumpWorkloads(snap *model.Snapshot) []workloadDump {
	out := make([]workloadDump, 0, len(snap.Workloads))
	for _, w := range snap.Workloads {
		out = append(out, workloadDump{Workload: w, Identity: w.Identity().String(), Local: p.cfg.isLocal(w)})
	}
	slices.SortFunc(out, func(a, b workloadDump) int { return cmp.Compare(a.UID, b.UID) })
	return out
}

func dumpServices(snap *model.Snapshot) []*model.Service {
	out := make([]*model.Service, 0, len(snap.Services))
	for _, s := range snap.Services {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b *model.Service) int { return cmp.Compare(a.Key(), b.Key()) })
	return out
}

func dumpPolicies(snap *model.Snapshot) map[string]any {
	pols := make([]*model.Policy, 0, len(snap.Policies))
	for _, x := range snap.Policies {
		pols = append(pols, x)
	}
	slices.SortFunc(pols, func(a, b *model.Policy) int { return cmp.Compare(a.Key(), b.Key()) })
	pas := make([]*model.PeerAuthentication, 0, len(snap.PeerAuthn))
	for _, x := range snap.PeerAuthn {
		pas = append(pas, x)
	}
	slices.SortFunc(pas, func(a, b *model.PeerAuthentication) int { return cmp.Compare(a.Key(), b.Key()) })
	return map[string]any{"authorizationPolicies": pols, "peerAuthentications": pas}
}

type certDump struct {
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial,omitempty"`
	NotBefore time.Time `json:"notBefore,omitzero"`
	NotAfter  time.Time `json:"notAfter,omitzero"`
	ExpiresIn string    `json:"expiresIn,omitempty"`
	Expired   bool      `json:"expired"`
	Chain     int       `json:"chainLength,omitempty"`
	RenewAt   time.Time `json:"renewAt,omitzero"`
	Failures  int       `json:"failures,omitempty"`
	Error     string    `json:"error,omitempty"`
}

// dumpCertificates reports the certificate of every local identity: from
// the certificate manager's own status when it has one (certs.Provider),
// else by asking for each identity's current SVID.
func (p *Proxy) dumpCertificates(r *http.Request) []certDump {
	if p.cfg.Certs == nil {
		return []certDump{}
	}
	now := time.Now()
	if lister, ok := p.cfg.Certs.(interface{ Certificates() []certs.CertStatus }); ok {
		sts := lister.Certificates()
		out := make([]certDump, 0, len(sts))
		for _, st := range sts {
			d := certDump{Identity: st.ID.String(), Serial: st.Serial, NotBefore: st.NotBefore, NotAfter: st.NotAfter,
				RenewAt: st.RenewAt, Failures: st.Failures, Error: st.LastError}
			if !st.NotAfter.IsZero() {
				d.ExpiresIn = st.NotAfter.Sub(now).Round(time.Second).String()
				d.Expired = now.After(st.NotAfter)
			}
			out = append(out, d)
		}
		slices.SortFunc(out, func(a, b certDump) int { return cmp.Compare(a.Identity, b.Identity) })
		return out
	}
	ids, _ := p.localWorkloads(p.cfg.Store.Load())
	out := make([]certDump, 0, len(ids))
	for _, id := range ids {
		d := certDump{Identity: id.String()}
		svid, err := p.cfg.Certs.GetX509SVID(r.Context(), id)
		switch {
		case err != nil:
			d.Error = err.Error()
		case len(svid.Certificates) == 0:
			d.Error = "empty certificate chain"
		default:
			leaf := svid.Certificates[0]
			d.Serial = leaf.SerialNumber.Text(16)
			d.NotBefore, d.NotAfter = leaf.NotBefore, leaf.NotAfter
			d.ExpiresIn = leaf.NotAfter.Sub(now).Round(time.Second).String()
			d.Expired = now.After(leaf.NotAfter)
			d.Chain = len(svid.Certificates)
		}
		out = append(out, d)
	}
	return out
}

type connDump struct {
	ID            uint64 `json:"id"`
	Direction     string `json:"direction"`
	Via           string `json:"via"`
	Src           string `json:"src"`
	Dst           string `json:"dst"`
	Upstream      string `json:"upstream,omitempty"`
	Route         string `json:"route,omitempty"`
	SrcPrincipal  string `json:"srcPrincipal"`
	DstPrincipal  string `json:"dstPrincipal"`
	Service       string `json:"service,omitempty"`
	Established   bool   `json:"established"`
	BytesReceived int64  `json:"bytesReceived"`
	BytesSent     int64  `json:"bytesSent"`
	Age           string `json:"age"`
}

func (p *Proxy) dumpConnections() []connDump {
	cs := p.conns.Conns()
	out := make([]connDump, 0, len(cs))
	for _, c := range cs {
		d := connDump{ID: c.ID, Direction: c.Direction, Via: c.Via, Src: c.Src.String(), Dst: c.Dst.String(),
			Established: c.Established(), BytesReceived: c.Received(), BytesSent: c.Sent(),
			Age: time.Since(c.Start).Round(time.Millisecond).String()}
		if d.Established { // the handler's fields are final once established
			d.Route = c.Route
			d.SrcPrincipal, d.DstPrincipal = c.Source.PrincipalLabel(), c.Destination.PrincipalLabel()
			if c.Upstream.IsValid() {
				d.Upstream = c.Upstream.String()
			}
			d.Service = c.Service
		}
		out = append(out, d)
	}
	return out
}
