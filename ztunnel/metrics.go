package ztunnel

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/telemetry"
)

// Values of the response_flags label (telemetry's, Istio's words).
const (
	flagNone      = telemetry.FlagNone
	flagDeny      = telemetry.FlagDeny
	flagConnect   = telemetry.FlagConnect
	flagNoRoute   = telemetry.FlagNoRoute
	flagNoSource  = telemetry.FlagNoSource
	flagNoDest    = telemetry.FlagNoDest
	flagAborted   = telemetry.FlagAborted
	flagBadSOCKS5 = telemetry.FlagBadRequest
)

// metrics are the proxy's Prometheus collectors, on its own registry: the
// Istio TCP metrics (telemetry) and the ztunnel's own.
type metrics struct {
	reg    *prometheus.Registry
	tcp    *telemetry.Metrics
	active *prometheus.GaugeVec
	denied *prometheus.CounterVec
	// hboneRefused counts HBONE peers refused before any stream: failed
	// handshakes (foreign trust domain, expired certificate, unknown local
	// workload), bad prefaces and malformed requests (hbone.Server.OnReject).
	hboneRefused *prometheus.CounterVec
	// bypassRefused counts connections refused because they went around
	// the waypoint their target is bound to, by listener (hbone: a tunnel
	// from another identity; inbound: plaintext).
	bypassRefused *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ambit_ztunnel_active_connections", Help: "Connections being proxied, by direction.",
		}, []string{"direction"}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_ztunnel_connections_refused_total", Help: "Connections refused, by direction and response flag.",
		}, []string{"direction", "response_flags"}),
		hboneRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_ztunnel_hbone_refused_total", Help: "HBONE peers refused before a stream was served, by reason.",
		}, []string{"reason"}),
		bypassRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_ztunnel_waypoint_bypass_refused_total",
			Help: "Connections to a waypoint-bound target refused because they did not come from its waypoint, by listener.",
		}, []string{"listener"}),
	}
	m.tcp = telemetry.NewMetrics(m.reg)
	m.reg.MustRegister(m.active, m.denied, m.hboneRefused, m.bypassRefused,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// hboneRejected counts and logs a peer the HBONE server refused: for a
// proxy these are security events (hbone logs them at debug level only).
func (p *Proxy) hboneRejected(r hbone.Rejection) {
	p.m.hboneRefused.WithLabelValues(string(r.Reason)).Inc()
	msg := map[hbone.RejectReason]string{
		hbone.RejectHandshake:  "handshake failed: peer refused",
		hbone.RejectPreface:    "bad or slow preface: peer refused",
		hbone.RejectBadRequest: "bad request: peer refused",
	}[r.Reason]
	if msg == "" {
		msg = "peer refused"
	}
	attrs := []any{"component", "hbone", "reason", string(r.Reason), "remote", r.Remote, "local", r.Local}
	if r.Status != 0 {
		attrs = append(attrs, "status", r.Status)
	}
	if r.Err != nil {
		attrs = append(attrs, "err", r.Err.Error())
	}
	p.log.Warn(msg, attrs...)
}
