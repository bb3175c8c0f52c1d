// Package telemetry is what ambit's proxies report about each proxied TCP
// connection and HTTP request, in Istio's words: the istio_tcp_* metrics
// (and istio_tcp_connections_failed_total) with the label set of Istio's
// ztunnel, the request label set of Istio's standard metrics, one
// access-log line per connection with the ztunnel's field names, the
// stream of flow events (Flows) an admin port serves, and the table of
// open connections (for an admin dump, a drain, or closing the
// connections of a workload that left). The ztunnel uses it for every
// connection; the waypoint for its requests and what it relays as TCP.
//
// Label values are derived once, here, for both proxies (Peer, Traffic):
// canonical service and revision as Istio derives them from pod labels
// (CanonicalService, CanonicalRevision), app and version as Istio's
// ztunnel sets them (the canonical ones), cluster from configuration. They
// are bounded: no address or per-connection value is a label, values are
// cut to MaxLabelLen and made valid UTF-8 (Bound), and what a client only
// claims about itself (baggage) is limited per verified identity (Claims).
//
// A proxy makes one Tracker. Each connection is a Conn: Begin registers it
// when accepted; the handler fills in what it learns (peers, service, route,
// upstream, deciding policy); Establish counts it opened just before its
// bytes flow, and Conn.Count (a relay.Join hook) counts them as they move;
// End unregisters it, counts it closed with its response flags and writes
// its access-log line. Both publish a flow event. The access-log format is
// documented, with an example, in docs/observability.md.
package telemetry

import (
	"cmp"
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

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

// Metrics are Istio's TCP connection metrics, and the connections that
// failed (never established: refused, no route, connect failure).
//
// The HBONE* families are ambit's: the tunnelled connections (those with a
// Conn.Transport) and their bytes, by reporter and transport ("h2" or
// "h3"). Istio has no transport label, and its families keep Istio's label
// sets exactly; these say how much of the mesh's traffic went over QUIC.
type Metrics struct {
	Opened, Closed, Sent, Received, Failed *prometheus.CounterVec

	HBONEOpened, HBONEClosed, HBONESent, HBONEReceived *prometheus.CounterVec

	// children: the families' children by what a connection's label
	// values derive from.
	children ChildCache[connKey, *connChildren]
}

// connKey is everything a connection's label values (Istio's and the
// ambit_hbone_* families') derive from: the peers without their UID and
// Pod, which are not labels.
type connKey struct {
	reporter, transport string
	src, dst            Peer
	service             Service
	flags               string
	mtls                bool
}

// Indexes of connChildren.c: one per family.
const (
	famOpened = iota
	famClosed
	famSent
	famReceived
	famFailed
	famHBONEOpened
	famHBONEClosed
	famHBONESent
	famHBONEReceived
	numFamilies
)

// connChildren are one label set's children of the families, each looked
// up the first time it is used (so that no family gets a series it would
// not have had without the cache).
type connChildren struct {
	labels              []string // Istio's label values
	reporter, transport string   // the ambit_hbone_* label values (transport "": not tunnelled)
	c                   [numFamilies]atomic.Pointer[prometheus.Counter]
}

// counter returns the child of vec (family fam) for ch's label values.
func (ch *connChildren) counter(fam int, vec *prometheus.CounterVec) prometheus.Counter {
	if p := ch.c[fam].Load(); p != nil {
		return *p
	}
	var c prometheus.Counter
	if fam >= famHBONEOpened {
		c = vec.WithLabelValues(ch.reporter, ch.transport)
	} else {
		c = vec.WithLabelValues(ch.labels...)
	}
	// Racing lookups store the same child: WithLabelValues is idempotent.
	ch.c[fam].Store(&c)
	return c
}

// childrenFor returns the children for c's label values with flags.
func (m *Metrics) childrenFor(c *Conn, flags string) *connChildren {
	reporter, transport, _ := c.hboneLabels()
	k := connKey{reporter: c.reporter(), transport: transport, src: c.Source, dst: c.Destination,
		service: c.Service, flags: flags, mtls: c.MTLS}
	k.src.UID, k.src.Pod, k.dst.UID, k.dst.Pod = "", "", "", ""
	return m.children.Get(k, func() *connChildren {
		return &connChildren{labels: c.Labels(flags), reporter: reporter, transport: transport}
	})
}

// HBONELabels are the labels of the ambit_hbone_* families.
var HBONELabels = []string{"reporter", "transport"}

// NewMetrics makes the istio_tcp_* counters and registers them with reg
// (if not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	counter := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, TCPLabels)
	}
	m := &Metrics{
		Opened:   counter("istio_tcp_connections_opened_total", "The total number of TCP connections opened."),
		Closed:   counter("istio_tcp_connections_closed_total", "The total number of TCP connections closed."),
		Sent:     counter("istio_tcp_sent_bytes_total", "Bytes sent back to the client (response direction)."),
		Received: counter("istio_tcp_received_bytes_total", "Bytes received from the client (request direction)."),
		Failed: counter("istio_tcp_connections_failed_total",
			"TCP connections that ended without being established (refused by policy, no route, connect failure), by response flag."),
	}
	hbone := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, HBONELabels)
	}
	m.HBONEOpened = hbone("ambit_hbone_connections_opened_total", "Tunnelled (HBONE) connections opened, by transport (h2: HTTP/2 over TLS over TCP, h3: HTTP/3 over QUIC).")
	m.HBONEClosed = hbone("ambit_hbone_connections_closed_total", "Tunnelled (HBONE) connections closed, by transport.")
	m.HBONESent = hbone("ambit_hbone_sent_bytes_total", "Bytes sent back to the client of tunnelled connections, by transport.")
	m.HBONEReceived = hbone("ambit_hbone_received_bytes_total", "Bytes received from the client of tunnelled connections, by transport.")
	if reg != nil {
		reg.MustRegister(m.Opened, m.Closed, m.Sent, m.Received, m.Failed,
			m.HBONEOpened, m.HBONEClosed, m.HBONESent, m.HBONEReceived)
	}
	return m
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
	// HBONETarget is the CONNECT authority of a tunnelled connection
	// (Istio's dst.hbone_addr), when it differs from Dst.
	HBONETarget netip.AddrPort

	Source, Destination Peer
	Service             Service        // destination service (zero: unknown)
	Route               string         // e.g. passthrough, direct, hbone, waypoint
	Upstream            netip.AddrPort // the address connected to
	MTLS                bool           // connection_security_policy mutual_tls
	// Transport is the HBONE transport of a tunnelled connection: "h2"
	// (HTTP/2 over TLS over TCP) or "h3" (HTTP/3 over QUIC); empty otherwise.
	Transport string
	// Policy is the AuthorizationPolicy ("<namespace>/<name>") that allowed
	// or denied the connection, when one did.
	Policy string
	// Cancel, if set, ends the connection: for whoever ends connections
	// found in the table (a drain, a workload leaving the node).
	Cancel context.CancelFunc

	established atomic.Bool
	received    atomic.Int64 // client -> upstream
	sent        atomic.Int64 // upstream -> client
	// set by Establish, read by Count
	rx, tx   prometheus.Counter
	hrx, htx prometheus.Counter // the ambit_hbone_* byte counters (tunnelled only)
	opened   bool               // counted opened; the handler's goroutine only
	// set by Establish, the children of its label set (flags "-"), reused
	// by End; the handler's goroutine only
	children *connChildren
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
		if c.hrx != nil {
			c.hrx.Add(float64(n))
		}
		return
	}
	c.sent.Add(n)
	if c.tx != nil {
		c.tx.Add(float64(n))
	}
	if c.htx != nil {
		c.htx.Add(float64(n))
	}
}

// hboneLabels are c's ambit_hbone_* label values; ok is false for a
// connection that is not tunnelled. transport is bounded: it is one of
// the transports a proxy sets, else "unknown".
func (c *Conn) hboneLabels() (reporter, transport string, ok bool) {
	switch c.Transport {
	case "":
		return "", "", false
	case "h2", "h3":
		return c.reporter(), c.Transport, true
	}
	return c.reporter(), Unknown, true
}

// reporter is the reporter label.
func (c *Conn) reporter() string {
	switch {
	case c.Reporter != "":
		return c.Reporter
	case c.Direction == Inbound:
		return "destination"
	}
	return "source"
}

// Traffic is what c's labels say, with response flags.
func (c *Conn) Traffic(flags string) Traffic {
	return Traffic{Reporter: c.reporter(), Source: c.Source, Destination: c.Destination, Service: c.Service,
		Protocol: "tcp", Flags: flags, MTLS: c.MTLS}
}

// Labels returns c's Istio label values, in TCPLabels' order, with flags.
func (c *Conn) Labels(flags string) []string {
	t := c.Traffic(flags)
	return t.TCPValues()
}

// Tracker keeps the table of open connections, counts them, logs them and
// streams them as flows. The zero value is usable and neither counts, logs
// nor streams.
type Tracker struct {
	// Metrics, if set, count connections and bytes.
	Metrics *Metrics
	// Logger receives the access log, one "connection complete" line per
	// connection (nil: discard); see AccessLog for its fields.
	Logger *slog.Logger
	// Flows, if set, receives an open and a close event per connection.
	Flows *Flows

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
		ch := m.childrenFor(c, FlagNone)
		c.children = ch
		c.rx, c.tx = ch.counter(famReceived, m.Received), ch.counter(famSent, m.Sent)
		if ch.transport != "" && m.HBONEOpened != nil {
			c.hrx, c.htx = ch.counter(famHBONEReceived, m.HBONEReceived), ch.counter(famHBONESent, m.HBONESent)
			ch.counter(famHBONEOpened, m.HBONEOpened).Inc()
		}
		t.countOpened(c, ch)
	}
	c.established.Store(true)
	if t.Flows != nil {
		t.Flows.Publish(c.flow(FlowOpen, FlagNone, ""))
	}
}

func (t *Tracker) countOpened(c *Conn, ch *connChildren) {
	if !c.opened {
		c.opened = true
		ch.counter(famOpened, t.Metrics.Opened).Inc()
	}
}

// End unregisters c, counts it closed with flags (and opened, if it never
// was; failed, if it never was established and was not aborted), writes
// its access-log line and publishes its close flow; reason explains a
// refusal or failure, err is the error, if any. Call it once, on the
// handler's goroutine.
func (t *Tracker) End(c *Conn, flags, reason string, err error) {
	t.mu.Lock()
	delete(t.conns, c.ID)
	t.mu.Unlock()
	if m := t.Metrics; m != nil {
		ch := c.children
		if ch == nil || flags != FlagNone {
			ch = m.childrenFor(c, flags)
		}
		t.countOpened(c, ch)
		ch.counter(famClosed, m.Closed).Inc()
		if !c.Established() && flags != FlagNone && flags != FlagAborted {
			ch.counter(famFailed, m.Failed).Inc()
		}
		if ch.transport != "" && c.Established() && m.HBONEClosed != nil {
			ch.counter(famHBONEClosed, m.HBONEClosed).Inc()
		}
	}
	if t.Flows != nil {
		t.Flows.Publish(c.flow(FlowClose, flags, reason))
	}
	// The context Logger.Info would pass: End has none from its caller.
	if ctx := context.Background(); t.Logger != nil && t.Logger.Enabled(ctx, slog.LevelInfo) {
		t.Logger.LogAttrs(ctx, slog.LevelInfo, AccessLogMessage, c.accessLog(flags, reason, err)...)
	}
}

// flow is c's flow event.
func (c *Conn) flow(typ, flags, reason string) Flow {
	transport := "tcp"
	if c.MTLS {
		transport = "hbone"
	}
	fl := Flow{Type: typ, Reporter: c.reporter(), Direction: c.Direction, Transport: transport, HBONETransport: c.Transport, Via: c.Via, ID: c.ID,
		Source: flowPeer(c.Src, c.Source), Destination: flowPeer(c.Dst, c.Destination), Service: c.Service.Hostname,
		Verdict: Verdict(flags), Policy: c.Policy, ResponseFlags: flags,
		BytesSent: c.sent.Load(), BytesReceived: c.received.Load()}
	if typ == FlowClose {
		fl.Reason = reason
		fl.DurationMs = float64(time.Since(c.Start).Microseconds()) / 1000
	}
	return fl
}

func flowPeer(a netip.AddrPort, p Peer) FlowPeer {
	fp := FlowPeer{Pod: p.Pod, Workload: p.Workload, Namespace: p.Namespace}
	if a.IsValid() {
		fp.Address = a.String()
	}
	if !p.Principal.IsZero() {
		fp.Identity = p.Principal.String()
	}
	return fp
}

// AccessLogMessage is the message of every access-log line (Istio's
// ztunnel's).
const AccessLogMessage = "connection complete"

// accessLog is c's access-log line: Istio's ztunnel's fields (src.*,
// dst.*, direction, bytes_sent, bytes_recv, duration, error), then
// ambit's (id, via, route, transport, upstream, response_flags, outcome,
// policy, reason); transport is the HBONE transport, h2 or h3, of a
// tunnelled connection. bytes_recv counts the client's bytes (request direction),
// bytes_sent those sent back to it, whatever the direction.
func (c *Conn) accessLog(flags, reason string, err error) []slog.Attr {
	name := func(p Peer) string { return cmp.Or(p.Pod, p.Workload, p.CanonicalService) }
	a := make([]slog.Attr, 0, 24)
	str := func(k, v string) {
		if v != "" {
			a = append(a, slog.String(k, v))
		}
	}
	str("src.addr", addrString(c.Src))
	str("src.workload", name(c.Source))
	str("src.namespace", c.Source.Namespace)
	if c.MTLS && !c.Source.Principal.IsZero() {
		str("src.identity", c.Source.Principal.String())
	}
	str("dst.addr", addrString(c.Dst))
	if c.HBONETarget.IsValid() && c.HBONETarget != c.Dst {
		str("dst.hbone_addr", c.HBONETarget.String())
	}
	str("dst.service", c.Service.Hostname)
	str("dst.workload", name(c.Destination))
	str("dst.namespace", c.Destination.Namespace)
	if c.MTLS && !c.Destination.Principal.IsZero() {
		str("dst.identity", c.Destination.Principal.String())
	}
	a = append(a,
		slog.String("direction", c.Direction),
		slog.Int64("bytes_sent", c.sent.Load()),
		slog.Int64("bytes_recv", c.received.Load()),
		slog.String("duration", strconv.FormatInt(time.Since(c.Start).Milliseconds(), 10)+"ms"),
	)
	if err != nil {
		a = append(a, slog.String("error", err.Error()))
	}
	a = append(a, slog.Uint64("id", c.ID), slog.String("via", c.Via))
	str("route", c.Route)
	str("transport", c.Transport)
	str("upstream", addrString(c.Upstream))
	a = append(a, slog.String("response_flags", flags), slog.String("outcome", Outcome(flags)))
	str("policy", c.Policy)
	str("reason", reason)
	return a
}

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
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
