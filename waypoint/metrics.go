package waypoint

import (
	"log/slog"
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

	// children: the request families' children by what their labels
	// derive from (one map lookup instead of four WithLabelValues calls).
	children telemetry.ChildCache[requestKey, *requestChildren]
}

// requestKey is everything a request's label values derive from (the peers
// without their UID and Pod, which are not labels).
type requestKey struct {
	src, dst              telemetry.Peer
	service               string
	protocol, grpc, flags string
	code                  int
}

// requestChildren are one label set's children of the request families.
type requestChildren struct {
	requests                      prometheus.Counter
	duration, reqBytes, respBytes prometheus.Observer
}

// requestChildren returns the children for tr's label set (service being
// the destination hostname tr.Service was derived from).
func (m *metrics) requestChildren(tr *telemetry.Traffic, service string) *requestChildren {
	k := requestKey{src: tr.Source, dst: tr.Destination, service: service,
		protocol: tr.Protocol, grpc: tr.GRPCStatus, flags: tr.Flags, code: tr.ResponseCode}
	k.src.UID, k.src.Pod, k.dst.UID, k.dst.Pod = "", "", "", ""
	return m.children.Get(k, func() *requestChildren {
		labels := tr.RequestValues()
		return &requestChildren{
			requests:  m.requests.WithLabelValues(labels...),
			duration:  m.duration.WithLabelValues(labels...),
			reqBytes:  m.reqBytes.WithLabelValues(labels...),
			respBytes: m.respBytes.WithLabelValues(labels...),
		}
	})
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
		CanonicalService: l.canonicalService, CanonicalRevision: l.canonicalRevision, Cluster: l.cluster, Principal: h.spec.identity}
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
	reqBytes := rec.reqBytes.n.Load()
	uri := rec.r.URL.RequestURI()
	durMs := float64(dur.Microseconds()) / 1000
	c := p.m.requestChildren(&tr, rec.service)
	c.requests.Inc()
	c.duration.Observe(durMs)
	c.reqBytes.Observe(float64(reqBytes + headerSize(rec.r, uri)))
	c.respBytes.Observe(float64(w.bytes))
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
	principal := ds.principal()
	ctx := rec.r.Context()
	transport := downstreamTransport(ctx) // the client's tunnel: h2 or h3
	fl := telemetry.Flow{Type: telemetry.FlowRequest, Time: rec.start, Reporter: "waypoint", Direction: telemetry.Inbound,
		Transport: rec.r.Proto, HBONETransport: transport, Via: "hbone",
		Source:      telemetry.FlowPeer{Address: src.String(), Workload: tr.Source.Workload, Namespace: tr.Source.Namespace, Identity: principal},
		Destination: telemetry.FlowPeer{Address: upstream, Workload: tr.Destination.Workload, Namespace: tr.Destination.Namespace},
		Service:     rec.service, Verdict: verdict, Policy: rec.policy, Reason: rec.details, ResponseFlags: flags,
		BytesSent: w.bytes, BytesReceived: reqBytes, DurationMs: durMs,
		Method: rec.r.Method, Authority: rec.r.Host, Path: rec.r.URL.Path, ResponseCode: rec.code}
	if !tr.Destination.Principal.IsZero() {
		fl.Destination.Identity = tr.Destination.Principal.String()
	}
	p.m.flows.Publish(fl)
	// The access log: typed attributes (no boxing into any), handed to the
	// handler directly (a record without a source PC: no runtime.Callers per
	// request), and nothing built at all when the logger discards the line.
	h := p.access.Handler()
	if !h.Enabled(ctx, slog.LevelInfo) {
		return
	}
	downstreamRemote := src.String()
	if src != ds.peerAddr {
		downstreamRemote = ds.peerAddr.String()
	}
	line := slog.NewRecord(time.Now(), slog.LevelInfo, "waypoint: request", 0)
	line.AddAttrs(
		slog.String("start_time", rec.start.UTC().Format(time.RFC3339Nano)),
		slog.String("method", rec.r.Method),
		slog.String("path", uri),
		slog.String("protocol", rec.r.Proto),
		slog.Int("response_code", rec.code),
		slog.String("response_flags", flags),
		slog.String("response_code_details", orDash(rec.details)),
		slog.Int64("bytes_received", reqBytes),
		slog.Int64("bytes_sent", w.bytes),
		slog.Int64("duration", dur.Milliseconds()),
		slog.Int64("upstream_service_time", rec.upstreamMs),
		slog.String("x_forwarded_for", orDash(rec.r.Header.Get("X-Forwarded-For"))),
		slog.String("user_agent", orDash(rec.r.UserAgent())),
		slog.String("request_id", rec.requestID),
		slog.String("traceparent", rec.traceparent),
		slog.String("authority", rec.r.Host),
		slog.String("upstream_host", upstream),
		slog.String("upstream_cluster", orDash(rec.clusterName)),
		slog.String("downstream_local_address", ds.target.String()),
		slog.String("downstream_remote_address", downstreamRemote),
		slog.String("route_name", orDash(rec.route)),
		slog.Int("attempts", rec.attempts),
		slog.String("source_principal", orDash(principal)),
		slog.String("transport", transport),
		slog.String("upstream_transport", upstreamTransport(rec.host)),
	)
	_ = h.Handle(ctx, line) // as slog.Logger does: a failed write is the handler's to report
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// headerSize is the request's size without its body (uri being
// r.URL.RequestURI()).
func headerSize(r *http.Request, uri string) int64 {
	n := int64(len(r.Method) + len(uri) + len(r.Host))
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
