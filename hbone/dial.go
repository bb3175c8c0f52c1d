package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// ErrDialerClosed is returned by Dial after Close.
var ErrDialerClosed = errors.New("hbone: dialer closed")

// ErrHeadersTooLarge is returned (wrapped) by Dial when the request headers
// exceed the server's advertised limit; nothing was sent.
var ErrHeadersTooLarge = errors.New("hbone: request headers too large")

// poolKey identifies interchangeable connections.
type poolKey struct {
	src   spiffeid.ID
	peers string // the allowed peer IDs, sorted, space-separated
	addr  string
}

// poolConn is a pooled connection, possibly still dialing.
type poolConn struct {
	ready  chan struct{}      // closed when dialing ends
	cancel context.CancelFunc // cancels the dial
	// Guarded by Dialer.mu:
	c        *conn // set when ready, nil on failure
	err      error // the dial error
	reserved int   // reservations made while dialing, handed to c
	// notAfter is when the first of the handshake's two certificates
	// expires: no new stream goes on c from then on (the source's SVID
	// would have been refused: fail closed, not an old tunnel).
	notAfter time.Time
}

func (d *Dialer) logger() *slog.Logger {
	if d.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return d.Logger
}

func (d *Dialer) streamLimit() int {
	if d.MaxStreamsPerConn > 0 {
		return d.MaxStreamsPerConn
	}
	return DefaultMaxStreamsPerConn
}

// Dial opens a stream to r.Target through the HBONE server at r.Addr,
// reusing a pooled connection when one has room. It returns once the server
// answered 200; another answer is a *StatusError. ctx bounds the whole
// dial; the stream outlives it.
func (d *Dialer) Dial(ctx context.Context, r DialRequest) (*Stream, error) {
	if len(r.Peers) == 0 {
		return nil, errors.New("hbone dial: no allowed peer identities")
	}
	if !r.Addr.IsValid() || !r.Target.IsValid() {
		return nil, fmt.Errorf("hbone dial: invalid address %v or target %v", r.Addr, r.Target)
	}
	if r.Source.IsZero() {
		return nil, errors.New("hbone dial: no source identity")
	}
	fields := requestFields(r)
	key := poolKey{src: r.Source, peers: peersKey(r.Peers), addr: r.Addr.String()}
	var err error
	for range 5 { // a connection may go away or refuse the stream: retry
		var c *conn
		c, err = d.reserve(ctx, key, r)
		if err != nil {
			return nil, fmt.Errorf("hbone dial %s: %w", r.Addr, err)
		}
		var s *stream
		s, err = c.openStream(fields)
		if errors.Is(err, ErrHeadersTooLarge) {
			return nil, fmt.Errorf("hbone dial %s: %w", r.Addr, err)
		}
		if err != nil {
			continue
		}
		var st *Stream
		st, err = d.await(ctx, s)
		var se *StatusError
		switch {
		case err == nil:
			return st, nil
		case errors.Is(err, errRefusedStream):
			continue // the server did not process it: try again
		case errors.As(err, &se):
			return nil, err
		}
		break
	}
	return nil, fmt.Errorf("hbone dial %s: %w", r.Addr, err)
}

// await waits for the response to the CONNECT on s.
func (d *Dialer) await(ctx context.Context, s *stream) (*Stream, error) {
	select {
	case <-s.resp:
	case <-ctx.Done():
		s.close()
		return nil, ctx.Err()
	}
	s.c.mu.Lock()
	status, answered, err := s.status, s.answered, s.err
	s.c.mu.Unlock()
	if !answered {
		s.close()
		return nil, err
	}
	if status != 200 {
		// The server has ended (or will reset) the stream: say no more
		// than RST_STREAM(NO_ERROR) if it is still open.
		s.c.mu.Lock()
		s.wclosed = true
		s.c.mu.Unlock()
		s.close()
		return nil, &StatusError{Code: status}
	}
	return &Stream{s: s}, nil
}

func requestFields(r DialRequest) []hpack.HeaderField {
	fields := make([]hpack.HeaderField, 0, 5)
	fields = append(fields,
		hpack.HeaderField{Name: ":method", Value: "CONNECT"},
		hpack.HeaderField{Name: ":authority", Value: r.Target.String()})
	if r.ForwardedFor.IsValid() || r.Host != "" {
		fields = append(fields, hpack.HeaderField{Name: "forwarded", Value: FormatForwarded(r.ForwardedFor, r.Host), Sensitive: true})
	}
	if r.Baggage != "" {
		fields = append(fields, hpack.HeaderField{Name: "baggage", Value: r.Baggage})
	}
	// Unique per stream: not worth a place in the HPACK table.
	return append(fields, hpack.HeaderField{Name: "traceparent", Value: newTraceParent(), Sensitive: true})
}

func peersKey(peers []spiffeid.ID) string {
	if len(peers) == 1 {
		return peers[0].String()
	}
	s := make([]string, len(peers))
	for i, p := range peers {
		s[i] = p.String()
	}
	slices.Sort(s)
	return strings.Join(slices.Compact(s), " ")
}

// reserve returns a conn for key with a stream slot reserved for the
// caller, dialing a new one if none has room.
func (d *Dialer) reserve(ctx context.Context, key poolKey, r DialRequest) (*conn, error) {
	limit := d.streamLimit()
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, ErrDialerClosed
	}
	var pc *poolConn
	pending := limit // reservations allowed on a connection still dialing
	now := time.Now()
	for _, p := range d.pools[key] {
		if p.c != nil {
			if !now.Before(p.notAfter) {
				continue // a certificate of its handshake expired: carries its streams, takes no new one
			}
			if p.c.tryReserve(limit) {
				d.mu.Unlock()
				return p.c, nil
			}
			pending = min(pending, p.c.streamLimit(limit)) // what this server allows
		}
	}
	for _, p := range d.pools[key] {
		if p.c == nil && p.err == nil && p.reserved < pending {
			p.reserved++
			pc = p
			break
		}
	}
	if pc == nil {
		pc = &poolConn{ready: make(chan struct{}), reserved: 1}
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.handshakeTimeout())
		pc.cancel = cancel
		if d.pools == nil {
			d.pools = make(map[poolKey][]*poolConn)
		}
		d.pools[key] = append(d.pools[key], pc)
		d.wg.Add(1)
		go d.dialConn(dctx, key, pc, r)
	}
	d.mu.Unlock()

	select {
	case <-pc.ready:
	case <-ctx.Done():
		d.mu.Lock()
		c := pc.c
		if c == nil {
			pc.reserved--
		}
		d.mu.Unlock()
		if c != nil {
			c.unreserve()
		}
		return nil, ctx.Err()
	}
	if pc.err != nil {
		return nil, pc.err
	}
	return pc.c, nil
}

func (d *Dialer) handshakeTimeout() time.Duration {
	if d.HandshakeTimeout > 0 {
		return d.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

// dialConn dials pc's connection and publishes it.
func (d *Dialer) dialConn(ctx context.Context, key poolKey, pc *poolConn, r DialRequest) {
	defer d.wg.Done()
	defer pc.cancel()
	c, notAfter, err := d.connect(ctx, r)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err == nil && d.closed {
		c.close(ErrDialerClosed)
		err = ErrDialerClosed
	}
	if err != nil {
		pc.err = err
		d.removeLocked(key, pc)
		close(pc.ready)
		return
	}
	c.mu.Lock()
	c.reserved = pc.reserved
	c.mu.Unlock()
	c.onClose = func(*conn) {
		d.mu.Lock()
		d.removeLocked(key, pc)
		d.mu.Unlock()
	}
	pc.c, pc.notAfter = c, notAfter
	c.start(&d.wg)
	close(pc.ready)
}

// removeLocked drops pc from the pool. d.mu must be held.
func (d *Dialer) removeLocked(key poolKey, pc *poolConn) {
	list := d.pools[key]
	if i := slices.Index(list, pc); i >= 0 {
		list = slices.Delete(list, i, i+1)
	}
	if len(list) == 0 {
		delete(d.pools, key)
	} else {
		d.pools[key] = list
	}
}

// connect makes a new HBONE connection: TCP, TLS 1.3 with the source's
// SVID, the HTTP/2 preface. notAfter is when the first of the two
// certificates expires.
func (d *Dialer) connect(ctx context.Context, r DialRequest) (_ *conn, notAfter time.Time, err error) {
	if d.Certs == nil {
		return nil, time.Time{}, errors.New("no CertSource")
	}
	svid, err := currentSVID(ctx, d.Certs, r.Source)
	if err != nil {
		return nil, time.Time{}, err
	}
	dial := d.DialContext
	if dial == nil {
		var nd net.Dialer
		dial = nd.DialContext
	}
	nc, err := dial(ctx, "tcp", r.Addr.String())
	if err != nil {
		return nil, time.Time{}, err
	}
	out := newBatchConn(nc)
	tc := tls.Client(out, clientTLSConfig(svid, d.Certs, r.Peers))
	if err := tc.HandshakeContext(ctx); err != nil {
		nc.Close()
		return nil, time.Time{}, fmt.Errorf("tls handshake: %w", err)
	}
	peer, err := peerID(tc.ConnectionState())
	if err != nil {
		nc.Close()
		return nil, time.Time{}, fmt.Errorf("tls handshake: %w", err)
	}
	c := newConn(tc, out, false, d.logger())
	c.peer, c.local = peer, r.Source
	c.maxStreams = d.streamLimit()
	c.idleTimeout = orDefault(d.IdleTimeout, DefaultIdleTimeout)
	c.keepAlive = keepAlive(d.KeepAlive)
	c.setHeaderLimit(DefaultMaxHeaderBytes)
	err = c.writePreface([]http2.Setting{
		{ID: http2.SettingEnablePush, Val: 0},
		{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: DefaultMaxHeaderBytes},
	})
	if err != nil {
		nc.Close()
		return nil, time.Time{}, err
	}
	d.logger().Debug("hbone: connected", "addr", r.Addr, "src", r.Source, "peer", peer)
	notAfter = svid.Certificates[0].NotAfter
	if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 && pc[0].NotAfter.Before(notAfter) {
		notAfter = pc[0].NotAfter
	}
	return c, notAfter, nil
}

// tryReserve reserves a stream slot if the conn has room.
func (c *conn) tryReserve(limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.goingAway || c.activeLocked() >= min(limit, c.peerMaxStreams) {
		return false
	}
	c.reserved++
	c.busyLocked()
	return true
}

// streamLimit is the conn's cap on concurrent streams: limit, or less if
// the server said so.
func (c *conn) streamLimit(limit int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return min(limit, c.peerMaxStreams)
}

// unreserve gives back a slot reserved by tryReserve.
func (c *conn) unreserve() {
	c.mu.Lock()
	c.reserved--
	c.maybeIdleLocked()
	c.mu.Unlock()
}

// Conns returns the number of open HBONE connections.
func (d *Dialer) Conns() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, list := range d.pools {
		for _, pc := range list {
			if pc.c != nil {
				n++
			}
		}
	}
	return n
}

// Close closes all connections (resetting their streams), cancels dials in
// progress, and waits for the Dialer's goroutines. Dial fails afterwards.
func (d *Dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	var conns []*conn
	for _, list := range d.pools {
		for _, pc := range list {
			if pc.c != nil {
				conns = append(conns, pc.c)
			} else {
				pc.cancel()
			}
		}
	}
	d.mu.Unlock()
	for _, c := range conns {
		c.goAwayAndClose(http2.ErrCodeNo, errConnClosed)
	}
	d.wg.Wait()
	return nil
}
