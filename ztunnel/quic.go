package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
	"github.com/ambit-mesh/ambit/model"
)

// ListenerQUIC names the UDP socket of HBONE over HTTP/3, for Addr.
const ListenerQUIC = "hbone-quic"

// Defaults of the QUIC fields of Config.
const (
	// DefaultQUICDialTimeout bounds a QUIC dial before falling back to
	// HTTP/2: where UDP is dropped, nothing answers at all.
	DefaultQUICDialTimeout = 2 * time.Second
	// DefaultQUICRetryAfter is how long a destination whose QUIC dial
	// failed is reached over HTTP/2 only.
	DefaultQUICRetryAfter = 5 * time.Minute
	// maxQUICFailures bounds the remembered failures.
	maxQUICFailures = 4096
)

// tunnelDialer opens HBONE streams: *hbone.Dialer, or quicDialer in front
// of it.
type tunnelDialer interface {
	Dial(ctx context.Context, r hbone.DialRequest) (*hbone.Stream, error)
	Conns() int
	Close() error
}

// quicDialer tunnels over HTTP/3 to destinations whose ztunnel advertises
// it (model.Workload.QUIC), over HTTP/2 otherwise. A QUIC dial that fails
// without an answer from the server (UDP blocked, no QUIC listener, a
// handshake refused) falls back to HTTP/2 at once, and the destination
// address is dialed over HTTP/2 only for retryAfter. An answer (401, 503)
// is final: the server decided. It never falls back to plaintext.
type quicDialer struct {
	h2          *hbone.Dialer
	h3          *h3.Dialer
	store       *model.Store
	dialTimeout time.Duration
	retryAfter  time.Duration
	log         *slog.Logger
	onFallback  func()                     // counts fallbacks; may be nil
	isLocal     func(*model.Workload) bool // a workload of this node (reached over HTTP/2); may be nil

	mu     sync.Mutex                   // guards failed
	failed map[netip.AddrPort]time.Time // QUIC destination -> retry after
}

// Dial implements tunnelDialer.
func (d *quicDialer) Dial(ctx context.Context, r hbone.DialRequest) (*hbone.Stream, error) {
	if !d.useQUIC(r) {
		return d.h2.Dial(ctx, r)
	}
	qctx, cancel := context.WithTimeout(ctx, d.dialTimeout)
	st, err := d.h3.Dial(qctx, r)
	cancel()
	if err == nil {
		return st, nil
	}
	var se *hbone.StatusError
	if errors.As(err, &se) || ctx.Err() != nil {
		return nil, err
	}
	d.remember(r.Addr)
	d.log.Info("hbone over quic failed: falling back to http/2", "addr", r.Addr, "retry_after", d.retryAfter.String(), "err", err)
	if d.onFallback != nil {
		d.onFallback()
	}
	return d.h2.Dial(ctx, r)
}

// useQUIC reports whether r's destination advertises QUIC and has not
// failed it lately. The destination is the workload owning the dialed
// address (a pod, or its waypoint), else the target's.
func (d *quicDialer) useQUIC(r hbone.DialRequest) bool {
	snap := d.store.Load()
	w := snap.WorkloadByIP(r.Addr.Addr())
	if w == nil {
		w = snap.WorkloadByIP(r.Target.Addr())
	}
	if w == nil || !w.QUIC || (d.isLocal != nil && d.isLocal(w)) {
		return false // a pod of this node: the capture steers TCP 15008 back to us, not UDP
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	until, ok := d.failed[r.Addr]
	if !ok {
		return true
	}
	if time.Now().Before(until) {
		return false
	}
	delete(d.failed, r.Addr)
	return true
}

func (d *quicDialer) remember(a netip.AddrPort) {
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failed == nil {
		d.failed = map[netip.AddrPort]time.Time{}
	}
	if len(d.failed) >= maxQUICFailures {
		for k, until := range d.failed {
			if now.After(until) {
				delete(d.failed, k)
			}
		}
		if len(d.failed) >= maxQUICFailures {
			clear(d.failed) // worst case: some retry QUIC early
		}
	}
	d.failed[a] = now.Add(d.retryAfter)
}

// Conns counts both transports' connections.
func (d *quicDialer) Conns() int { return d.h2.Conns() + d.h3.Conns() }

// Close closes both dialers.
func (d *quicDialer) Close() error {
	d.h3.Close()
	return d.h2.Close()
}

// setupQUIC puts the QUIC dialer in front of h2 when Config.QUIC is set,
// and opens the UDP socket on the HBONE listener's address. New calls it
// once the listeners are open.
func (p *Proxy) setupQUIC(ctx context.Context, h2 *hbone.Dialer) (tunnelDialer, error) {
	if !p.cfg.QUIC {
		return h2, nil
	}
	dialTimeout := positive(p.cfg.QUICDialTimeout, DefaultQUICDialTimeout)
	qd := &quicDialer{
		h2:          h2,
		h3:          &h3.Dialer{Certs: p.cfg.Certs, Logger: p.log.With("component", "h3"), ListenPacket: p.listenUDPMarked, HandshakeTimeout: dialTimeout},
		store:       p.cfg.Store,
		dialTimeout: dialTimeout,
		retryAfter:  positive(p.cfg.QUICRetryAfter, DefaultQUICRetryAfter),
		log:         p.log,
		isLocal:     p.cfg.isLocal,
	}
	ln := p.listeners[ListenerHBONE]
	if ln == nil {
		return qd, nil
	}
	pc, err := listenUDP(ctx, ln.Addr().String(), p.cfg.Transparent, 0)
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
