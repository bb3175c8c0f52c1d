// Package hbone is ambit's tunnel: HTTP/2 CONNECT over mutual TLS between
// SPIFFE workload identities ("HBONE", as in Istio ambient). ztunnel uses it
// for every meshed connection, and the waypoint on both of its sides.
//
// On the wire (interoperable with Istio's ztunnel): TCP to
// <destination pod IP>:15008; TLS 1.3 only, ALPN exactly "h2", no SNI; both
// sides present X.509-SVIDs. The client checks that the server's SPIFFE ID is
// one of the allowed destination identities; the server checks the client's
// certificate against the trust bundle of its own trust domain and hands the
// client's ID to the handler. Each tunnelled TCP connection is one HTTP/2
// CONNECT stream with
//
//	:authority  <pod IP>:<target port>          (IPv6 in brackets)
//	forwarded   for="<src ip:port>"[;host=<service hostname>]
//	baggage     k8s.cluster.name=...,k8s.namespace.name=...,...
//	traceparent 00-<trace id>-<span id>-01      (fresh per stream)
//
// and the server answers 200 only after its upstream connection succeeded,
// 401 when policy denies, 503 when the upstream connect fails or the local
// workload is unknown, 400 for a non-CONNECT method, a malformed authority, or
// an authority whose IP differs from the TCP destination (unless the
// destination is that workload's waypoint), 431 for oversized headers.
// Half-closing a stream (CloseWrite) sends END_STREAM; the peer reads io.EOF.
//
// The API:
//
//	// CertSource is where certificates come from (certs.Manager implements it).
//	type CertSource interface {
//		GetX509SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error)
//		x509bundle.Source
//	}
//
//	// Client side: a pool of HBONE connections keyed by
//	// (source identity, allowed peer identities, address).
//	type Dialer struct {
//		Certs             CertSource    // required
//		MaxStreamsPerConn int           // default 100
//		IdleTimeout       time.Duration // default DefaultIdleTimeout
//		HandshakeTimeout  time.Duration // TCP+TLS; default DefaultHandshakeTimeout
//		KeepAlive         time.Duration // PING when silent this long, close if still silent; default DefaultKeepAlive
//		DialContext       func(ctx context.Context, network, addr string) (net.Conn, error) // default net.Dialer
//		Logger            *slog.Logger  // nil: discard
//	}
//	type DialRequest struct {
//		Source       spiffeid.ID      // our identity (its SVID is presented)
//		Peers        []spiffeid.ID    // allowed server identities (at least one)
//		Addr         netip.AddrPort   // where to connect: <ip>:15008
//		Target       netip.AddrPort   // the :authority
//		ForwardedFor netip.AddrPort   // original source, for the forwarded header
//		Host         string           // service hostname when addressed to a service
//		Baggage      string           // see Baggage
//	}
//	func (d *Dialer) Dial(ctx context.Context, r DialRequest) (*Stream, error)
//	func (d *Dialer) Conns() int      // open HBONE (TLS) connections
//	func (d *Dialer) Close() error    // closes everything, waits for goroutines
//
//	// Errors callers branch on. A non-200 answer is a *StatusError:
//	// errors.As(err, &se); se.Code (401 policy, 503 upstream, ...).
//	type StatusError struct{ Code int }
//	var ErrExpiredCertificate // the CertSource returned an expired SVID (wrapped)
//	var ErrHeadersTooLarge    // headers over the server's limit; nothing sent (wrapped)
//	var ErrDialerClosed, ErrServerClosed
//
//	// Stream is one tunnelled connection: a net.Conn with CloseWrite.
//	func (s *Stream) Read/Write/Close/CloseWrite/LocalAddr/RemoteAddr/Set*Deadline
//	func (s *Stream) Peer() spiffeid.ID // the other side's verified identity
//
//	// Server side.
//	type Server struct {
//		Certs                CertSource                                // required
//		LocalIdentity        func(dst netip.Addr) (spiffeid.ID, bool) // required: who owns the TCP destination IP
//		Handler              Handler                                   // required
//		IsWaypointFor        func(local, target netip.Addr) bool       // optional: allow authority != local IP
//		MaxHeaderBytes       int           // default DefaultMaxHeaderBytes
//		MaxConcurrentStreams int           // per connection; default DefaultMaxConcurrentStreams
//		HandshakeTimeout     time.Duration // TLS handshake + preface + first request's headers; default DefaultHandshakeTimeout
//		IdleTimeout          time.Duration // a connection without streams; default DefaultIdleTimeout
//		MaxPendingHandshakes          int  // connections before their handshake, in total; default 1024
//		MaxPendingHandshakesPerSource int  // the same per source (IPv4 address, IPv6 /64); default 64
//		HandshakeTimeoutUnderLoad     time.Duration // while over half of MaxPendingHandshakes are used; default 2s
//		KeepAlive            time.Duration // as Dialer's
//		BaseContext          func(ln net.Listener) context.Context // optional: the parent of handshakes' and handlers' contexts
//		OnReject             func(Rejection) // optional: refused peers and requests (handshake, preface, bad_request), to count and log
//		Logger               *slog.Logger
//	}
//	func (s *Server) Serve(ln net.Listener) error  // ErrServerClosed after Close/Shutdown
//	func (s *Server) Shutdown(ctx context.Context) error // stop accepting, GOAWAY, wait for streams until ctx ends
//	func (s *Server) Close() error                 // idempotent; closes everything and waits
//
//	type Handler interface{ ServeHBONE(ctx context.Context, r *Request) }
//	type HandlerFunc func(ctx context.Context, r *Request)
//	type Request struct {
//		Peer        spiffeid.ID     // the client's verified identity
//		Local       spiffeid.ID     // the identity the server presented (owner of LocalAddr)
//		PeerAddr    netip.AddrPort  // TCP source of the HBONE connection
//		LocalAddr   netip.AddrPort  // TCP destination (<pod IP>:15008)
//		Target      netip.AddrPort  // parsed :authority
//		Forwarded   Forwarded       // parsed forwarded header (For, Host)
//		Baggage     Baggage         // parsed baggage header
//		TraceParent string
//		Header      http.Header     // all regular request headers
//	}
//	// The handler answers exactly once: Accept sends 200 and returns the
//	// stream; Reject sends the status (401, 503, ...). Returning without
//	// either answers 503. The stream is closed when the handler returns.
//	func (r *Request) Accept() (*Stream, error)
//	func (r *Request) Reject(status int) error
//
//	// Join copies a<->b with half-close, closes both, returns the bytes each way.
//	func Join(ctx context.Context, a, b net.Conn) (aToB, bToA int64, err error) // relay.Join
//
//	// Pure helpers (fuzzed).
//	func ParseAuthority(s string) (netip.AddrPort, error)
//	func ParseForwarded(s string) (Forwarded, error)
//	func FormatForwarded(src netip.AddrPort, host string) string
//	func ParseBaggage(s string) Baggage
//	func (b Baggage) String() string
//
// A handler is usually: policy check (Reject(401)), dial the target
// (Reject(503) on failure), Accept, then Join(ctx, stream, upstream).
//
// Flow control uses Istio's numbers: stream window 4 MiB, connection window
// 16 MiB, frames up to 1 MiB. A server refuses streams over its limit
// (REFUSED_STREAM) and the Dialer retries them elsewhere, learning the
// limit. Pooled connections keep the certificate they were made with; new
// ones get the CertSource's current SVID.
//
// Unauthenticated connections are bounded: at most MaxPendingHandshakes
// accepted connections may be in their TLS handshake or HTTP/2 preface at
// once, and MaxPendingHandshakesPerSource from one source (an IPv4 address,
// an IPv6 /64); past the per-source bound the source's oldest pending one is
// closed, past the total the oldest of the heaviest source's (a flood of idle
// connections sheds itself, not other sources' few; the newest, legitimate
// or not, gets in), and while more than
// half of the total is in use every pending connection gets the shorter
// HandshakeTimeoutUnderLoad.
//
// Protocol violations get RFC 9113's answers: frames other than HEADERS on
// an idle stream close the connection (PROTOCOL_ERROR, GOAWAY); a HEADERS
// frame after the peer's END_STREAM resets the stream (STREAM_CLOSED);
// trailers on a CONNECT stream reset it (PROTOCOL_ERROR, 8.5), so the
// upstream connection is closed rather than half-closed; HEADERS on a
// closed stream close the connection (STREAM_CLOSED); a stream depending on
// itself is reset. TestH2Spec runs the h2spec suite when H2SPEC names its
// binary: 80 of 94 pass (x/net/http2's server: 84). The failures are
// by design: a frame over 16 KiB is within the 1 MiB we advertise; a
// request that is not a CONNECT is answered 400 and closed (RFC 9113 8.1.1
// allows a response before the reset), so h2spec's malformed-request and
// stream-limit cases see a response instead of RST_STREAM.
//
// The HTTP/2 framing is x/net/http2's Framer and hpack; the connection logic
// (streams, flow control, settings) is this package's own, small because it
// only carries CONNECT streams, and because net/http's HTTP/2 server cannot
// half-close a response while still reading the request body (it resets the
// stream when the handler returns), which a TCP proxy must do.
//
// Not there yet: TLS session resumption; retrying a Dial whose pooled
// connection died before the answer (the request may have been processed).
package hbone
