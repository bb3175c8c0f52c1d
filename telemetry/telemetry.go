// Package telemetry is what ambit's proxies report about each proxied TCP
// connection, in Istio's words: the istio_tcp_* metrics with Istio's label
// set, one access-log line per connection, and the table of open
// connections (for an admin dump, a drain, or closing the connections of a
// workload that left). The ztunnel uses it for every connection; the
// waypoint for what it relays as TCP.
//
// A proxy makes one Tracker. Each connection is a Conn: Begin registers it
// when accepted; the handler fills in what it learns (peers, service, route,
// upstream); Establish counts it opened just before its bytes flow, and
// Conn.Count (a relay.Join hook) counts them as they move; End unregisters
// it, counts it closed with its response flags and writes its access-log
// line. Metric names, labels and log fields are Istio's (see Labels and
// End), so dashboards made for Istio's ztunnel read ambit's.
package telemetry

import (
	"cmp"
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/relay"
)

// Values of the response_flags label (Istio's ztunnel uses the same words).
const (
	FlagNone       = "-"       // served
	FlagDeny       = "DENY"    // refused by AuthorizationPolicy or PeerAuthentication
	FlagConnect    = "CONNECT" // the upstream (or tunnel) connect failed
	FlagNoRoute    = "NR"      // resolution failed (no endpoint, unknown port, missing waypoint)
	FlagNoSource   = "UNKNOWN_SOURCE"
	FlagNoDest     = "UNKNOWN_DESTINATION"
	FlagAborted    = "ABORTED" // closed by drain or shutdown
	FlagBadRequest = "BAD_REQUEST"
)

// Directions of a connection.
const (
	Outbound = "outbound" // from a local workload (reporter "source")
	Inbound  = "inbound"  // to a local workload (reporter "destination")
)

// TCPLabels are Istio's TCP metric labels, in this order.
var TCPLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_service",
	"response_flags", "connection_security_policy",
}

// Metrics are Istio's TCP connection metrics.
type Metrics struct {
	Opened, Closed, Sent, Received *prometheus.CounterVec
}

// NewMetrics makes the istio_tcp_* counters and registers them with reg
// (if not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Opened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_opened_total", Help: "TCP connections opened.",
		}, TCPLabels),
		Closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_closed_total", Help: "TCP connections closed.",
		}, TCPLabels),
		Sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_sent_bytes_total", Help: "Bytes sent back to the client (response direction).",
		}, TCPLabels),
		Received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_received_bytes_total", Help: "Bytes received from the client (request direction).",
		}, TCPLabels),
	}
	if reg != nil {
		reg.MustRegister(m.Opened, m.Closed, m.Sent, m.Received)
	}
	return m
}

// Peer is one end of a connection as telemetry names it.
type Peer struct {
	// UID identifies the workload (for matching connections to a workload
	// that leaves; not a label). Empty: unknown.
	UID string
	// Workload and Namespace are the workload's labels ("unknown" when
	// Workload is empty).
	Workload, Namespace string
	// Principal is its SPIFFE ID (zero: "unknown").
	Principal spiffeid.ID
}

// PrincipalLabel is the principal as a label value.
func (p Peer) PrincipalLabel() string {
	if p.Principal.IsZero() {
		return "unknown"
	}
	return p.Principal.String()
}

func (p Peer) names() (name, namespace string) {
	if p.Workload == "" {
		return "unknown", "unknown"
	}
	return p.Workload, p.Namespace
}

// Conn is one proxied connection. Begin sets ID (and Start, if zero); the
// handler sets the other fields before Establish (or End) and does not
// change them afterwards: readers of the table look at them only once
// Established reports true.
type Conn struct {
	ID        uint64
	Direction string // Inbound or Outbound
	Via       string // the listener, e.g. "outbound", "socks5", "hbone"
	// Reporter is the reporter label; empty: "destination" for Inbound,
	// else "source".
	Reporter string
	Start    time.Time
	Src, Dst netip.AddrPort // client address and original destination

	Source, Destination Peer
	Service             string         // destination service hostname ("" unknown)
	Route               string         // e.g. passthrough, direct, hbone, waypoint
	Upstream            netip.AddrPort // the address connected to
	MTLS                bool           // connection_security_policy mutual_tls
	// Transport is the HBONE transport of a tunnelled connection: "h2"
	// (HTTP/2 over TLS over TCP) or "h3" (HTTP/3 over QUIC); empty otherwise.
	Transport string
	// Cancel, if set, ends the connection: for whoever ends connections
	// found in the table (a drain, a workload leaving the node).
	Cancel context.CancelFunc

	established atomic.Bool
	received    atomic.Int64 // client -> upstream
	sent        atomic.Int64 // upstream -> client
	// set by Establish, read by Count
	rx, tx prometheus.Counter
	opened bool // counted opened; the handler's goroutine only
}

// Established reports whether Establish was called: the handler's fields
// are final.
func (c *Conn) Established() bool { return c.established.Load() }

// Received returns the bytes from the client so far; Sent those to it.
func (c *Conn) Received() int64 { return c.received.Load() }
func (c *Conn) Sent() int64     { return c.sent.Load() }

// Count adds n bytes moved in direction d, where the relay's a is the
// client and b the upstream (relay.Join(ctx, client, upstream, c.Count)).
func (c *Conn) Count(d relay.Direction, n int64) {
	if d == relay.AToB {
		c.received.Add(n)
		if c.rx != nil {
			c.rx.Add(float64(n))
		}
		return
	}
	c.sent.Add(n)
	if c.tx != nil {
		c.tx.Add(float64(n))
	}
}

// Labels returns c's Istio label values, in TCPLabels' order, with flags.
func (c *Conn) Labels(flags string) []string {
	reporter := c.Reporter
	if reporter == "" {
		reporter = "source"
		if c.Direction == Inbound {
			reporter = "destination"
		}
	}
	security := "none"
	if c.MTLS {
		security = "mutual_tls"
	}
	srcName, srcNS := c.Source.names()
	dstName, dstNS := c.Destination.names()
	svc := c.Service
	if svc == "" {
		svc = "unknown"
	}
	return []string{reporter, srcName, srcNS, c.Source.PrincipalLabel(), dstName, dstNS, c.Destination.PrincipalLabel(),
		svc, flags, security}
}

// Tracker keeps the table of open connections, counts them and logs them.
// The zero value is usable and neither counts nor logs.
type Tracker struct {
	// Metrics, if set, count connections and bytes.
	Metrics *Metrics
	// Logger receives the access log, one "connection" line at Info per
	// connection (nil: discard).
	Logger *slog.Logger

	mu     sync.Mutex // guards conns and nextID
	conns  map[uint64]*Conn
	nextID uint64
}

// Begin registers c, giving it an ID.
func (t *Tracker) Begin(c *Conn) {
	if c.Start.IsZero() {
		c.Start = time.Now()
	}
	t.mu.Lock()
	if t.conns == nil {
		t.conns = map[uint64]*Conn{}
	}
	t.nextID++
	c.ID = t.nextID
	t.conns[c.ID] = c
	t.mu.Unlock()
}

// Establish counts c opened and marks it established; call it on the
// handler's goroutine once its fields are final, before its bytes flow.
func (t *Tracker) Establish(c *Conn) {
	if m := t.Metrics; m != nil {
		l := c.Labels(FlagNone)
		c.rx, c.tx = m.Received.WithLabelValues(l...), m.Sent.WithLabelValues(l...)
		t.countOpened(c, l)
	}
	c.established.Store(true)
}

func (t *Tracker) countOpened(c *Conn, l []string) {
	if !c.opened {
		c.opened = true
		t.Metrics.Opened.WithLabelValues(l...).Inc()
	}
}

// End unregisters c, counts it closed with flags (and opened, if it never
// was) and writes its access-log line; reason explains a refusal or
// failure, err is the error, if any. Call it once, on the handler's
// goroutine.
func (t *Tracker) End(c *Conn, flags, reason string, err error) {
	t.mu.Lock()
	delete(t.conns, c.ID)
	t.mu.Unlock()
	l := c.Labels(flags)
	if t.Metrics != nil {
		t.countOpened(c, l)
		t.Metrics.Closed.WithLabelValues(l...).Inc()
	}
	if t.Logger == nil {
		return
	}
	attrs := make([]any, 0, 18)
	attrs = append(attrs,
		slog.Uint64("id", c.ID), slog.String("direction", c.Direction), slog.String("via", c.Via),
		slog.String("src", c.Src.String()), slog.String("dst", c.Dst.String()),
		slog.String("src_principal", l[3]), slog.String("dst_principal", l[6]),
		slog.String("src_workload", l[2]+"/"+l[1]),
		slog.String("dst_workload", l[5]+"/"+l[4]),
		slog.String("service", l[7]),
		slog.String("route", c.Route),
		slog.Int64("bytes_received", c.received.Load()), slog.Int64("bytes_sent", c.sent.Load()),
		slog.String("duration", time.Since(c.Start).Round(time.Microsecond).String()),
		slog.String("outcome", Outcome(flags)),
	)
	if c.Upstream.IsValid() {
		attrs = append(attrs, slog.String("upstream", c.Upstream.String()))
	}
	if reason != "" {
		attrs = append(attrs, slog.String("reason", reason))
	}
	if err != nil {
		attrs = append(attrs, slog.String("err", err.Error()))
	}
	t.Logger.Info("connection", attrs...)
}

// Outcome is the access log's outcome for response flags.
func Outcome(flags string) string {
	switch flags {
	case FlagNone:
		return "ok"
	case FlagDeny:
		return "denied"
	case FlagAborted:
		return "aborted"
	}
	return "failed"
}

// Len returns the number of open connections.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

// Open reports whether the connection id is still open.
func (t *Tracker) Open(id uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.conns[id]
	return ok
}

// Conns returns the open connections, by ID.
func (t *Tracker) Conns() []*Conn {
	t.mu.Lock()
	cs := make([]*Conn, 0, len(t.conns))
	for _, c := range t.conns {
		cs = append(cs, c)
	}
	t.mu.Unlock()
	slices.SortFunc(cs, func(a, b *Conn) int { return cmp.Compare(a.ID, b.ID) })
	return cs
}
