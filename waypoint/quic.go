package waypoint

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

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
// as it is: an abort there is a reset, as over HTTP/2.
func (p *Proxy) serveQUICStream(ctx context.Context, r *hbone.Request) {
	if snap := p.snap.Load(); snap != nil {
		if ch := snap.chainFor(r.Target); ch != nil && ch.tcp == nil {
			r = hbone.NewRequest(*r, finAnswerer{r}, hbone.TransportH3)
		}
	}
	p.serveHBONE(ctx, r)
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
