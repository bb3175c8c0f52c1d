package ztunnel

import (
	"cmp"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

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
//	/debug/flows         flow events as JSON lines (telemetry.Flows: filters
//	                     namespace, pod, verdict, identity, reporter, type;
//	                     last=N, follow=true)
//	/debug/capture       the eBPF capture: captured pods and their veths,
//	                     pods skipped and why, the programs' counters, and
//	                     whether the guard is on ({"enabled": false} when
//	                     the proxy runs without capture)
//	/debug/config_dump   all of the above but flows and capture
//
// Certificates come with their chains and their trust domain's roots in
// PEM.
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
	mux.Handle("GET /debug/flows", p.conns.Flows)
	mux.HandleFunc("GET /debug/capture", func(w http.ResponseWriter, r *http.Request) {
		cs, ok := p.cfg.Capture.(CaptureStatus)
		if !ok {
			writeJSON(w, map[string]any{"enabled": false})
			return
		}
		st, err := cs.Status()
		if err != nil {
			http.Error(w, "capture: "+err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, map[string]any{"enabled": true, "status": st})
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
			"/debug/certificates", "/debug/connections", "/debug/flows", "/debug/capture", "/debug/config_dump"})
	})
	return mux
}

func (p *Proxy) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	// Uncompressed: a gzip scrape holds a flate compressor of 0.5-0.9 MB
	// (kept in promhttp's pool between scrapes), a few percent of a node
	// proxy's memory for a response that crosses only the node's network.
	h := promhttp.HandlerFor(p.m.reg, promhttp.HandlerOpts{DisableCompression: true})
	mux.Handle("GET /metrics", h)
	mux.Handle("GET /stats/prometheus", h)
	return mux
}

// readyHandler answers 200 on /healthz/ready once config is in and the
// listeners serve, 503 before and while draining. It tells nothing else
// (the port is reachable from the node's network): the reason is in the
// proxy's log and Ready.
func (p *Proxy) readyHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		if !p.Ready() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
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
	// CertChain is the SVID's chain, leaf first, and ChainPEM the same as
	// one PEM block per certificate.
	CertChain []certInfo `json:"certChain,omitempty"`
	ChainPEM  string     `json:"chainPem,omitempty"`
	// TrustDomain's bundle: the roots the chain verifies against (RootsPEM:
	// the same as PEM), so openssl or go-spiffe can check it.
	TrustDomain string     `json:"trustDomain,omitempty"`
	Roots       []certInfo `json:"roots,omitempty"`
	RootsPEM    string     `json:"rootsPem,omitempty"`
	BundleError string     `json:"bundleError,omitempty"`
}

// certInfo is one X.509 certificate of a dump.
type certInfo struct {
	Serial    string    `json:"serial"`
	Subject   string    `json:"subject,omitempty"`
	Issuer    string    `json:"issuer,omitempty"`
	URIs      []string  `json:"uris,omitempty"`
	IsCA      bool      `json:"isCA"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
	PEM       string    `json:"pem"`
}

func certInfos(cs []*x509.Certificate) ([]certInfo, string) {
	out := make([]certInfo, 0, len(cs))
	var all strings.Builder
	for _, c := range cs {
		p := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
		ci := certInfo{Serial: c.SerialNumber.Text(16), Subject: c.Subject.String(), Issuer: c.Issuer.String(),
			IsCA: c.IsCA, NotBefore: c.NotBefore, NotAfter: c.NotAfter, PEM: p}
		for _, u := range c.URIs {
			ci.URIs = append(ci.URIs, u.String())
		}
		out = append(out, ci)
		all.WriteString(p)
	}
	return out, all.String()
}

// certTimeout bounds how long the dump waits for a certificate that is
// being fetched.
const certTimeout = 2 * time.Second

// dumpCertificates reports the certificate of every local identity: from
// the certificate manager's own status when it has one (certs.Provider),
// else by asking for each identity's current SVID; with each, its chain
// in PEM and its trust domain's roots.
func (p *Proxy) dumpCertificates(r *http.Request) []certDump {
	if p.cfg.Certs == nil {
		return []certDump{}
	}
	ctx, cancel := context.WithTimeout(r.Context(), certTimeout)
	defer cancel()
	now := time.Now()
	var out []certDump
	if lister, ok := p.cfg.Certs.(interface{ Certificates() []certs.CertStatus }); ok {
		sts := lister.Certificates()
		out = make([]certDump, 0, len(sts))
		for _, st := range sts {
			d := certDump{Identity: st.ID.String(), Serial: st.Serial, NotBefore: st.NotBefore, NotAfter: st.NotAfter,
				RenewAt: st.RenewAt, Failures: st.Failures, Error: st.LastError}
			if !st.NotAfter.IsZero() {
				d.ExpiresIn = st.NotAfter.Sub(now).Round(time.Second).String()
				d.Expired = now.After(st.NotAfter)
			}
			if st.Serial != "" && !d.Expired {
				// Held and valid: GetX509SVID returns it without waiting.
				if svid, err := p.cfg.Certs.GetX509SVID(ctx, st.ID); err == nil && svid.Certificates[0].SerialNumber.Text(16) == st.Serial {
					d.Chain = len(svid.Certificates)
					d.CertChain, d.ChainPEM = certInfos(svid.Certificates)
				}
			}
			p.addBundle(&d, st.ID.TrustDomain())
			out = append(out, d)
		}
		slices.SortFunc(out, func(a, b certDump) int { return cmp.Compare(a.Identity, b.Identity) })
		return out
	}
	ids, _ := p.localWorkloads(p.cfg.Store.Load())
	out = make([]certDump, 0, len(ids))
	for _, id := range ids {
		d := certDump{Identity: id.String()}
		svid, err := p.cfg.Certs.GetX509SVID(ctx, id)
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
			d.CertChain, d.ChainPEM = certInfos(svid.Certificates)
		}
		p.addBundle(&d, id.TrustDomain())
		out = append(out, d)
	}
	return out
}

// addBundle adds td's roots to d.
func (p *Proxy) addBundle(d *certDump, td spiffeid.TrustDomain) {
	d.TrustDomain = td.Name()
	b, err := p.cfg.Certs.GetX509BundleForTrustDomain(td)
	if err != nil {
		d.BundleError = err.Error()
		return
	}
	d.Roots, d.RootsPEM = certInfos(b.X509Authorities())
}

type connDump struct {
	ID            uint64 `json:"id"`
	Direction     string `json:"direction"`
	Via           string `json:"via"`
	Src           string `json:"src"`
	Dst           string `json:"dst"`
	Upstream      string `json:"upstream,omitempty"`
	Route         string `json:"route,omitempty"`
	Transport     string `json:"transport,omitempty"` // h2 or h3: the HBONE transport
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
			d.Route, d.Transport = c.Route, c.Transport
			d.SrcPrincipal, d.DstPrincipal = c.Source.PrincipalLabel(), c.Destination.PrincipalLabel()
			if c.Upstream.IsValid() {
				d.Upstream = c.Upstream.String()
			}
			d.Service = c.Service.Hostname
		}
		out = append(out, d)
	}
	return out
}
