// Package monitoring holds istiod-lite's Prometheus metrics, named as
// Istio's istiod names them where one exists (pilot_xds,
// pilot_xds_pushes, pilot_total_xds_rejects, pilot_xds_send_time,
// pilot_xds_push_time, pilot_proxy_convergence_time,
// pilot_xds_config_size_bytes, pilot_push_triggers, citadel_server_*,
// istio_build), plus the refusals of 15012's admission (istiod-lite/gate).
// The xDS server, the certificate service and the gate take a *Metrics;
// every method is a no-op on a nil *Metrics.
package monitoring

import (
	"runtime/debug"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are istiod-lite's metrics. Create them with New.
type Metrics struct {
	// Registry holds every family below (serve it with promhttp.HandlerFor).
	Registry *prometheus.Registry

	xdsClients *prometheus.GaugeVec     // pilot_xds{kind}
	pushes     *prometheus.CounterVec   // pilot_xds_pushes{type}
	rejects    *prometheus.CounterVec   // pilot_total_xds_rejects{type}
	sendTime   *prometheus.HistogramVec // pilot_xds_send_time{type}
	pushTime   *prometheus.HistogramVec // pilot_xds_push_time{type}
	converge   prometheus.Histogram     // pilot_proxy_convergence_time
	configSize *prometheus.HistogramVec // pilot_xds_config_size_bytes{type}
	triggers   *prometheus.CounterVec   // pilot_push_triggers{type}
	csrs       prometheus.Counter
	issued     prometheus.Counter
	parseErrs  prometheus.Counter
	signErrs   prometheus.Counter
	authnFails prometheus.Counter
	refused    *prometheus.CounterVec // ambit_gate_refusals_total{reason}
}

// Reasons of the gate's refusals (the reason label's only values).
const (
	RefusedConnections          = "connections"            // the total connection cap
	RefusedConnectionsPerSource = "connections_per_source" // a source's connection cap
	RefusedCallRate             = "call_rate"              // a source's call rate
	RefusedUnauthenticated      = "unauthenticated"        // no, or a refused, bearer token
	RefusedTokenCheck           = "token_check_failed"     // the token could not be checked
	RefusedRequestTooLarge      = "request_too_large"      // a call over its method's size limit
)

// New returns the metrics, registered in a new registry together with the
// Go runtime and process collectors.
func New() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		xdsClients: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "pilot_xds",
			Help: "Number of endpoints connected to this pilot using XDS, by caller kind (node-proxy, waypoint)."}, []string{"kind"}),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "pilot_xds_pushes",
			Help: "Pilot build and send errors for xDS types: responses sent, by type (<type>_senderr: failed sends)."}, []string{"type"}),
		rejects: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "pilot_total_xds_rejects",
			Help: "Total number of XDS responses from pilot rejected by proxy (NACKs), by type."}, []string{"type"}),
		sendTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "pilot_xds_send_time",
			Help:    "Total time in seconds Pilot takes to send generated configuration, by type.",
			Buckets: []float64{.001, .005, .01, .05, .1, .5, 1, 5, 10, 30}}, []string{"type"}),
		// Istio's buckets for the three below.
		pushTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "pilot_xds_push_time",
			Help:    "Total time in seconds Pilot takes to push lds, rds, cds and eds: from the start of building a push to its response sent, by type.",
			Buckets: []float64{.01, .1, 1, 3, 5, 10, 20, 30}}, []string{"type"}),
		converge: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "pilot_proxy_convergence_time",
			Help:    "Delay in seconds between config change and a proxy receiving all required configuration.",
			Buckets: []float64{.1, .5, 1, 3, 5, 10, 20, 30}}),
		configSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "pilot_xds_config_size_bytes",
			Help:    "Distribution of configuration sizes pushed to clients, by type.",
			Buckets: []float64{1, 10000, 1000000, 4000000, 10000000, 40000000}}, []string{"type"}),
		triggers: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "pilot_push_triggers",
			Help: "Total number of times a push was triggered, labeled by reason for the push (endpoint, service, config)."}, []string{"type"}),
		csrs: prometheus.NewCounter(prometheus.CounterOpts{Name: "citadel_server_csr_count",
			Help: "The number of CSRs received by Citadel server."}),
		issued: prometheus.NewCounter(prometheus.CounterOpts{Name: "citadel_server_success_cert_issue_count",
			Help: "The number of certificates issuances that have succeeded."}),
		parseErrs: prometheus.NewCounter(prometheus.CounterOpts{Name: "citadel_server_csr_parsing_err_count",
			Help: "The number of errors occurred when parsing the CSR."}),
		signErrs: prometheus.NewCounter(prometheus.CounterOpts{Name: "citadel_server_csr_sign_err_count",
			Help: "The number of errors occurred when signing the CSR."}),
		authnFails: prometheus.NewCounter(prometheus.CounterOpts{Name: "citadel_server_authentication_failure_count",
			Help: "The number of authentication failures."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_gate_refusals_total",
			Help: "Connections and calls refused by the admission of 15012 before they reached a service, by reason."}, []string{"reason"}),
	}
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "istio_build",
		Help: "Istio component build info (component pilot: istiod-lite; tag: the module version it was built as)."}, []string{"component", "tag"})
	build.WithLabelValues("pilot", buildTag()).Set(1)
	m.Registry.MustRegister(m.xdsClients, m.pushes, m.rejects, m.sendTime, m.pushTime, m.converge, m.configSize, m.triggers, build, m.csrs, m.issued, m.parseErrs, m.signErrs, m.authnFails, m.refused,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, r := range []string{RefusedConnections, RefusedConnectionsPerSource, RefusedCallRate, RefusedUnauthenticated, RefusedTokenCheck, RefusedRequestTooLarge} {
		m.refused.WithLabelValues(r) // present at 0
	}
	for _, r := range []string{TriggerEndpoint, TriggerService, TriggerConfig} {
		m.triggers.WithLabelValues(r) // present at 0
	}
	for _, t := range []string{"wds", "svc", "wads", "pads", "cds", "eds", "lds", "rds"} {
		m.rejects.WithLabelValues(t) // present at 0: a dashboard shows "none", not "no data"
	}
	return m
}

// XDSConnected counts a connected xDS client of kind ("node-proxy",
// "waypoint"; empty: "unknown"); XDSDisconnected uncounts it.
func (m *Metrics) XDSConnected(kind string) {
	if m != nil {
		m.xdsClients.WithLabelValues(kindLabel(kind)).Inc()
	}
}

// XDSDisconnected uncounts a client XDSConnected counted.
func (m *Metrics) XDSDisconnected(kind string) {
	if m != nil {
		m.xdsClients.WithLabelValues(kindLabel(kind)).Dec()
	}
}

func kindLabel(k string) string {
	if k == "" {
		return "unknown"
	}
	return k
}

// XDSSent records a response of typeURL that took d to send; failed sends
// count as "<type>_senderr".
func (m *Metrics) XDSSent(typeURL string, d time.Duration, err error) {
	if m == nil {
		return
	}
	t := ShortType(typeURL)
	if err != nil {
		m.pushes.WithLabelValues(t + "_senderr").Inc()
		return
	}
	m.pushes.WithLabelValues(t).Inc()
	m.sendTime.WithLabelValues(t).Observe(d.Seconds())
}

// XDSPushed records a push response of typeURL sent took since the push
// began to be built (pilot_xds_push_time), and its size in bytes
// (pilot_xds_config_size_bytes).
func (m *Metrics) XDSPushed(typeURL string, took time.Duration, size int) {
	if m == nil {
		return
	}
	t := ShortType(typeURL)
	m.pushTime.WithLabelValues(t).Observe(took.Seconds())
	m.configSize.WithLabelValues(t).Observe(float64(size))
}

// ProxyConverged records that a proxy has been sent everything a config
// change required, took after the change (pilot_proxy_convergence_time).
func (m *Metrics) ProxyConverged(took time.Duration) {
	if m != nil {
		m.converge.Observe(took.Seconds())
	}
}

// Reasons a push is triggered (pilot_push_triggers' type label).
const (
	TriggerEndpoint = "endpoint" // workloads (pods, entries) changed
	TriggerService  = "service"  // services changed
	TriggerConfig   = "config"   // policies, routes, destination rules, waypoints changed
)

// PushTriggered counts a push triggered by reason (one of the Trigger*
// constants).
func (m *Metrics) PushTriggered(reason string) {
	if m != nil {
		m.triggers.WithLabelValues(reason).Inc()
	}
}

// XDSRejected counts a NACK of typeURL.
func (m *Metrics) XDSRejected(typeURL string) {
	if m != nil {
		m.rejects.WithLabelValues(ShortType(typeURL)).Inc()
	}
}

// ShortType is the type label of typeURL: Istio's for the Envoy types
// (cds, eds, lds, rds), wds/sds-like short names for ambit's workload
// types (wds, svc, wads, pads), else "other" (labels stay bounded).
func ShortType(typeURL string) string {
	switch typeURL[strings.LastIndexByte(typeURL, '/')+1:] {
	case "envoy.config.cluster.v3.Cluster":
		return "cds"
	case "envoy.config.endpoint.v3.ClusterLoadAssignment":
		return "eds"
	case "envoy.config.listener.v3.Listener":
		return "lds"
	case "envoy.config.route.v3.RouteConfiguration":
		return "rds"
	case "ambit.workload.v1.Workload":
		return "wds"
	case "ambit.workload.v1.Service":
		return "svc"
	case "ambit.workload.v1.Authorization":
		return "wads"
	case "ambit.workload.v1.PeerAuthentication":
		return "pads"
	}
	return "other"
}

// CSRReceived counts a certificate request (Istio counts it before
// authentication).
func (m *Metrics) CSRReceived() {
	if m != nil {
		m.csrs.Inc()
	}
}

// CertIssued counts a signed certificate.
func (m *Metrics) CertIssued() {
	if m != nil {
		m.issued.Inc()
	}
}

// CSRParseError counts a CSR that could not be parsed (bad PEM, bad
// request).
func (m *Metrics) CSRParseError() {
	if m != nil {
		m.parseErrs.Inc()
	}
}

// CSRSignError counts a CSR the CA failed to sign.
func (m *Metrics) CSRSignError() {
	if m != nil {
		m.signErrs.Inc()
	}
}

// AuthenticationFailure counts a certificate request whose caller was not
// authenticated.
func (m *Metrics) AuthenticationFailure() {
	if m != nil {
		m.authnFails.Inc()
	}
}

// Refused counts a refusal of the gate; reason is one of the Refused*
// constants.
func (m *Metrics) Refused(reason string) {
	if m != nil {
		m.refused.WithLabelValues(reason).Inc()
	}
}

// buildTag is the main module's version from the build info ("(devel)"
// for a build of a work tree), "unknown" without build info.
func buildTag() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "unknown"
}
