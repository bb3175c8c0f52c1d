package waypoint

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
)

// newQUICServer is the HTTP/3 side of the HBONE inbound (Config.QUIC): the
// same identity, the same checks of the caller (a client SVID of the
// waypoint's trust domain, then the filter chains' RBAC per request) and
// the same handler as the HTTP/2 server.
func (p *Proxy) newQUICServer() *h3.Server {
	id := p.cfg.Identity
	log := p.cfg.Logger
	if log != nil {
		log = log.With("component", "h3")
	}
	return &h3.Server{
		Certs:         p.cfg.Certs,
		LocalIdentity: func(netip.Addr) (spiffeid.ID, bool) { return id, true },
		IsWaypointFor: func(local, target netip.Addr) bool { return true }, // any target; the filter chains decide
		Handler:       hbone.HandlerFunc(p.serveQUICStream),
		Logger:        log,
	}
}

// serveQUICStream is serveHBONE for a stream over HTTP/3. The tunnel of an
// HTTP chain ends as a TCP socket closed with nothing unread does: FIN
// after the last bytes written. h3's Close resets a stream whose client
// has not half-closed, and a QUIC reset discards data not yet delivered:
// the answer net/http writes before it closes the connection
// ("Connection: close", draining) would be lost. TCP chains keep Close
// as it is: an abort there is a reset, as over HTTP/2. The context marks
// the stream's transport for the requests' access lines and flows
// (downstreamTransport).
func (p *Proxy) serveQUICStream(ctx context.Context, r *hbone.Request) {
	if snap := p.snap.Load(); snap != nil {
		if ch := snap.chainFor(r.Target); ch != nil && ch.tcp == nil {
			r = hbone.NewRequest(*r, finAnswerer{r}, hbone.TransportH3)
		}
	}
	p.serveHBONE(context.WithValue(ctx, downstreamTransportKey{}, hbone.TransportH3), r)
}

// finAnswerer answers r; the tunnel it accepts sends FIN when closed.
type finAnswerer struct{ r *hbone.Request }

func (a finAnswerer) Accept() (hbone.Tunnel, error) {
	st, err := a.r.Accept()
	if err != nil {
		return nil, err
	}
	return finOnClose{st}, nil
}

func (a finAnswerer) Reject(status int) error { return a.r.Reject(status) }

// finOnClose is a tunnel whose Close half-closes first.
type finOnClose struct{ *hbone.Stream }

func (t finOnClose) Close() error {
	_ = t.CloseWrite()
	return t.Stream.Close()
}

// serveQUIC serves HBONE over HTTP/3 on pc until drain or Close (Serve).
func (p *Proxy) serveQUIC(pc net.PacketConn) error {
	if err := p.quic.Serve(pc); !errors.Is(err, h3.ErrServerClosed) {
		return fmt.Errorf("waypoint: hbone quic: %w", err)
	}
	return nil
}

// listenQUIC opens the UDP socket of HBONE over HTTP/3 on the address of
// the HBONE TCP listener ln (15008). An address with port 0 (tests) got
// its TCP port from the kernel; that number may be taken for UDP: then
// another pair is taken, and the TCP listener returned may be a new one.
func listenQUIC(ln net.Listener, configured string) (net.Listener, net.PacketConn, error) {
	pc, err := net.ListenPacket("udp", ln.Addr().String())
	_, port, _ := net.SplitHostPort(configured)
	for try := 0; err != nil && errors.Is(err, syscall.EADDRINUSE) && port == "0" && try < 16; try++ {
		nl, lerr := net.Listen("tcp", configured)
		if lerr != nil {
			return ln, nil, lerr
		}
		ln.Close()
		ln = nl
		pc, err = net.ListenPacket("udp", ln.Addr().String())
	}
	if err != nil {
		return ln, nil, err
	}
	return ln, pc, nil
}

// shutdownQUIC sends GOAWAY on every HTTP/3 connection and waits for their
// streams until ctx ends (drain).
func (p *Proxy) shutdownQUIC(ctx context.Context) {
	_ = p.quic.Shutdown(ctx)
}

// ReporterUpstream is the reporter label of the ambit_hbone_* families for
// the tunnels the waypoint opens to destinations (its upstream leg); those
// clients open to it count as reporter "waypoint".
const ReporterUpstream = "waypoint_upstream"

// hboneCounters are one upstream tunnel's children of the ambit_hbone_*
// families: sent counts bytes of the response direction (read from the
// destination), received those of the request direction (written to it),
// as the families count a tunnel's bytes from its client.
type hboneCounters struct {
	opened, closed, sent, received prometheus.Counter
}

// upstreamHBONE returns the ambit_hbone_* children of an upstream tunnel
// over transport (h2 or h3).
func (m *metrics) upstreamHBONE(transport string) *hboneCounters {
	return &hboneCounters{
		opened:   m.tcp.HBONEOpened.WithLabelValues(ReporterUpstream, transport),
		closed:   m.tcp.HBONEClosed.WithLabelValues(ReporterUpstream, transport),
		sent:     m.tcp.HBONESent.WithLabelValues(ReporterUpstream, transport),
		received: m.tcp.HBONEReceived.WithLabelValues(ReporterUpstream, transport),
	}
}

// newQUICDialer returns the HTTP/3 dialer of the upstream leg, in front of
// p.dialer (Config.QUIC or Config.QUICUpstream; nil otherwise): QUIC first
// to an endpoint that advertises it (hbone_quic), HTTP/2 when its dial
// fails without an answer (UDP dropped or refused), remembered for that
// address, as a ztunnel's.
func (p *Proxy) newQUICDialer() *h3.Fallback {
	if !p.cfg.QUIC && !p.cfg.QUICUpstream {
		return nil
	}
	timeout := p.cfg.QUICDialTimeout
	if timeout <= 0 {
		timeout = h3.DefaultFallbackDialTimeout
	}
	log := p.log.With("component", "h3")
	return &h3.Fallback{
		H2:          p.dialer,
		H3:          &h3.Dialer{Certs: p.cfg.Certs, Logger: log, HandshakeTimeout: timeout},
		DialTimeout: timeout,
		OnFallback: func(r hbone.DialRequest, err error) {
			p.log.Info("waypoint: hbone over quic failed: falling back to http/2", "addr", r.Addr, "err", err)
		},
	}
}

// dialTunnel opens an HBONE tunnel to h: over HTTP/3 when the waypoint
// dials QUIC, h advertises it and is not on the waypoint's node (UDP from
// a local pod to a pod's 15008 is dropped by the capture), else HTTP/2.
func (p *Proxy) dialTunnel(ctx context.Context, h *host, r hbone.DialRequest) (*hbone.Stream, error) {
	if p.h3 != nil && h.spec.quic && (h.spec.node == "" || h.spec.node != p.cfg.Node) {
		return p.h3.Dial(ctx, r)
	}
	return p.dialer.Dial(ctx, r)
}

// closeQUICDialer closes the HTTP/3 dialer (not p.dialer: Close does).
func (p *Proxy) closeQUICDialer() {
	if p.h3 != nil {
		p.h3.H3.Close()
	}
}

// downstreamTransportKey is the context key of the downstream tunnel's
// HBONE transport, on the context serveHBONE gets (and the requests of
// its inner HTTP server): set for HTTP/3, absent for HTTP/2.
type downstreamTransportKey struct{}

// downstreamTransport names the HBONE transport the request of ctx came
// in on.
func downstreamTransport(ctx context.Context) string {
	if t, ok := ctx.Value(downstreamTransportKey{}).(string); ok {
		return t
	}
	return hbone.TransportH2
}

// upstreamTransport names the HBONE transport of h's newest upstream
// connection, "-" if none (plain TCP).
func upstreamTransport(h *host) string {
	if h == nil {
		return "-"
	}
	if t := h.transport.Load(); t != nil {
		return *t
	}
	return "-"
}
