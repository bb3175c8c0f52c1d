package waypoint

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambit-mesh/ambit/hbone"
)

const httpProtocolOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

type upstreamProto int

const (
	protoHTTP1 upstreamProto = iota
	protoHTTP2
	protoDownstream // as the downstream request
)

// clusterSettings is a compiled Cluster: immutable, one per snapshot.
type clusterSettings struct {
	name, edsName  string
	service        string // hostname, from the cluster name
	connectTimeout time.Duration
	lb             clusterv3.Cluster_LbPolicy
	maxConns       int64
	maxPending     int64
	maxRequests    int64
	maxRetries     int64
	outlier        *outlierSettings // nil: off
	idleTimeout    time.Duration
	maxReqPerConn  int64 // 0: unlimited
	proto          upstreamProto
	h2MaxStreams   uint32
}

type outlierSettings struct {
	consec5xx, consecGw   int
	enforce5xx, enforceGw int // percent
	interval, base, max   time.Duration
	maxPercent            int
}

func compileCluster(c *clusterv3.Cluster) (*clusterSettings, error) {
	path := fmt.Sprintf("cluster %q: ", c.GetName())
	if c.GetType() != clusterv3.Cluster_EDS {
		return nil, fieldError(path+"type", "%v not supported (EDS only)", c.GetType())
	}
	s := &clusterSettings{name: c.GetName(), edsName: c.GetEdsClusterConfig().GetServiceName(), service: serviceFromCluster(c.GetName()),
		connectTimeout: defaultConnectTimeout, lb: c.GetLbPolicy(),
		maxConns: defaultCBLimit, maxPending: defaultCBLimit, maxRequests: defaultCBLimit, maxRetries: defaultCBRetries,
		idleTimeout: defaultIdleTimeout}
	if s.edsName == "" {
		s.edsName = s.name
	}
	if c.GetConnectTimeout() != nil {
		s.connectTimeout = dur(c.GetConnectTimeout())
	}
	switch s.lb {
	case clusterv3.Cluster_ROUND_ROBIN, clusterv3.Cluster_LEAST_REQUEST, clusterv3.Cluster_RANDOM:
	default:
		return nil, fieldError(path+"lb_policy", "%v not supported", s.lb)
	}
	for i, t := range c.GetCircuitBreakers().GetThresholds() {
		if t.GetPriority() != corev3.RoutingPriority_DEFAULT {
			continue // routes here are all DEFAULT priority
		}
		_ = i
		if v := t.GetMaxConnections(); v != nil {
			s.maxConns = int64(v.GetValue())
		}
		if v := t.GetMaxPendingRequests(); v != nil {
			s.maxPending = int64(v.GetValue())
		}
		if v := t.GetMaxRequests(); v != nil {
			s.maxRequests = int64(v.GetValue())
		}
		if v := t.GetMaxRetries(); v != nil {
			s.maxRetries = int64(v.GetValue())
		}
	}
	if od := c.GetOutlierDetection(); od != nil {
		if od.GetEnforcingSuccessRate() != nil && od.GetEnforcingSuccessRate().GetValue() != 0 {
			return nil, fieldError(path+"outlier_detection.enforcing_success_rate", "must be 0 (success-rate ejection not supported)")
		}
		o := &outlierSettings{consec5xx: defaultConsecutive, consecGw: defaultConsecutive, enforce5xx: 100, enforceGw: 0,
			interval: defaultOutlierInterval, base: defaultBaseEjection, max: defaultMaxEjection, maxPercent: defaultMaxEjectionPercent}
		if v := od.GetConsecutive_5Xx(); v != nil {
			o.consec5xx = int(v.GetValue())
		}
		if v := od.GetConsecutiveGatewayFailure(); v != nil {
			o.consecGw = int(v.GetValue())
		}
		if v := od.GetEnforcingConsecutive_5Xx(); v != nil {
			o.enforce5xx = int(v.GetValue())
		}
		if v := od.GetEnforcingConsecutiveGatewayFailure(); v != nil {
			o.enforceGw = int(v.GetValue())
		}
		if od.GetInterval() != nil {
			o.interval = dur(od.GetInterval())
		}
		if od.GetBaseEjectionTime() != nil {
			o.base = dur(od.GetBaseEjectionTime())
		}
		if od.GetMaxEjectionTime() != nil {
			o.max = dur(od.GetMaxEjectionTime())
		}
		o.max = max(o.max, o.base)
		if v := od.GetMaxEjectionPercent(); v != nil {
			o.maxPercent = int(v.GetValue())
		}
		s.outlier = o
	}
	if a, ok := c.GetTypedExtensionProtocolOptions()[httpProtocolOptionsKey]; ok {
		m, err := unpack(a, path+"typed_extension_protocol_options[\""+httpProtocolOptionsKey+"\"]")
		if err != nil {
			return nil, err
		}
		o, ok := m.(*upstreamhttpv3.HttpProtocolOptions)
		if !ok {
			return nil, fieldError(path+"typed_extension_protocol_options", "%T is not HttpProtocolOptions", m)
		}
		if co := o.GetCommonHttpProtocolOptions(); co != nil {
			if co.GetIdleTimeout() != nil {
				s.idleTimeout = dur(co.GetIdleTimeout())
			}
			if v := co.GetMaxRequestsPerConnection(); v != nil {
				s.maxReqPerConn = int64(v.GetValue())
			}
		}
		switch {
		case o.GetExplicitHttpConfig() != nil:
			if h2 := o.GetExplicitHttpConfig().GetHttp2ProtocolOptions(); h2 != nil {
				s.proto = protoHTTP2
				s.h2MaxStreams = h2.GetMaxConcurrentStreams().GetValue()
			}
		case o.GetUseDownstreamProtocolConfig() != nil:
			s.proto = protoDownstream
			s.h2MaxStreams = o.GetUseDownstreamProtocolConfig().GetHttp2ProtocolOptions().GetMaxConcurrentStreams().GetValue()
		}
	}
	for k := range c.GetTypedExtensionProtocolOptions() {
		if k != httpProtocolOptionsKey {
			return nil, fieldError(fmt.Sprintf("%styped_extension_protocol_options[%q]", path, k), "not supported")
		}
	}
	return s, nil
}

// hostLabels are an endpoint's metric labels.
type hostLabels struct {
	workload, namespace, canonicalService, canonicalRevision string
	cluster                                                  string // the workload's cluster ID
}

// endpointSpec is a compiled LbEndpoint.
type endpointSpec struct {
	addr      netip.AddrPort
	identity  spiffeid.ID
	hbonePort uint16
	// quic: the endpoint's ztunnel also serves HBONE over HTTP/3
	// (hbone_quic); node is the pod's node, sent with it.
	quic   bool
	node   string
	weight uint32
	labels hostLabels
}

// key identifies a host across updates: the same key keeps the host's
// connections and outlier state.
func (e endpointSpec) key() string {
	return fmt.Sprintf("%s|%s|%d|%v|%s|%d|%v", e.addr, e.identity, e.hbonePort, e.quic, e.node, e.weight, e.labels)
}

func compileEndpoints(cla *endpointv3.ClusterLoadAssignment) ([]endpointSpec, error) {
	var out []endpointSpec
	for i, lle := range cla.GetEndpoints() {
		path := fmt.Sprintf("endpoints %q: endpoints[%d]", cla.GetClusterName(), i)
		if lle.GetPriority() != 0 {
			return nil, fieldError(path+".priority", "only priority 0 is supported")
		}
		for j, le := range lle.GetLbEndpoints() {
			p := fmt.Sprintf("%s.lb_endpoints[%d]", path, j)
			switch le.GetHealthStatus() {
			case corev3.HealthStatus_UNKNOWN, corev3.HealthStatus_HEALTHY, corev3.HealthStatus_DEGRADED:
			default:
				continue // UNHEALTHY, DRAINING, TIMEOUT: not used
			}
			sa := le.GetEndpoint().GetAddress().GetSocketAddress()
			if sa == nil {
				return nil, fieldError(p+".endpoint.address.socket_address", "required")
			}
			ip, err := netip.ParseAddr(sa.GetAddress())
			if err != nil {
				return nil, fieldError(p+".endpoint.address.socket_address.address", "%v", err)
			}
			port, ok := sa.GetPortSpecifier().(*corev3.SocketAddress_PortValue)
			if !ok || port.PortValue == 0 || port.PortValue > 65535 {
				return nil, fieldError(p+".endpoint.address.socket_address.port_value", "required")
			}
			e := endpointSpec{addr: netip.AddrPortFrom(ip.Unmap(), uint16(port.PortValue)), weight: 1}
			if w := le.GetLoadBalancingWeight(); w != nil {
				e.weight = w.GetValue()
			}
			if md := le.GetMetadata().GetFilterMetadata()["ambit"]; md != nil {
				f := md.GetFields()
				if v := f["identity"].GetStringValue(); v != "" {
					id, err := spiffeid.FromString(v)
					if err != nil {
						return nil, fieldError(p+".metadata.filter_metadata[\"ambit\"].identity", "%v", err)
					}
					e.identity = id
				}
				if v := f["hbone_port"]; v != nil {
					n := v.GetNumberValue()
					if n < 0 || n > 65535 || n != float64(int(n)) {
						return nil, fieldError(p+".metadata.filter_metadata[\"ambit\"].hbone_port", "not a port: %v", n)
					}
					e.hbonePort = uint16(n)
				}
				if v := f["hbone_quic"]; v != nil {
					b, ok := v.GetKind().(*structpb.Value_BoolValue)
					if !ok {
						return nil, fieldError(p+".metadata.filter_metadata[\"ambit\"].hbone_quic", "not a bool")
					}
					e.quic = b.BoolValue
				}
				e.node = f["node"].GetStringValue()
				e.labels = hostLabels{workload: f["workload"].GetStringValue(), namespace: f["namespace"].GetStringValue(),
					canonicalService: f["canonical_service"].GetStringValue(), canonicalRevision: f["canonical_revision"].GetStringValue(),
					cluster: f["cluster"].GetStringValue()}
			}
			if e.quic && e.hbonePort == 0 {
				return nil, fieldError(p+".metadata.filter_metadata[\"ambit\"].hbone_quic", "requires hbone_port")
			}
			if e.hbonePort != 0 && e.identity.IsZero() {
				return nil, fieldError(p+".metadata.filter_metadata[\"ambit\"].identity", "required with hbone_port")
			}
			out = append(out, e)
		}
	}
	return out, nil
}

// cluster is a cluster's runtime state, kept across snapshots while the
// cluster exists: hosts (with their connection pools and outlier state) and
// circuit-breaker counters.
type cluster struct {
	name string

	mu      sync.Mutex       // guards the fields below
	hosts   map[string]*host // by endpointSpec.key
	slots   int64            // HTTP/1.1 connection slots in use
	pending int64            // requests waiting for a slot
	waiters []chan struct{}  // FIFO; closed when handed a slot

	active  atomic.Int64 // upstream requests in flight
	retries atomic.Int64 // retries in flight
	conns   atomic.Int64 // open upstream connections

	overflowRq, overflowPending, overflowRetry atomic.Uint64
	ejectionsTotal                             atomic.Uint64
}

// host is one endpoint: its connection pool and outlier state survive
// config updates that keep the endpoint.
type host struct {
	spec         endpointSpec
	active       atomic.Int64 // requests in flight (least request)
	conns        atomic.Int64
	ejectedUntil atomic.Int64 // unix nanos; 0: not ejected
	// transport is the HBONE transport (hbone.TransportH2, TransportH3) of
	// the newest upstream connection of h's pools; nil: none yet, or
	// plain TCP. The access log's upstream_transport.
	transport atomic.Pointer[string]

	mu        sync.Mutex // guards the fields below
	consec5xx int
	consecGw  int
	ejections int // multiplier for base_ejection_time
	rts       map[rtKey]http.RoundTripper
}

type rtKey struct {
	h2            bool
	idle          time.Duration
	connect       time.Duration
	maxReqPerConn int64
	maxStreams    uint32
}

func (h *host) ejected(now time.Time) bool {
	u := h.ejectedUntil.Load()
	return u != 0 && now.UnixNano() < u
}

func (h *host) closeIdle() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, rt := range h.rts {
		if ci, ok := rt.(interface{ CloseIdleConnections() }); ok {
			ci.CloseIdleConnections()
		}
	}
}

// clusterView is a cluster as one snapshot sees it.
type clusterView struct {
	s     *clusterSettings
	c     *cluster
	hosts []*host
	rr    atomic.Uint64
}

var errOverflow = errors.New("circuit breaker overflow")

// admit reserves capacity for one upstream request under the circuit
// breakers (Envoy's max_requests; for HTTP/1.1 also max_connections, with
// up to max_pending_requests waiting for a connection). It returns the
// release function, or errOverflow (503 UO), or ctx's error.
func (v *clusterView) admit(ctx context.Context, h2 bool) (func(), error) {
	c := v.c
	if c.active.Add(1) > v.s.maxRequests {
		c.active.Add(-1)
		c.overflowRq.Add(1)
		return nil, errOverflow
	}
	if h2 {
		return func() { c.active.Add(-1) }, nil
	}
	c.mu.Lock()
	if c.slots < v.s.maxConns {
		c.slots++
		c.mu.Unlock()
		return func() { v.releaseSlot(); c.active.Add(-1) }, nil
	}
	if c.pending >= v.s.maxPending {
		c.mu.Unlock()
		c.active.Add(-1)
		c.overflowPending.Add(1)
		return nil, errOverflow
	}
	c.pending++
	ch := make(chan struct{})
	c.waiters = append(c.waiters, ch)
	c.mu.Unlock()
	select {
	case <-ch:
		return func() { v.releaseSlot(); c.active.Add(-1) }, nil
	case <-ctx.Done():
		c.mu.Lock()
		for i, w := range c.waiters {
			if w == ch {
				c.waiters = append(c.waiters[:i], c.waiters[i+1:]...)
				c.pending--
				c.mu.Unlock()
				c.active.Add(-1)
				return nil, ctx.Err()
			}
		}
		c.mu.Unlock() // handed a slot meanwhile: give it back
		v.releaseSlot()
		c.active.Add(-1)
		return nil, ctx.Err()
	}
}

func (v *clusterView) releaseSlot() {
	c := v.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.waiters) > 0 {
		ch := c.waiters[0]
		c.waiters = c.waiters[1:]
		c.pending--
		close(ch) // the slot passes to the waiter
		return
	}
	c.slots--
}

// admitRetry reserves a retry under max_retries.
func (v *clusterView) admitRetry() bool {
	if v.c.retries.Add(1) > v.s.maxRetries {
		v.c.retries.Add(-1)
		v.c.overflowRetry.Add(1)
		return false
	}
	return true
}

// pick chooses a host by the cluster's LB policy among hosts not ejected,
// avoiding those in avoid when possible. nil: no healthy host.
func (v *clusterView) pick(now time.Time, avoid []*host) *host {
	healthy := make([]*host, 0, len(v.hosts))
	for _, h := range v.hosts {
		if !h.ejected(now) {
			healthy = append(healthy, h)
		}
	}
	if len(healthy) == 0 {
		return nil
	}
	if len(avoid) > 0 {
		fresh := healthy[:0:0]
		for _, h := range healthy {
			tried := false
			for _, a := range avoid {
				tried = tried || a == h
			}
			if !tried {
				fresh = append(fresh, h)
			}
		}
		if len(fresh) > 0 {
			healthy = fresh
		}
	}
	switch v.s.lb {
	case clusterv3.Cluster_LEAST_REQUEST:
		a, b := healthy[rand.IntN(len(healthy))], healthy[rand.IntN(len(healthy))]
		if b.active.Load() < a.active.Load() {
			return b
		}
		return a
	case clusterv3.Cluster_RANDOM:
		return weightedRandom(healthy)
	default:
		for _, h := range healthy {
			if h.spec.weight != healthy[0].spec.weight {
				return weightedRandom(healthy)
			}
		}
		return healthy[v.rr.Add(1)%uint64(len(healthy))]
	}
}

func weightedRandom(hs []*host) *host {
	var total uint64
	for _, h := range hs {
		total += uint64(max(h.spec.weight, 1))
	}
	x := rand.Uint64N(total)
	for _, h := range hs {
		w := uint64(max(h.spec.weight, 1))
		if x < w {
			return h
		}
		x -= w
	}
	return hs[len(hs)-1]
}

// outcome classes reported to outlier detection.
const (
	outcomeOK      = iota // < 500
	outcome5xx            // 500, 501, 505...
	outcomeGateway        // 502, 503, 504, and local failures (connect, reset, timeout)
)

// report feeds outlier detection (consecutive 5xx and gateway failures);
// it may eject h.
func (v *clusterView) report(h *host, outcome int, now time.Time) {
	o := v.s.outlier
	if o == nil {
		return
	}
	h.mu.Lock()
	switch outcome {
	case outcomeOK:
		h.consec5xx, h.consecGw = 0, 0
		h.mu.Unlock()
		return
	case outcome5xx:
		h.consec5xx++
		h.consecGw = 0
	case outcomeGateway:
		h.consec5xx++
		h.consecGw++
	}
	eject := (o.consec5xx > 0 && h.consec5xx >= o.consec5xx && rand.IntN(100) < o.enforce5xx) ||
		(o.consecGw > 0 && h.consecGw >= o.consecGw && rand.IntN(100) < o.enforceGw)
	if !eject || h.ejected(now) {
		h.mu.Unlock()
		return
	}
	h.mu.Unlock()
	// max_ejection_percent, but at least one host (Envoy).
	ejected := 0
	for _, x := range v.hosts {
		if x.ejected(now) {
			ejected++
		}
	}
	if ejected > 0 && (ejected+1)*100 > o.maxPercent*len(v.hosts) {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if u := h.ejectedUntil.Load(); u != 0 && o.interval > 0 { // decay: one step per healthy interval since
		healthyFor := now.Sub(time.Unix(0, u))
		h.ejections = max(0, h.ejections-int(healthyFor/o.interval))
	}
	h.ejections++
	d := min(o.base*time.Duration(h.ejections), o.max)
	h.ejectedUntil.Store(now.Add(d).UnixNano())
	h.consec5xx, h.consecGw = 0, 0
	v.c.ejectionsTotal.Add(1)
}

// connectError marks a failed upstream connect (response flag UF, retry
// condition connect-failure).
type connectError struct{ err error }

func (e *connectError) Error() string { return "upstream connect: " + e.err.Error() }
func (e *connectError) Unwrap() error { return e.err }

// countedConn counts open connections per host and cluster, and for an
// HBONE tunnel the ambit_hbone_* families (hboneCounters) of the upstream
// leg.
type countedConn struct {
	net.Conn
	once  sync.Once
	h     *host
	c     *cluster
	hbone *hboneCounters // nil: plain TCP
}

func (c *countedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.hbone != nil && n > 0 {
		c.hbone.sent.Add(float64(n))
	}
	return n, err
}

func (c *countedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if c.hbone != nil && n > 0 {
		c.hbone.received.Add(float64(n))
	}
	return n, err
}

func (c *countedConn) Close() error {
	c.once.Do(func() {
		c.h.conns.Add(-1)
		c.c.conns.Add(-1)
		if c.hbone != nil {
			c.hbone.closed.Inc()
		}
	})
	return c.Conn.Close()
}

// roundTripper returns h's connection pool for these settings: HTTP/1.1
// keep-alive (h1Pool) or HTTP/2 prior knowledge (h2Pool, on
// x/net/http2's ClientConn), both dialing through p.dialHost.
func (p *Proxy) roundTripper(v *clusterView, h *host, h2 bool) http.RoundTripper {
	k := rtKey{h2: h2, idle: v.s.idleTimeout, connect: v.s.connectTimeout, maxReqPerConn: v.s.maxReqPerConn, maxStreams: v.s.h2MaxStreams}
	h.mu.Lock()
	defer h.mu.Unlock()
	if rt, ok := h.rts[k]; ok {
		return rt
	}
	if h.rts == nil {
		h.rts = map[rtKey]http.RoundTripper{}
	}
	for old, rt := range h.rts { // the cluster's settings changed: retire the old pool of this protocol
		if old.h2 == k.h2 {
			rt.(interface{ CloseIdleConnections() }).CloseIdleConnections()
			delete(h.rts, old)
		}
	}
	c := v.c
	dial := func(ctx context.Context) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, k.connect)
		defer cancel()
		nc, err := p.dialHost(ctx, h)
		if err != nil {
			return nil, &connectError{err}
		}
		h.conns.Add(1)
		c.conns.Add(1)
		cc := &countedConn{Conn: nc, h: h, c: c}
		if st, ok := nc.(*hbone.Stream); ok {
			tr := st.Transport()
			h.transport.Store(&tr)
			cc.hbone = p.m.upstreamHBONE(tr)
			cc.hbone.opened.Inc()
		}
		return cc, nil
	}
	if h2 { // HTTP/2 with prior knowledge (h2c) inside the tunnel
		rt := newH2Pool(dial, k.idle, k.maxStreams, k.maxReqPerConn)
		h.rts[k] = rt
		return rt
	}
	rt := newH1Pool(dial, k.idle, k.maxReqPerConn)
	h.rts[k] = rt
	return rt
}
