package waypoint

import (
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ambit-mesh/ambit/telemetry"
)

// The request families' labels are Istio's standard ones
// (telemetry.RequestLabels, reporter="waypoint"); the istio_tcp_* ones, of
// its tcp_proxy chains, the ztunnel's (telemetry.TCPLabels). Both derive
// their values in package telemetry.
var requestLabels = telemetry.RequestLabels

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
	// flows is the stream of request and TCP flow events (/debug/flows).
	flows *telemetry.Flows
	// claims bounds the source labels clients claim in baggage.
	claims *telemetry.Claims
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
	m.flows, m.claims = &telemetry.Flows{}, &telemetry.Claims{}
	m.reg.MustRegister(m.requests, m.duration, m.reqBytes, m.respBytes,
		m.noChain, m.mirrored, m.configApplied, m.configRejected,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// sourcePeer is the client as the waypoint names it: its verified
// identity, and what its baggage claims (bounded by telemetry.Claims).
func (m *metrics) sourcePeer(ds *downstream) telemetry.Peer {
	b := ds.baggage
	return m.claims.Peer(ds.peer, telemetry.Peer{
		Workload: b.WorkloadName, Namespace: b.Namespace,
		CanonicalService: b.ServiceName, CanonicalRevision: b.Version, Cluster: b.ClusterName,
	})
}

// destinationPeer names an endpoint from its metadata (nil: unknown).
func destinationPeer(h *host) telemetry.Peer {
	if h == nil {
		return telemetry.Peer{}
	}
	l := h.spec.labels
	return telemetry.Peer{Workload: l.workload, Namespace: l.namespace,
		CanonicalService: l.canonicalService, CanonicalRevision: l.canonicalRevision, Principal: h.spec.identity}
}

// finish records a request: metrics, a flow event and one access-log line.
func (p *Proxy) finish(rec *record, w *respWriter) {
	if rec.code == 0 {
		rec.code = w.code
	}
	dur := time.Since(rec.start)
	ds := rec.ds
	grpcStatus := ""
	if rec.protocol == "grpc" {
		grpcStatus = w.Header().Get("Grpc-Status")
		if grpcStatus == "" {
			grpcStatus = w.Header().Get("Trailer:Grpc-Status")
		}
	}
	flags := rec.flagString()
	tr := telemetry.Traffic{
		Reporter: "waypoint", Source: p.m.sourcePeer(ds), Destination: destinationPeer(rec.host),
		Service: telemetry.ServiceFromHost(rec.service), Protocol: rec.protocol,
		ResponseCode: rec.code, GRPCStatus: grpcStatus, Flags: flags, MTLS: true,
	}
	labels := tr.RequestValues()
	p.m.requests.WithLabelValues(labels...).Inc()
	p.m.duration.WithLabelValues(labels...).Observe(float64(dur.Microseconds()) / 1000)
	p.m.reqBytes.WithLabelValues(labels...).Observe(float64(rec.reqBytes.n.Load() + headerSize(rec.r)))
	p.m.respBytes.WithLabelValues(labels...).Observe(float64(w.bytes))
	upstream := "-"
	if rec.host != nil {
		upstream = rec.host.spec.addr.String()
	}
	verdict := telemetry.VerdictAllowed
	switch {
	case strings.HasPrefix(rec.details, "rbac_access_denied"):
		verdict = telemetry.VerdictDenied
	case flags != "-":
		verdict = telemetry.VerdictFailed
	}
	src := ds.srcAddr
	if !src.IsValid() {
		src = ds.peerAddr
	}
	fl := telemetry.Flow{Type: telemetry.FlowRequest, Time: rec.start, Reporter: "waypoint", Direction: telemetry.Inbound,
		Transport: rec.r.Proto, Via: "hbone",
		Source:      telemetry.FlowPeer{Address: src.String(), Workload: tr.Source.Workload, Namespace: tr.Source.Namespace, Identity: ds.principal()},
		Destination: telemetry.FlowPeer{Address: upstream, Workload: tr.Destination.Workload, Namespace: tr.Destination.Namespace},
		Service:     rec.service, Verdict: verdict, Reason: rec.details, ResponseFlags: flags,
		BytesSent: w.bytes, BytesReceived: rec.reqBytes.n.Load(), DurationMs: float64(dur.Microseconds()) / 1000,
		Method: rec.r.Method, Authority: rec.r.Host, Path: rec.r.URL.Path, ResponseCode: rec.code}
	if !tr.Destination.Principal.IsZero() {
		fl.Destination.Identity = tr.Destination.Principal.String()
	}
	p.m.flows.Publish(fl)
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
func (m *metrics) tcpConn(chain *filterChain, ds *downstream) *telemetry.Conn {
	src := ds.srcAddr
	if !src.IsValid() {
		src = ds.peerAddr
	}
	return &telemetry.Conn{
		Direction: telemetry.Inbound, Via: "hbone", Reporter: "waypoint",
		Src: src, Dst: ds.target,
		Source:  m.sourcePeer(ds),
		Service: telemetry.ServiceFromHost(chain.service), Route: chain.tcp.cluster, MTLS: true,
	}
}

// tcpDestination names the endpoint h in c.
func tcpDestination(c *telemetry.Conn, h *host) {
	c.Destination = destinationPeer(h)
	c.Upstream = h.spec.addr
}
