package hbone

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Defaults for the optional fields of Dialer and Server.
const (
	DefaultMaxStreamsPerConn    = 100
	DefaultMaxConcurrentStreams = 100
	DefaultIdleTimeout          = 3 * time.Minute
	DefaultHandshakeTimeout     = 10 * time.Second
	DefaultKeepAlive            = 30 * time.Second
	DefaultMaxHeaderBytes       = 16 << 10

	// Bounds on a Server's connections still in their handshake.
	DefaultMaxPendingHandshakes          = 1024
	DefaultMaxPendingHandshakesPerSource = 64
	DefaultHandshakeTimeoutUnderLoad     = 2 * time.Second

	// Flow-control windows and frame size, as Istio's ztunnel uses them.
	streamWindow = 4 << 20
	connWindow   = 16 << 20
	maxFrameSize = 1 << 20
)

// CertSource supplies this proxy's workload certificates and the trust
// bundles to verify peers with. certs.Manager implements it.
type CertSource interface {
	// GetX509SVID returns a current certificate for id. An expired one
	// fails the handshake that asked for it.
	GetX509SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error)
	x509bundle.Source
}

// ErrServerClosed is returned by Serve after Close or Shutdown.
var ErrServerClosed = errors.New("hbone: server closed")

// ErrExpiredCertificate is returned (wrapped) when the CertSource hands out a
// certificate that is no longer (or not yet) valid.
var ErrExpiredCertificate = errors.New("certificate not valid now")

// StatusError is the error Dial returns when the server answers the CONNECT
// with a status other than 200 (e.g. 401 denied by policy, 503 upstream
// unreachable).
type StatusError struct {
	Code int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: status %d %s", e.Code, http.StatusText(e.Code))
}

// Dialer opens HBONE streams over a pool of mutual-TLS HTTP/2 connections,
// keyed by (source identity, allowed peer identities, address). Streams are
// multiplexed, up to MaxStreamsPerConn per connection; a new connection is
// opened when all are full. The zero value needs only Certs; it is safe for
// concurrent use.
type Dialer struct {
	// Certs supplies the source workload's SVID and the bundles to verify
	// servers with. Required.
	Certs CertSource
	// MaxStreamsPerConn caps concurrent streams per connection
	// (DefaultMaxStreamsPerConn if zero). The server's own limit, once known,
	// also applies.
	MaxStreamsPerConn int
	// IdleTimeout closes connections that have carried no stream for this
	// long (DefaultIdleTimeout if zero).
	IdleTimeout time.Duration
	// HandshakeTimeout bounds the TCP connect and TLS handshake of a new
	// connection (DefaultHandshakeTimeout if zero).
	HandshakeTimeout time.Duration
	// KeepAlive: a connection that received nothing for this long is sent
	// a PING, and closed if nothing arrives in another KeepAlive
	// (DefaultKeepAlive if zero; negative: never).
	KeepAlive time.Duration
	// DialContext makes the TCP connection (a net.Dialer if nil); ztunnel
	// sets it to mark its sockets.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Logger receives debug logs (nil: discard).
	Logger *slog.Logger

	// mu guards the fields below.
	mu     sync.Mutex
	pools  map[poolKey][]*poolConn // open and dialing connections, per key
	closed bool
	wg     sync.WaitGroup // connection goroutines
}

// DialRequest describes one tunnelled connection.
type DialRequest struct {
	// Source is the identity whose SVID the client presents.
	Source spiffeid.ID
	// Peers are the server identities allowed (at least one).
	Peers []spiffeid.ID
	// Addr is where to connect: <pod or waypoint IP>:15008.
	Addr netip.AddrPort
	// Target becomes the :authority: <pod IP>:<target port>.
	Target netip.AddrPort
	// ForwardedFor is the original source address, for the forwarded header
	// (omitted when invalid).
	ForwardedFor netip.AddrPort
	// Host is the service hostname when the connection was addressed to a
	// service (forwarded: ...;host=<Host>); optional.
	Host string
	// Baggage is the baggage header value (see Baggage.String); optional.
	Baggage string
}

// Handler serves one HBONE CONNECT request. It answers exactly once, with
// r.Accept (200) or r.Reject(status). Returning without answering answers
// 503. ctx ends when the stream is reset, the connection closes, or the
// server closes; the stream is closed when ServeHBONE returns.
type Handler interface {
	ServeHBONE(ctx context.Context, r *Request)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, r *Request)

// ServeHBONE calls f(ctx, r).
func (f HandlerFunc) ServeHBONE(ctx context.Context, r *Request) { f(ctx, r) }

// Forwarded is the parsed forwarded header of a request.
type Forwarded struct {
	For  netip.AddrPort // the original source (zero if absent)
	Host string         // the service hostname (empty if absent)
}

// Baggage is the parsed subset of the W3C baggage header that Istio uses.
type Baggage struct {
	ClusterName  string // k8s.cluster.name
	Namespace    string // k8s.namespace.name
	WorkloadKind string // the <kind> of k8s.<kind>.name: deployment, pod, ...
	WorkloadName string // k8s.<kind>.name
	ServiceName  string // service.name
	Version      string // service.version
}

// Server terminates HBONE: TLS on a listener (15008), presenting the
// certificate of the workload that owns the TCP destination address, then
// HTTP/2 CONNECT streams handed to Handler. Certs, LocalIdentity and Handler
// are required; the rest is optional.
type Server struct {
	// Certs supplies local workloads' SVIDs and the bundles to verify
	// clients with. Required.
	Certs CertSource
	// LocalIdentity reports which local workload owns dst, the TCP
	// destination IP of an HBONE connection (eBPF steers <pod IP>:15008 to
	// the proxy). Unknown: the handshake fails. Required.
	LocalIdentity func(dst netip.Addr) (spiffeid.ID, bool)
	// Handler serves each stream. Required.
	Handler Handler
	// IsWaypointFor reports whether local, the TCP destination, is the
	// waypoint for target, so that a CONNECT to target arriving at local is
	// not a 400. Nil: the authority IP must equal the destination IP.
	IsWaypointFor func(local, target netip.Addr) bool
	// MaxHeaderBytes caps a request's decoded header list
	// (DefaultMaxHeaderBytes if zero); larger requests get 431.
	MaxHeaderBytes int
	// MaxConcurrentStreams caps streams per connection
	// (DefaultMaxConcurrentStreams if zero).
	MaxConcurrentStreams int
	// HandshakeTimeout bounds the TLS handshake, the HTTP/2 preface and
	// the headers of the connection's first request
	// (DefaultHandshakeTimeout if zero): slow clients are closed. Later,
	// IdleTimeout bounds a connection without streams.
	HandshakeTimeout time.Duration
	// IdleTimeout closes connections without streams after this long
	// (DefaultIdleTimeout if zero).
	IdleTimeout time.Duration
	// MaxPendingHandshakes bounds the accepted connections whose TLS
	// handshake and HTTP/2 preface are not done yet, over all sources
	// (DefaultMaxPendingHandshakes if zero). Each holds a goroutine and a
	// file descriptor before the peer proved anything; when the bound is
	// reached the oldest pending one of the heaviest source (the one with
	// the most) is closed to make room, so a flood of idle connections
	// cannot lock out legitimate clients nor shed other sources' few.
	MaxPendingHandshakes int
	// MaxPendingHandshakesPerSource bounds them per source (an IPv4
	// address, an IPv6 /64), closing the source's oldest
	// (DefaultMaxPendingHandshakesPerSource if zero).
	MaxPendingHandshakesPerSource int
	// HandshakeTimeoutUnderLoad replaces HandshakeTimeout while more than
	// half of MaxPendingHandshakes are in use, for the new connections
	// and the pending ones (DefaultHandshakeTimeoutUnderLoad if zero; never
	// longer than HandshakeTimeout).
	HandshakeTimeoutUnderLoad time.Duration
	// KeepAlive: as Dialer.KeepAlive, it finds clients that vanished
	// while their streams were open (DefaultKeepAlive if zero; negative:
	// never).
	KeepAlive time.Duration
	// BaseContext, if set, returns the context that handshakes and
	// handlers of connections accepted on ln run under (as
	// http.Server.BaseContext): ending it ends them. Nil: a context that
	// only Close ends.
	BaseContext func(ln net.Listener) context.Context
	// OnReject, if set, is told of every peer or request the server refuses
	// before a handler sees it (failed handshakes, bad prefaces, malformed
	// or misdirected requests): for a proxy these are security events to
	// count and log. It runs on the connection's goroutine and must not
	// block.
	OnReject func(Rejection)
	// Logger receives debug logs (nil: discard).
	Logger *slog.Logger

	// mu guards the fields below.
	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closed    bool                 // Close or Shutdown called
	cancels   []context.CancelFunc // end each Serve's context (Close)
	pending   *pendingSet          // connections in their handshake; set once by the first Serve
	wg        sync.WaitGroup       // Serve loops, connections and handlers
}

// RejectReason says why a Server refused a peer or a request.
type RejectReason string

// Reasons for a Rejection (also the values of ztunnel's reason label).
const (
	// RejectHandshake: the TLS handshake failed (no local workload owns the
	// destination, foreign trust domain, missing or expired certificate).
	RejectHandshake RejectReason = "handshake"
	// RejectPreface: the HTTP/2 client preface was wrong or too slow.
	RejectPreface RejectReason = "preface"
	// RejectBadRequest: a malformed or misdirected CONNECT, answered with
	// Status.
	RejectBadRequest RejectReason = "bad_request"
)

// Rejection is one refusal, for Server.OnReject.
type Rejection struct {
	Reason RejectReason
	Remote netip.AddrPort // the peer's TCP address
	Local  netip.AddrPort // the TCP destination
	Status int            // the HTTP status answered (RejectBadRequest)
	Err    error          // what failed (handshakes and prefaces), or nil
}

// Request is one CONNECT request received by a Server.
type Request struct {
	Peer        spiffeid.ID    // the client's verified identity
	Local       spiffeid.ID    // the identity this server presented
	PeerAddr    netip.AddrPort // TCP source of the HBONE connection
	LocalAddr   netip.AddrPort // TCP destination (<pod IP>:15008)
	Target      netip.AddrPort // the :authority
	Forwarded   Forwarded      // the forwarded header
	Baggage     Baggage        // the baggage header
	TraceParent string         // the traceparent header, as sent
	Header      http.Header    // the regular (non-pseudo) headers

	st       *stream
	answered bool // used by the handler's goroutine only: Accept and Reject are not concurrent
	// Another transport's request (NewRequest): answered through ext.
	ext       Answerer
	transport string
}
