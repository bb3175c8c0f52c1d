package h3

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
)

// ErrDialerClosed is returned by Dial after Close.
var ErrDialerClosed = errors.New("h3: dialer closed")

// sessionCacheSize bounds the TLS sessions kept per pool key.
const sessionCacheSize = 8

// Dialer opens HBONE streams over a pool of HTTP/3 (QUIC) connections keyed
// by (source identity, allowed peer identities, address), as hbone.Dialer
// does over HTTP/2. The zero value needs only Certs; it is safe for
// concurrent use.
type Dialer struct {
	// Certs supplies the source workload's SVID and the bundles to verify
	// servers with. Required.
	Certs hbone.CertSource
	// MaxStreamsPerConn caps concurrent streams per connection
	// (hbone.DefaultMaxStreamsPerConn if zero); a new connection is opened
	// when all are full.
	MaxStreamsPerConn int
	// IdleTimeout closes connections that carried no stream for this long
	// (hbone.DefaultIdleTimeout if zero).
	IdleTimeout time.Duration
	// HandshakeTimeout bounds the QUIC handshake of a new connection
	// (hbone.DefaultHandshakeTimeout if zero).
	HandshakeTimeout time.Duration
	// KeepAlive: a PING is sent when the connection was silent this long,
	// and it is closed after twice that without a packet
	// (hbone.DefaultKeepAlive if zero; negative: no PINGs, closed after
	// IdleTimeout of silence).
	KeepAlive time.Duration
	// ListenPacket opens the UDP socket every connection is sent from
	// (net.ListenConfig on ":0" if nil); ztunnel sets it to mark the socket.
	ListenPacket func(ctx context.Context, network, addr string) (net.PacketConn, error)
	// Logger receives debug logs (nil: discard).
	Logger *slog.Logger

	// mu guards the fields below and every clientConn's active, idle and dead.
	mu     sync.Mutex
	tr     *quic.Transport // made by the first dial
	pools  map[poolKey]*pool
	closed bool
	wg     sync.WaitGroup // connection watchers and dials
}

// poolKey identifies interchangeable connections.
type poolKey struct {
	src   spiffeid.ID
	peers string // the allowed peer IDs, sorted, space-separated
	addr  string
}

// pool is one key's connections. Its fields are guarded by Dialer.mu.
type pool struct {
	conns   []*clientConn
	dialing *dial                  // the dial in flight, if any
	cache   tls.ClientSessionCache // this key's sessions only
}

// dial is a connection being made; done is closed when it ends, err set
// before.
type dial struct {
	done chan struct{}
	err  error
}

// clientConn is one pooled QUIC connection.
type clientConn struct {
	qc   *quic.Conn
	cc   *http3.ClientConn
	peer spiffeid.ID
	// notAfter is when the first of the handshake's two certificates (ours,
	// the server's) expires: from then on the connection takes no new
	// stream, as hbone.Dialer's.
	notAfter time.Time
	// Guarded by Dialer.mu:
	active int         // streams reserved or open
	idle   *time.Timer // closes the connection while active is 0
	dead   bool        // no new streams (closed, idle-closed or refused one)
}

func (d *Dialer) logger() *slog.Logger {
	if d.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return d.Logger
}

func orDefault[T int | time.Duration](v, def T) T {
	if v > 0 {
		return v
	}
	return def
}

// quicConfig is the QUIC configuration of both sides: windows as the HTTP/2
// transport's (fixed, not auto-tuned), keep-alive PINGs, no 0-RTT.
func quicConfig(handshake, keepAlive, idle time.Duration, streams int) *quic.Config {
	cfg := &quic.Config{
		HandshakeIdleTimeout:           handshake,
		InitialStreamReceiveWindow:     streamWindow,
		MaxStreamReceiveWindow:         streamWindow,
		InitialConnectionReceiveWindow: connWindow,
		MaxConnectionReceiveWindow:     connWindow,
		MaxIncomingStreams:             int64(streams),
		Allow0RTT:                      false,
	}
	switch {
	case keepAlive < 0:
		cfg.MaxIdleTimeout = idle
	default:
		keepAlive = orDefault(keepAlive, hbone.DefaultKeepAlive)
		cfg.KeepAlivePeriod = keepAlive
		cfg.MaxIdleTimeout = 2 * keepAlive
	}
	return cfg
}

// Flow-control windows, as hbone's HTTP/2 (Istio's numbers).
const (
	streamWindow = 4 << 20
	connWindow   = 16 << 20
)

// Dial opens a stream to r.Target through the HTTP/3 server at r.Addr (UDP),
// reusing a pooled connection when one has room. It returns once the server
// answered 200; another answer is an *hbone.StatusError. ctx bounds the
// whole dial; the stream outlives it. The Stream's Transport is "h3".
func (d *Dialer) Dial(ctx context.Context, r hbone.DialRequest) (*hbone.Stream, error) {
	if len(r.Peers) == 0 {
		return nil, errors.New("h3 dial: no allowed peer identities")
	}
	if !r.Addr.IsValid() || !r.Target.IsValid() {
		return nil, fmt.Errorf("h3 dial: invalid address %v or target %v", r.Addr, r.Target)
	}
	if r.Source.IsZero() {
		return nil, errors.New("h3 dial: no source identity")
	}
	key := poolKey{src: r.Source, peers: peersKey(r.Peers), addr: r.Addr.String()}
	var err error
	for range 3 { // a pooled connection may have gone away: retry on another
		var c *clientConn
		c, err = d.reserve(ctx, key, r)
		if err != nil {
			return nil, fmt.Errorf("h3 dial %s: %w", r.Addr, err)
		}
		var st *hbone.Stream
		var retry bool
		st, retry, err = d.open(ctx, c, r)
		if err == nil {
			return st, nil
		}
		if !retry || ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("h3 dial %s: %w", r.Addr, err)
}

// open sends the CONNECT on c (a slot reserved) and waits for the answer.
// retry says the connection failed before the request was sent.
func (d *Dialer) open(ctx context.Context, c *clientConn, r hbone.DialRequest) (*hbone.Stream, bool, error) {
	release := sync.OnceFunc(func() { d.release(c) })
	rs, err := c.cc.OpenRequestStream(ctx)
	if err != nil {
		d.markDead(c)
		release()
		return nil, true, err
	}
	target := r.Target.String()
	h := http.Header{"User-Agent": nil} // none
	if r.ForwardedFor.IsValid() || r.Host != "" {
		h["Forwarded"] = []string{hbone.FormatForwarded(r.ForwardedFor, r.Host)}
	}
	if r.Baggage != "" {
		h["Baggage"] = []string{r.Baggage}
	}
	h["Traceparent"] = []string{newTraceParent()}
	req := &http.Request{Method: http.MethodConnect, Host: target, URL: &url.URL{Host: target},
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Header: h}
	if err := rs.SendRequestHeader(req); err != nil {
		rs.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		rs.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		release()
		return nil, false, fmt.Errorf("send request: %w", err)
	}
	// ctx bounds the wait for the answer.
	stop := context.AfterFunc(ctx, func() { rs.SetReadDeadline(time.Now()) })
	resp, err := rs.ReadResponse()
	if !stop() {
		rs.SetReadDeadline(time.Time{})
		if err != nil {
			err = errors.Join(ctx.Err(), err)
		}
	}
	if err != nil {
		rs.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		rs.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		release()
		return nil, false, fmt.Errorf("read response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		// The server ended the stream: say no more.
		rs.CancelWrite(quic.StreamErrorCode(http3.ErrCodeNoError))
		rs.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
		release()
		return nil, false, &hbone.StatusError{Code: resp.StatusCode}
	}
	t := &tunnel{str: rs, peer: c.peer, local: c.qc.LocalAddr(), remote: c.qc.RemoteAddr(), release: release}
	return hbone.WrapStream(t, hbone.TransportH3), false, nil
}

func peersKey(peers []spiffeid.ID) string {
	s := make([]string, len(peers))
	for i, p := range peers {
		s[i] = p.String()
	}
	slices.Sort(s)
	return strings.Join(slices.Compact(s), " ")
}

// reserve returns a connection for key with a stream slot reserved,
// dialing one when none has room (one dial per key at a time; those who
// waited for a failed dial get its error).
func (d *Dialer) reserve(ctx context.Context, key poolKey, r hbone.DialRequest) (*clientConn, error) {
	limit := orDefault(d.MaxStreamsPerConn, hbone.DefaultMaxStreamsPerConn)
	d.mu.Lock()
	for {
		if d.closed {
			d.mu.Unlock()
			return nil, ErrDialerClosed
		}
		if d.pools == nil {
			d.pools = map[poolKey]*pool{}
		}
		p := d.pools[key]
		if p == nil {
			p = &pool{cache: tls.NewLRUClientSessionCache(sessionCacheSize)}
			d.pools[key] = p
		}
		now := time.Now()
		for _, c := range p.conns {
			if !now.Before(c.notAfter) {
				continue // a certificate of its handshake expired: carries its streams, takes no new one
			}
			if !c.dead && c.active < limit && c.qc.Context().Err() == nil {
				c.active++
				if c.idle != nil {
					c.idle.Stop()
					c.idle = nil
				}
				d.mu.Unlock()
				return c, nil
			}
		}
		dl := p.dialing
		if dl == nil {
			dl = &dial{done: make(chan struct{})}
			p.dialing = dl
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), orDefault(d.HandshakeTimeout, hbone.DefaultHandshakeTimeout))
			d.wg.Add(1)
			go func() {
				defer d.wg.Done()
				defer cancel()
				d.dialConn(dctx, key, p, dl, r)
			}()
		}
		d.mu.Unlock()
		select {
		case <-dl.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if dl.err != nil {
			return nil, dl.err
		}
		d.mu.Lock()
	}
}

// dialConn makes a connection for p and publishes it (or the error) in dl.
func (d *Dialer) dialConn(ctx context.Context, key poolKey, p *pool, dl *dial, r hbone.DialRequest) {
	c, err := d.connect(ctx, r, p.cache)
	d.mu.Lock()
	defer d.mu.Unlock()
	defer close(dl.done)
	p.dialing = nil
	if err == nil && d.closed {
		c.qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "")
		err = ErrDialerClosed
	}
	if err != nil {
		dl.err = err
		if len(p.conns) == 0 && d.pools[key] == p {
			delete(d.pools, key) // nothing pooled: the next dial starts afresh
		}
		return
	}
	p.conns = append(p.conns, c)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		<-c.qc.Context().Done()
		d.mu.Lock()
		c.dead = true
		if c.idle != nil {
			c.idle.Stop()
		}
		if i := slices.Index(p.conns, c); i >= 0 {
			p.conns = slices.Delete(p.conns, i, i+1)
		}
		if len(p.conns) == 0 && p.dialing == nil && d.pools[key] == p {
			delete(d.pools, key) // its sessions go with it
		}
		d.mu.Unlock()
	}()
	d.idleLocked(c) // until the caller reserves its slot (after this returns)
}

// transport returns the Dialer's UDP transport, opening it once.
func (d *Dialer) transport(ctx context.Context) (*quic.Transport, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.tr != nil {
		return d.tr, nil
	}
	listen := d.ListenPacket
	if listen == nil {
		var lc net.ListenConfig
		listen = lc.ListenPacket
	}
	pc, err := listen(ctx, "udp", ":0")
	if err != nil {
		return nil, fmt.Errorf("udp socket: %w", err)
	}
	d.tr = &quic.Transport{Conn: pc}
	return d.tr, nil
}

// connect makes a new connection: QUIC with TLS 1.3 and the source's SVID
// (resuming one of cache's sessions when it can; the server is verified
// either way), and the HTTP/3 client on it.
func (d *Dialer) connect(ctx context.Context, r hbone.DialRequest, cache tls.ClientSessionCache) (*clientConn, error) {
	if d.Certs == nil {
		return nil, errors.New("no CertSource")
	}
	svid, err := currentSVID(ctx, d.Certs, r.Source)
	if err != nil {
		return nil, err
	}
	tr, err := d.transport(ctx)
	if err != nil {
		return nil, err
	}
	idle := orDefault(d.IdleTimeout, hbone.DefaultIdleTimeout)
	cfg := quicConfig(orDefault(d.HandshakeTimeout, hbone.DefaultHandshakeTimeout), d.KeepAlive, idle, -1)
	cfg.MaxIncomingUniStreams = 16 // the server's control and QPACK streams
	qc, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(r.Addr), clientTLSConfig(svid, d.Certs, r.Peers, cache, r.Addr.Addr()), cfg)
	if err != nil {
		return nil, fmt.Errorf("quic handshake: %w", err)
	}
	cs := qc.ConnectionState().TLS
	peer, err := x509svidID(cs)
	if err != nil {
		qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "")
		return nil, fmt.Errorf("quic handshake: %w", err)
	}
	h3 := &http3.Transport{DisableCompression: true, MaxResponseHeaderBytes: hbone.DefaultMaxHeaderBytes}
	d.logger().Debug("h3: connected", "addr", r.Addr, "src", r.Source, "peer", peer, "resumed", cs.DidResume)
	notAfter := svid.Certificates[0].NotAfter
	if pc := cs.PeerCertificates; len(pc) > 0 && pc[0].NotAfter.Before(notAfter) {
		notAfter = pc[0].NotAfter
	}
	return &clientConn{qc: qc, cc: h3.NewClientConn(qc), peer: peer, notAfter: notAfter}, nil
}

// release gives back a stream slot.
func (d *Dialer) release(c *clientConn) {
	d.mu.Lock()
	defer d.mu.Unlock()
	c.active--
	d.idleLocked(c)
}

// idleLocked arms c's idle timer if it has no streams. d.mu is held.
func (d *Dialer) idleLocked(c *clientConn) {
	if c.active > 0 || c.dead || c.idle != nil {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(orDefault(d.IdleTimeout, hbone.DefaultIdleTimeout), func() {
		d.mu.Lock()
		if c.idle != t || c.active > 0 {
			d.mu.Unlock()
			return
		}
		c.dead = true
		d.mu.Unlock()
		c.qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "idle")
	})
	c.idle = t
}

func (d *Dialer) markDead(c *clientConn) {
	d.mu.Lock()
	c.dead = true
	d.mu.Unlock()
}

// Conns returns the number of open HTTP/3 connections.
func (d *Dialer) Conns() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, p := range d.pools {
		for _, c := range p.conns {
			if c.qc.Context().Err() == nil {
				n++
			}
		}
	}
	return n
}

// Close closes all connections (resetting their streams) and the UDP
// socket, and waits for the Dialer's goroutines. Dial fails afterwards.
func (d *Dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	var conns []*clientConn
	for _, p := range d.pools {
		conns = append(conns, p.conns...)
	}
	tr := d.tr
	d.mu.Unlock()
	for _, c := range conns {
		c.qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "")
	}
	d.wg.Wait() // dials end within their handshake timeout
	if tr != nil {
		tr.Close()
		tr.Conn.Close()
	}
	return nil
}

// newTraceParent returns a fresh W3C traceparent, sampled.
func newTraceParent() string {
	var raw [24]byte
	rand.Read(raw[:])
	return "00-" + hex.EncodeToString(raw[:16]) + "-" + hex.EncodeToString(raw[16:]) + "-01"
}
