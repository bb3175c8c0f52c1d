package waypoint

import (
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ambit-mesh/ambit/telemetry"
)

// Istio's request metric labels (reporter="waypoint"), in this order. The
// request families are the waypoint's alone; the istio_tcp_* ones, of its
// tcp_proxy chains, are the shared package telemetry's.
var requestLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal", "source_canonical_service", "source_canonical_revision",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_canonical_service", "destination_canonical_revision",
	"destination_service", "destination_service_name", "destination_service_namespace",
	"request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
}

// metrics are the waypoint's Prometheus collectors, on its own registry.
type metrics struct {
	reg            *prometheus.Registry
	requests       *prometheus.CounterVec
	duration       *prometheus.HistogramVec
	reqBytes       *prometheus.HistogramVec
	respBytes      *prometheus.HistogramVec
	tcp            *telemetry.Metrics // istio_tcp_*, of tcp_proxy chains
	noChain        prometheus.Counter
	mirrored       *prometheus.CounterVec
	configApplied  prometheus.Counter
	configRejected prometheus.Counter
}

func newMetrics() *metrics {
	durBuckets := []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}
	sizeBuckets := prometheus.ExponentialBuckets(1, 10, 9)
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_requests_total", Help: "Requests served by the waypoint.",
		}, requestLabels),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "istio_request_duration_milliseconds", Help: "Request duration.", Buckets: durBuckets,
		}, requestLabels),
		reqBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "istio_request_bytes", Help: "Request sizes (headers and body).", Buckets: sizeBuckets,
		}, requestLabels),
		respBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "istio_response_bytes", Help: "Response sizes (headers and body).", Buckets: sizeBuckets,
		}, requestLabels),
		noChain: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_waypoint_no_filter_chain_total", Help: "CONNECTs whose authority matched no filter chain (NR).",
		}),
		mirrored: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_waypoint_mirrored_requests_total", Help: "Mirrored (shadow) requests, by cluster and whether they got an answer.",
		}, []string{"cluster", "answered"}),
		configApplied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_waypoint_config_applied_total", Help: "Config snapshots applied.",
		}),
		configRejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_waypoint_config_rejected_total", Help: "Config sets rejected as invalid.",
		}),
	}
	m.tcp = telemetry.NewMetrics(m.reg)
	m.reg.MustRegister(m.requests, m.duration, m.reqBytes, m.respBytes,
		m.noChain, m.mirrored, m.configApplied, m.configRejected,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// finish records a request: metrics and one access-log line.
func (p *Proxy) finish(rec *record, w *respWriter) {
	if rec.code == 0 {
		rec.code = w.code
	}
	dur := time.Since(rec.start)
	ds := rec.ds
	var dst hostLabels
	dstPrincipal := "unknown"
	if rec.host != nil {
		dst = rec.host.spec.labels
		if !rec.host.spec.identity.IsZero() {
			dstPrincipal = rec.host.spec.identity.String()
		}
	}
	svcName, svcNS := "unknown", "unknown"
	if rec.service != "" {
		parts := strings.SplitN(rec.service, ".", 3)
		svcName = parts[0]
		if len(parts) > 1 {
			svcNS = parts[1]
		}
	}
	grpcStatus := ""
	if rec.protocol == "grpc" {
		grpcStatus = w.Header().Get("Grpc-Status")
		if grpcStatus == "" {
			grpcStatus = w.Header().Get("Trailer:Grpc-Status")
		}
	}
	flags := rec.flagString()
	code := strconv.Itoa(rec.code)
	srcCanon := orUnknown(ds.baggage.ServiceName)
	if srcCanon == "unknown" {
		srcCanon = orUnknown(ds.baggage.WorkloadName)
	}
	labels := []string{
		"waypoint",
		orUnknown(ds.baggage.WorkloadName), orUnknown(ds.baggage.Namespace), orUnknown(ds.principal()), srcCanon, orUnknown(ds.baggage.Version),
		orUnknown(dst.workload), orUnknown(dst.namespace), dstPrincipal,
		orUnknown(dst.canonicalService), orUnknown(dst.canonicalRevision),
		orUnknown(rec.service), svcName, svcNS,
		rec.protocol, code, grpcStatus, flags, "mutual_tls",
	}
	p.m.requests.WithLabelValues(labels...).Inc()
	p.m.duration.WithLabelValues(labels...).Observe(float64(dur.Microseconds()) / 1000)
	p.m.reqBytes.WithLabelValues(labels...).Observe(float64(rec.reqBytes.n.Load() + headerSize(rec.r)))
	p.m.respBytes.WithLabelValues(labels...).Observe(float64(w.bytes))
	upstream := "-"
	if rec.host != nil {
		upstream = rec.host.spec.addr.String()
	}
	p.access.Info("waypoint: request",
		"start_time", rec.start.UTC().Format(time.RFC3339Nano),
		"method", rec.r.Method,
		"path", rec.r.URL.RequestURI(),
		"protocol", rec.r.Proto,
		"response_code", rec.code,
		"response_flags", flags,
		"response_code_details", orDash(rec.details),
		"bytes_received", rec.reqBytes.n.Load(),
		"bytes_sent", w.bytes,
		"duration", dur.Milliseconds(),
		"upstream_service_time", rec.upstreamMs,
		"x_forwarded_for", orDash(rec.r.Header.Get("X-Forwarded-For")),
		"user_agent", orDash(rec.r.UserAgent()),
		"request_id", rec.requestID,
		"traceparent", rec.traceparent,
		"authority", rec.r.Host,
		"upstream_host", upstream,
		"upstream_cluster", orDash(rec.clusterName),
		"downstream_local_address", ds.target.String(),
		"downstream_remote_address", ds.peerAddr.String(),
		"route_name", orDash(rec.route),
		"attempts", rec.attempts,
		"source_principal", orDash(ds.principal()),
	)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func headerSize(r *http.Request) int64 {
	n := int64(len(r.Method) + len(r.URL.RequestURI()) + len(r.Host))
	for k, vs := range r.Header {
		for _, v := range vs {
			n += int64(len(k) + len(v))
		}
	}
	return n
}

// tcpConn returns the telemetry record of a tcp_proxy chain's stream
// (reporter "waypoint"); the destination is filled in once an endpoint is
// picked.
func tcpConn(chain *filterChain, ds *downstream) *telemetry.Conn {
	src := ds.srcAddr
	if !src.IsValid() {
		src = ds.peerAddr
	}
	return &telemetry.Conn{
		Direction: telemetry.Inbound, Via: "hbone", Reporter: "waypoint",
		Src: src, Dst: ds.target,
		Source:  telemetry.Peer{Workload: ds.baggage.WorkloadName, Namespace: ds.baggage.Namespace, Principal: ds.peer},
		Service: chain.service, Route: chain.tcp.cluster, MTLS: true,
	}
}

// tcpDestination names the endpoint h in c.
func tcpDestination(c *telemetry.Conn, h *host) {
	c.Destination = telemetry.Peer{Workload: h.spec.labels.workload, Namespace: h.spec.labels.namespace, Principal: h.spec.identity}
	c.Upstream = h.spec.addr
}
