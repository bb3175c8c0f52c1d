package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
)

// ListenerQUIC names the UDP socket of HBONE over HTTP/3, for Addr.
const ListenerQUIC = "hbone-quic"

// Defaults of the QUIC fields of Config.
const (
	// DefaultQUICDialTimeout bounds a QUIC dial before falling back to
	// HTTP/2: where UDP is dropped, nothing answers at all.
	DefaultQUICDialTimeout = h3.DefaultFallbackDialTimeout
	// DefaultQUICRetryAfter is how long a destination whose QUIC dial
	// failed is reached over HTTP/2 only.
	DefaultQUICRetryAfter = h3.DefaultRetryAfter
)

// tunnelDialer opens HBONE streams: *hbone.Dialer, or *h3.Fallback in
// front of it (Config.QUIC).
type tunnelDialer interface {
	Dial(ctx context.Context, r hbone.DialRequest) (*hbone.Stream, error)
	Conns() int
	Close() error
}

// quicUse reports whether a tunnel should try HTTP/3: its destination (the
// workload owning the dialed address, a pod or its waypoint, else the
// target's) advertises it and is not on this node (the capture steers TCP
// 15008 to a local pod back to us, not UDP).
func (p *Proxy) quicUse(r hbone.DialRequest) bool {
	snap := p.cfg.Store.Load()
	w := snap.WorkloadByIP(r.Addr.Addr())
	if w == nil {
		w = snap.WorkloadByIP(r.Target.Addr())
	}
	return w != nil && w.QUIC && !p.cfg.isLocal(w)
}

// setupQUIC puts the QUIC dialer in front of h2 when Config.QUIC is set,
// and opens the UDP socket on the HBONE listener's address. New calls it
// once the listeners are open.
func (p *Proxy) setupQUIC(ctx context.Context, h2 *hbone.Dialer) (tunnelDialer, error) {
	if !p.cfg.QUIC {
		return h2, nil
	}
	dialTimeout := positive(p.cfg.QUICDialTimeout, DefaultQUICDialTimeout)
	qd := &h3.Fallback{
		H2:          h2,
		H3:          &h3.Dialer{Certs: p.cfg.Certs, Logger: p.log.With("component", "h3"), ListenPacket: p.listenUDPMarked, HandshakeTimeout: dialTimeout},
		Use:         p.quicUse,
		DialTimeout: dialTimeout,
		RetryAfter:  positive(p.cfg.QUICRetryAfter, DefaultQUICRetryAfter),
		OnFallback: func(r hbone.DialRequest, err error) {
			p.log.Info("hbone over quic failed: falling back to http/2", "addr", r.Addr, "err", err)
		},
	}
	ln := p.listeners[ListenerHBONE]
	if ln == nil {
		return qd, nil
	}
	pc, err := listenUDP(ctx, ln.Addr().String(), p.cfg.Transparent, 0)
	// An HBONE address with port 0 (tests) got its TCP port from the kernel;
	// the same number may be taken for UDP: take another pair.
	for try := 0; err != nil && errors.Is(err, syscall.EADDRINUSE) && zeroPort(p.cfg.HBONEAddr) && try < 16; try++ {
		var mark uint32
		if p.cfg.Transparent {
			mark = p.cfg.Mark
		}
		nl, lerr := listen(ctx, p.cfg.HBONEAddr, p.cfg.Transparent, mark)
		if lerr != nil {
			return nil, fmt.Errorf("ztunnel: %s: %w", ListenerHBONE, lerr)
		}
		ln.Close()
		ln = nl
		p.listeners[ListenerHBONE] = ln
		pc, err = listenUDP(ctx, ln.Addr().String(), p.cfg.Transparent, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("ztunnel: %s: %w", ListenerQUIC, err)
	}
	p.quicConn = pc
	p.quic = &h3.Server{
		Certs:         p.cfg.Certs,
		LocalIdentity: p.localIdentity,
		Handler:       hbone.HandlerFunc(p.serveHBONE),
		BaseContext:   func(net.PacketConn) context.Context { return p.connCtx },
		OnReject:      p.hboneRejected,
		Logger:        p.log.With("component", "h3"),
	}
	return qd, nil
}

// serveQUIC serves HBONE over HTTP/3 (Run).
func (p *Proxy) serveQUIC() {
	if p.quic == nil {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		if err := p.quic.Serve(p.quicConn); err != nil && !errors.Is(err, h3.ErrServerClosed) {
			p.log.Error("hbone quic server stopped", "err", err)
		}
	}()
}

// shutdownQUIC sends GOAWAY and waits for streams until ctx ends (drain).
func (p *Proxy) shutdownQUIC(ctx context.Context) {
	if p.quic != nil {
		_ = p.quic.Shutdown(ctx)
	}
}

// closeQUIC closes the QUIC server and its socket.
func (p *Proxy) closeQUIC() {
	if p.quic != nil {
		p.quic.Close()
	}
	if p.quicConn != nil {
		p.quicConn.Close()
	}
}

// listenUDPMarked opens the QUIC dialer's socket, marked as the proxy's.
func (p *Proxy) listenUDPMarked(ctx context.Context, network, addr string) (net.PacketConn, error) {
	return listenUDP(ctx, addr, false, p.cfg.Mark)
}

// listenUDP opens a UDP socket, with IP_TRANSPARENT when transparent is
// set (eBPF assigns <pod IP>:15008 datagrams to it, and replies leave from
// the pod IP), and SO_MARK when mark is non-zero.
func listenUDP(ctx context.Context, addr string, transparent bool, mark uint32) (net.PacketConn, error) {
	lc := net.ListenConfig{}
	if transparent || mark != 0 {
		lc.Control = func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				if transparent {
					if network == "udp6" {
						serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
						if serr != nil {
							return
						}
					}
					if e := unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); e != nil && network != "udp6" {
						serr = fmt.Errorf("set IP_TRANSPARENT: %w", e)
						return
					}
				}
				if mark != 0 {
					if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); e != nil {
						serr = fmt.Errorf("set SO_MARK: %w", e)
					}
				}
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	pc, err := lc.ListenPacket(ctx, "udp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen udp %s: %w", addr, err)
	}
	return pc, nil
}

// transportOf names the HBONE transport of a relayed pair: that of
// whichever side is a tunnel, "" if neither is.
func transportOf(a, b net.Conn) string {
	for _, c := range []net.Conn{a, b} {
		if st, ok := c.(*hbone.Stream); ok {
			return st.Transport()
		}
	}
	return ""
}

// zeroPort reports whether addr asks the kernel for a port.
func zeroPort(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	return err == nil && port == "0"
}
