package ztunnel

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Istio's TCP metric labels, in this order.
var tcpLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_service",
	"response_flags", "connection_security_policy",
}

// Values of the response_flags label (Istio's ztunnel uses the same words).
const (
	flagNone      = "-"       // served
	flagDeny      = "DENY"    // refused by AuthorizationPolicy or PeerAuthentication
	flagConnect   = "CONNECT" // the upstream (or tunnel) connect failed
	flagNoRoute   = "NR"      // resolution failed (no endpoint, unknown port, missing waypoint)
	flagNoSource  = "UNKNOWN_SOURCE"
	flagNoDest    = "UNKNOWN_DESTINATION"
	flagAborted   = "ABORTED" // closed by drain or shutdown
	flagBadSOCKS5 = "BAD_REQUEST"
)

// metrics are the proxy's Prometheus collectors, on its own registry.
type metrics struct {
	reg      *prometheus.Registry
	opened   *prometheus.CounterVec
	closed   *prometheus.CounterVec
	sent     *prometheus.CounterVec
	received *prometheus.CounterVec
	active   *prometheus.GaugeVec
	denied   *prometheus.CounterVec
	// hboneRefused counts HBONE peers refused before any stream: failed
	// handshakes (foreign trust domain, expired certificate, unknown local
	// workload) and malformed requests.
	hboneRefused *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_opened_total", Help: "TCP connections opened.",
		}, tcpLabels),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_closed_total", Help: "TCP connections closed.",
		}, tcpLabels),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_sent_bytes_total", Help: "Bytes sent back to the client (response direction).",
		}, tcpLabels),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_received_bytes_total", Help: "Bytes received from the client (request direction).",
		}, tcpLabels),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ambit_ztunnel_active_connections", Help: "Connections being proxied, by direction.",
		}, []string{"direction"}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_ztunnel_connections_refused_total", Help: "Connections refused, by direction and response flag.",
		}, []string{"direction", "response_flags"}),
	}
	m.hboneRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ambit_ztunnel_hbone_refused_total", Help: "HBONE peers refused before a stream was served, by reason.",
	}, []string{"reason"})
	m.reg.MustRegister(m.opened, m.closed, m.sent, m.received, m.active, m.denied, m.hboneRefused,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
