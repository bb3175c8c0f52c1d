package telemetry

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Flow types.
const (
	FlowOpen    = "open"    // a connection was established (its bytes start to flow)
	FlowClose   = "close"   // a connection ended (or was refused before it opened)
	FlowRequest = "request" // an HTTP request ended (waypoint)
	FlowLost    = "lost"    // this reader missed Lost events (it read too slowly)
	FlowHello   = "hello"   // first line of a followed stream: the reader is subscribed
)

// Verdicts of a flow.
const (
	VerdictAllowed = "allowed"
	VerdictDenied  = "denied" // by AuthorizationPolicy, PeerAuthentication or waypoint bypass
	VerdictFailed  = "failed" // no route, connect failure, unknown peer...
)

// Flow is one event of a proxy's flow stream: a connection opened or
// closed, or a request served (Hubble's flows, linkerd's tap).
type Flow struct {
	Type      string    `json:"type"`
	Time      time.Time `json:"time"`
	Node      string    `json:"node,omitempty"`
	Reporter  string    `json:"reporter,omitempty"`  // source, destination, waypoint
	Direction string    `json:"direction,omitempty"` // outbound, inbound
	// Transport is how the bytes travelled: "hbone" (mutual TLS) or "tcp"
	// (plaintext); at the waypoint the request's protocol (HTTP/1.1, HTTP/2).
	Transport string `json:"transport,omitempty"`
	// HBONETransport is the tunnel's transport when Transport is hbone:
	// "h2" (HTTP/2 over TLS over TCP) or "h3" (HTTP/3 over QUIC).
	HBONETransport string   `json:"hboneTransport,omitempty"`
	Via            string   `json:"via,omitempty"` // the listener
	ID             uint64   `json:"id,omitempty"`
	Source         FlowPeer `json:"source"`
	Destination    FlowPeer `json:"destination"`
	Service        string   `json:"service,omitempty"`
	Verdict        string   `json:"verdict,omitempty"`
	// Policy is the AuthorizationPolicy ("<namespace>/<name>") that decided
	// the verdict, when one did.
	Policy        string  `json:"policy,omitempty"`
	Reason        string  `json:"reason,omitempty"`
	ResponseFlags string  `json:"responseFlags,omitempty"`
	BytesSent     int64   `json:"bytesSent"`     // to the client
	BytesReceived int64   `json:"bytesReceived"` // from the client
	DurationMs    float64 `json:"durationMs"`
	// Requests (waypoint) only.
	Method       string `json:"method,omitempty"`
	Authority    string `json:"authority,omitempty"`
	Path         string `json:"path,omitempty"`
	ResponseCode int    `json:"responseCode,omitempty"`
	// Lost is, on a FlowLost event, how many events this reader missed.
	Lost uint64 `json:"lost,omitempty"`
}

// FlowPeer is one end of a flow.
type FlowPeer struct {
	Address   string `json:"address,omitempty"`
	Pod       string `json:"pod,omitempty"`
	Workload  string `json:"workload,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	Identity  string `json:"identity,omitempty"`
}

// Verdict is the verdict of a connection ended with response flags.
func Verdict(flags string) string {
	switch flags {
	case FlagNone, FlagAborted, "":
		return VerdictAllowed
	case FlagDeny, "RBAC":
		return VerdictDenied
	}
	return VerdictFailed
}

// FlowFilter selects flows. Empty fields match everything.
type FlowFilter struct {
	Namespace string // either end's namespace
	// Pod matches either end's pod or workload name, or "<namespace>/<name>".
	Pod      string
	Verdict  string // allowed, denied, failed
	Identity string // either end's SPIFFE ID
	Reporter string
	Type     string // open, close, request
}

// ParseFlowFilter reads a filter from URL query parameters (namespace, pod,
// verdict, identity, reporter, type).
func ParseFlowFilter(q url.Values) (FlowFilter, error) {
	f := FlowFilter{Namespace: q.Get("namespace"), Pod: q.Get("pod"), Verdict: q.Get("verdict"),
		Identity: q.Get("identity"), Reporter: q.Get("reporter"), Type: q.Get("type")}
	switch f.Verdict {
	case "", VerdictAllowed, VerdictDenied, VerdictFailed:
	default:
		return f, fmt.Errorf("verdict %q: want allowed, denied or failed", f.Verdict)
	}
	switch f.Type {
	case "", FlowOpen, FlowClose, FlowRequest:
	default:
		return f, fmt.Errorf("type %q: want open, close or request", f.Type)
	}
	return f, nil
}

// Query is f as URL query parameters (ParseFlowFilter's input).
func (f FlowFilter) Query() url.Values {
	q := url.Values{}
	for k, v := range map[string]string{"namespace": f.Namespace, "pod": f.Pod, "verdict": f.Verdict,
		"identity": f.Identity, "reporter": f.Reporter, "type": f.Type} {
		if v != "" {
			q.Set(k, v)
		}
	}
	return q
}

// Match reports whether fl passes f. Lost events always pass.
func (f FlowFilter) Match(fl *Flow) bool {
	if fl.Type == FlowLost {
		return true
	}
	either := func(m func(p *FlowPeer) bool) bool { return m(&fl.Source) || m(&fl.Destination) }
	switch {
	case f.Namespace != "" && !either(func(p *FlowPeer) bool { return p.Namespace == f.Namespace }):
		return false
	case f.Pod != "" && !either(func(p *FlowPeer) bool { return podMatch(p, f.Pod) }):
		return false
	case f.Verdict != "" && fl.Verdict != f.Verdict:
		return false
	case f.Identity != "" && !either(func(p *FlowPeer) bool { return p.Identity == f.Identity }):
		return false
	case f.Reporter != "" && fl.Reporter != f.Reporter:
		return false
	case f.Type != "" && fl.Type != f.Type:
		return false
	}
	return true
}

func podMatch(p *FlowPeer, want string) bool {
	if ns, name, ok := strings.Cut(want, "/"); ok {
		return p.Namespace == ns && (p.Pod == name || p.Workload == name)
	}
	return want != "" && (p.Pod == want || p.Workload == want)
}

// Defaults of Flows.
const (
	DefaultFlowsRecent = 1024
	DefaultFlowsBuffer = 1024
	// FlowWriteTimeout disconnects a reader that accepts no byte for this
	// long.
	FlowWriteTimeout = 10 * time.Second
)

// Flows is a proxy's stream of flow events: the last Recent of them, and
// any number of readers, each with its own bounded buffer. Publish never
// waits for a reader: when a reader's buffer is full its events are dropped
// and counted, and the reader is told how many it lost. The zero value is
// ready to use.
type Flows struct {
	// Node names the proxy's node in every event.
	Node string
	// Recent is how many past events a new reader may ask for
	// (DefaultFlowsRecent if zero).
	Recent int
	// Buffer is each reader's buffer, in events (DefaultFlowsBuffer if zero).
	Buffer int

	mu   sync.Mutex // guards ring, head, full, subs
	ring []Flow
	head int // next slot of ring
	full bool
	subs map[*FlowSub]struct{}

	published, dropped atomic.Uint64
}

// FlowSub is one reader of a Flows.
type FlowSub struct {
	f      *Flows
	filter FlowFilter
	ch     chan Flow
	lost   atomic.Uint64
}

// C delivers the reader's events.
func (s *FlowSub) C() <-chan Flow { return s.ch }

// TakeLost returns how many events the reader lost since the last call.
func (s *FlowSub) TakeLost() uint64 { return s.lost.Swap(0) }

// Close stops delivery; C is not closed.
func (s *FlowSub) Close() {
	s.f.mu.Lock()
	delete(s.f.subs, s)
	s.f.mu.Unlock()
}

// Counts returns how many events were published and how many a reader
// missed (summed over readers).
func (f *Flows) Counts() (published, dropped uint64) {
	return f.published.Load(), f.dropped.Load()
}

// Readers returns the number of readers.
func (f *Flows) Readers() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.subs)
}

// Publish records fl (Node and Time filled in when empty) and hands it to
// the readers whose filter it passes, without waiting for any.
func (f *Flows) Publish(fl Flow) {
	if f == nil {
		return
	}
	if fl.Node == "" {
		fl.Node = f.Node
	}
	if fl.Time.IsZero() {
		fl.Time = time.Now()
	}
	f.published.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ring == nil {
		f.ring = make([]Flow, positiveOr(f.Recent, DefaultFlowsRecent))
	}
	f.ring[f.head] = fl
	f.head++
	if f.head == len(f.ring) {
		f.head, f.full = 0, true
	}
	for s := range f.subs {
		if !s.filter.Match(&fl) {
			continue
		}
		select {
		case s.ch <- fl:
		default:
			s.lost.Add(1)
			f.dropped.Add(1)
		}
	}
}

// Subscribe starts a reader of events passing filter; it first receives
// up to last recent ones.
func (f *Flows) Subscribe(filter FlowFilter, last int) *FlowSub {
	s := &FlowSub{f: f, filter: filter, ch: make(chan Flow, positiveOr(f.Buffer, DefaultFlowsBuffer))}
	f.mu.Lock()
	defer f.mu.Unlock()
	if last > 0 && f.ring != nil {
		var past []Flow
		n := len(f.ring)
		start, count := 0, f.head
		if f.full {
			start, count = f.head, n
		}
		for i := 0; i < count; i++ {
			fl := &f.ring[(start+i)%n]
			if filter.Match(fl) {
				past = append(past, *fl)
			}
		}
		if len(past) > last {
			past = past[len(past)-last:]
		}
		for _, fl := range past {
			select {
			case s.ch <- fl:
			default:
				s.lost.Add(1)
			}
		}
	}
	if f.subs == nil {
		f.subs = map[*FlowSub]struct{}{}
	}
	f.subs[s] = struct{}{}
	return s
}

// ServeHTTP streams flows as JSON lines (GET, query: the filter's fields,
// last=N recent events first, follow=true to keep streaming; without
// follow, the recent events only, 20 unless last says). A reader that lost
// events gets a line {"type":"lost","lost":N} before the next event; one
// that takes no byte for FlowWriteTimeout is disconnected.
func (f *Flows) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	filter, err := ParseFlowFilter(q)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	follow, _ := strconv.ParseBool(q.Get("follow"))
	last := 20
	if follow {
		last = 0
	}
	if v := q.Get("last"); v != "" {
		if last, err = strconv.Atoi(v); err != nil || last < 0 {
			http.Error(w, "last: want a count", http.StatusBadRequest)
			return
		}
	}
	s := f.Subscribe(filter, last)
	defer s.Close()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	write := func(fl Flow) bool {
		_ = rc.SetWriteDeadline(time.Now().Add(FlowWriteTimeout))
		if err := enc.Encode(fl); err != nil {
			return false
		}
		if len(s.ch) > 0 && bw.Buffered() < 32<<10 {
			return true // more to come at once: flush after them
		}
		return bw.Flush() == nil && rc.Flush() == nil
	}
	if !follow {
		for {
			select {
			case fl := <-s.ch:
				if !write(fl) {
					return
				}
			default:
				if n := s.TakeLost(); n > 0 {
					write(Flow{Type: FlowLost, Time: time.Now(), Node: f.Node, Lost: n})
				}
				bw.Flush()
				return
			}
		}
	}
	if !write(Flow{Type: FlowHello, Time: time.Now(), Node: f.Node}) {
		return
	}
	tick := time.NewTicker(time.Second) // reports losses when no event follows them
	defer tick.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-tick.C:
			if n := s.TakeLost(); n > 0 {
				if !write(Flow{Type: FlowLost, Time: time.Now(), Node: f.Node, Lost: n}) {
					return
				}
			}
		case fl := <-s.ch:
			if n := s.TakeLost(); n > 0 {
				if !write(Flow{Type: FlowLost, Time: time.Now(), Node: f.Node, Lost: n}) {
					return
				}
			}
			if !write(fl) {
				return
			}
		}
	}
}
