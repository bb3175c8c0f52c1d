package xds

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
)

// StreamStatus is one connected client, for `ambitctl proxy-status`.
type StreamStatus struct {
	ID int64 `json:"id"`
	// Kind is the authenticated caller's kind ("node-proxy", "waypoint");
	// empty when the server does not authenticate.
	Kind string `json:"kind,omitempty"`
	// Node is the authenticated caller's node when the server requires
	// authentication (a node proxy whose xDS Node id names another is
	// refused), else the xDS Node id the client sent.
	Node string `json:"node"`
	// Caller is the authenticated caller ("pod <ns>/<name>", "host <name>",
	// "waypoint <ns>/<name>").
	Caller string `json:"caller,omitempty"`
	// Waypoint is the waypoint a waypoint caller is ("<ns>/<name>"): the one
	// whose resources its stream reads.
	Waypoint string `json:"waypoint,omitempty"`
	// ProxyID is the xDS Node id a waypoint sent (its pod or host name); it
	// selects nothing.
	ProxyID   string                 `json:"proxyId,omitempty"`
	Peer      string                 `json:"peer,omitempty"`
	Connected time.Time              `json:"connected"`
	Types     map[string]*TypeStatus `json:"types"` // by type URL

	caller *auth.Caller // the authenticated caller (nil when the server does not authenticate)
}

// TypeStatus is the state of one type on one stream. The client is in sync
// when AckedNonce equals SentNonce.
type TypeStatus struct {
	SentVersion  string    `json:"sentVersion"` // the cache revision of the last response
	SentNonce    string    `json:"sentNonce"`
	SentAt       time.Time `json:"sentAt"`
	SentCount    int       `json:"sentResources"` // resources in the last response
	AckedVersion string    `json:"ackedVersion,omitempty"`
	AckedNonce   string    `json:"ackedNonce,omitempty"`
	NackedNonce  string    `json:"nackedNonce,omitempty"`
	NackError    string    `json:"nackError,omitempty"`
	Responses    int       `json:"responses"`
	ACKs         int       `json:"acks"`
	NACKs        int       `json:"nacks"`

	sentVersions map[string]string // nonce -> version, for nonces not yet (N)ACKed
}

// Sync is "SYNCED", "STALE" (a response is not acknowledged yet) or
// "NACKED" (the client rejected the last response it answered).
func (t *TypeStatus) Sync() string {
	switch {
	case t.NackedNonce != "" && t.NackedNonce == t.SentNonce:
		return "NACKED"
	case t.AckedNonce == t.SentNonce:
		return "SYNCED"
	default:
		return "STALE"
	}
}

// statusTable tracks streams through the server callbacks.
type statusTable struct {
	mu      sync.Mutex // guards streams
	streams map[int64]*StreamStatus
	now     func() time.Time
}

// open records a stream; caller is its authenticated caller (nil when the
// server does not authenticate).
func (s *statusTable) open(ctx context.Context, id int64, caller *auth.Caller) {
	st := &StreamStatus{ID: id, Connected: s.now(), Types: map[string]*TypeStatus{}, Peer: peerAddr(ctx), caller: caller}
	if caller != nil {
		st.Kind, st.Node, st.Caller = caller.Kind.String(), caller.Node, caller.Name
		if caller.Kind == auth.Waypoint {
			st.Waypoint = caller.Waypoint.String()
		}
	}
	s.mu.Lock()
	s.streams[id] = st
	s.mu.Unlock()
}

// closed forgets a stream and returns its caller and whether it was open.
func (s *statusTable) closed(id int64) (*auth.Caller, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	delete(s.streams, id)
	if st == nil {
		return nil, false
	}
	return st.caller, true
}

// callerOf returns the stream's caller and whether the stream is known.
func (s *statusTable) callerOf(id int64) (*auth.Caller, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	if st == nil {
		return nil, false
	}
	return st.caller, true
}

func (s *statusTable) typ(st *StreamStatus, url string) *TypeStatus {
	t := st.Types[url]
	if t == nil {
		t = &TypeStatus{sentVersions: map[string]string{}}
		st.Types[url] = t
	}
	return t
}

// request records a request: the node, and an ACK or NACK of a nonce. It
// returns whether it was a NACK and the stream's node, or an error (a
// status) for a request whose node is not the authenticated caller's: a
// node proxy's Node id must be its node, a waypoint's Node cluster (when
// set) its waypoint.
func (s *statusTable) request(id int64, req *discovery.DeltaDiscoveryRequest) (nack bool, node string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	if st == nil {
		return false, "", nil
	}
	if n := req.GetNode(); n != nil {
		switch c := st.caller; {
		case c == nil:
			if n.GetId() != "" {
				st.Node = n.GetId()
			}
		case c.Kind == auth.Waypoint:
			if cl := n.GetCluster(); cl != "" && cl != st.Waypoint {
				return false, st.Node, status.Errorf(codes.PermissionDenied, "%s is waypoint %s: it may not claim cluster %q", st.Caller, st.Waypoint, cl)
			}
			st.ProxyID = n.GetId()
		case n.GetId() != "" && n.GetId() != st.Node:
			return false, st.Node, status.Errorf(codes.PermissionDenied, "%s is on node %s: it may not claim node %q", st.Caller, st.Node, n.GetId())
		}
	}
	nonce := req.GetResponseNonce()
	if nonce == "" {
		return false, st.Node, nil
	}
	t := s.typ(st, req.GetTypeUrl())
	if req.GetErrorDetail() != nil {
		t.NACKs++
		t.NackedNonce, t.NackError = nonce, req.GetErrorDetail().GetMessage()
		nack = true
	} else {
		t.ACKs++
		t.AckedNonce, t.AckedVersion = nonce, t.sentVersions[nonce]
	}
	delete(t.sentVersions, nonce)
	return nack, st.Node, nil
}

func (s *statusTable) response(id int64, resp *discovery.DeltaDiscoveryResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	if st == nil {
		return
	}
	t := s.typ(st, resp.GetTypeUrl())
	t.Responses++
	t.SentNonce, t.SentVersion, t.SentAt, t.SentCount = resp.GetNonce(), resp.GetSystemVersionInfo(), s.now(), len(resp.GetResources())+len(resp.GetRemovedResources())
	t.sentVersions[resp.GetNonce()] = resp.GetSystemVersionInfo()
	if len(t.sentVersions) > 64 { // a client that never answers: keep the table small
		for k := range t.sentVersions {
			if k != t.SentNonce {
				delete(t.sentVersions, k)
			}
		}
	}
}

// snapshot copies the table, sorted by stream id.
func (s *statusTable) snapshot() []StreamStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]StreamStatus, 0, len(s.streams))
	for _, st := range s.streams {
		c := *st
		c.Types = make(map[string]*TypeStatus, len(st.Types))
		for k, t := range st.Types {
			tc := *t
			tc.sentVersions = nil
			c.Types[k] = &tc
		}
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b StreamStatus) int { return int(a.ID - b.ID) })
	return out
}

// statusJSON is the debug endpoint's document.
type statusJSON struct {
	// Resources counts the node proxies' (workload) resources by type URL.
	Resources map[string]int `json:"resources"`
	// Waypoints are the connected waypoints' snapshots by "<ns>/<name>".
	Waypoints map[string]WaypointStatus `json:"waypoints"`
	Streams   []streamJSON              `json:"streams"`
}

type streamJSON struct {
	StreamStatus
	Sync map[string]string `json:"sync"`
}

// ServeHTTP serves the proxy status as JSON (mounted on the admin port at
// /debug/proxy-status).
func (s *Server) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	doc := statusJSON{Resources: s.workloads.cache.Resources(), Waypoints: s.waypoints.Status()}
	for _, st := range s.Status() {
		sj := streamJSON{StreamStatus: st, Sync: map[string]string{}}
		for k, t := range st.Types {
			sj.Sync[k] = t.Sync()
		}
		doc.Streams = append(doc.Streams, sj)
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(doc)
}

// callbacks connects go-control-plane's server to the cache and the status
// table.
type callbacks struct {
	s *Server
}

func (c callbacks) OnDeltaStreamOpen(ctx context.Context, id int64, _ string) error {
	caller := callerFrom(ctx)
	if caller == nil && c.s.authRequired {
		// Registered on a gRPC server without the interceptor: fail closed.
		c.s.log.Error("xds stream refused: not authenticated (is the interceptor of RequireAuthentication installed?)", "stream", id, "peer", peerAddr(ctx))
		return status.Error(codes.Unauthenticated, "not authenticated")
	}
	c.s.status.open(ctx, id, caller)
	c.s.Metrics.XDSConnected(callerKind(caller))
	switch {
	case caller == nil:
		c.s.log.Debug("xds stream opened", "stream", id)
	case caller.Kind == auth.Waypoint:
		c.s.waypoints.streamOpened(caller.Waypoint)
		c.s.log.Debug("xds stream opened", "stream", id, "caller", caller.Name, "callerKind", caller.Kind.String(), "waypoint", caller.Waypoint.String())
	default:
		c.s.log.Debug("xds stream opened", "stream", id, "caller", caller.Name, "callerKind", caller.Kind.String(), "node", caller.Node)
	}
	return nil
}

func (c callbacks) OnDeltaStreamClosed(id int64, node *core.Node) {
	caller, open := c.s.status.closed(id)
	if open {
		c.s.Metrics.XDSDisconnected(callerKind(caller))
	}
	c.s.workloads.cache.streamClosed(id)
	c.s.clock.streamClosed(id)
	if caller != nil && caller.Kind == auth.Waypoint {
		c.s.waypoints.streamClosed(id, caller.Waypoint)
	}
	c.s.log.Debug("xds stream closed", "stream", id, "node", node.GetId())
}

func (c callbacks) OnStreamDeltaRequest(id int64, req *discovery.DeltaDiscoveryRequest) error {
	caller, ok := c.s.status.callerOf(id)
	if !ok {
		return status.Error(codes.Internal, "unknown stream")
	}
	name := ""
	if caller != nil {
		name = caller.Name
	}
	if err := authorize(caller, req.GetTypeUrl()); err != nil {
		c.s.log.Warn("xds client refused", "stream", id, "caller", name, "type", req.GetTypeUrl(), "code", codes.PermissionDenied.String(), "reason", status.Convert(err).Message())
		return err
	}
	nack, node, err := c.s.status.request(id, req)
	if err != nil {
		c.s.log.Warn("xds client refused", "stream", id, "caller", name, "node", node, "claimedNode", req.GetNode().GetId(), "claimedCluster", req.GetNode().GetCluster(), "code", codes.PermissionDenied.String(), "reason", status.Convert(err).Message())
		return err
	}
	if nack {
		c.s.Metrics.XDSRejected(req.GetTypeUrl())
		c.s.log.Warn("xds NACK", "stream", id, "node", node, "caller", name, "type", req.GetTypeUrl(), "nonce", req.GetResponseNonce(), "error", req.GetErrorDetail().GetMessage())
	}
	c.s.clock.requested(id, req)
	if isEnvoyType(req.GetTypeUrl()) {
		c.s.waypoints.requestOnStream(id, caller.Waypoint, req) // authorize: caller is a waypoint
	} else {
		c.s.workloads.cache.requestOnStream(id, req)
	}
	return nil
}

func (c callbacks) OnStreamDeltaResponse(id int64, req *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
	c.s.status.response(id, resp)
	if c.s.clock.on() {
		caller, _ := c.s.status.callerOf(id)
		c.s.clock.responding(id, caller, req, resp)
	}
}

// callerKind is the caller's kind, empty for none.
func callerKind(c *auth.Caller) string {
	if c == nil {
		return ""
	}
	return c.Kind.String()
}
