package h3

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
)

// A flood of QUIC handshakes from one source that never finish holds at
// most MaxPendingHandshakesPerSource of them (the others are refused before
// any SVID lookup or signature); once they end, the source dials again.
func TestQUICPendingHandshakesBoundedPerSource(t *testing.T) {
	const handshakeTimeout = 16 * time.Second // longer than the flood is held
	var lookups atomic.Int64
	e := newEnv(t, echoHandler, func(s *Server) {
		inner := s.LocalIdentity
		s.LocalIdentity = func(a netip.Addr) (spiffeid.ID, bool) { lookups.Add(1); return inner(a) }
		s.HandshakeTimeout = handshakeTimeout
	})
	release := make(chan struct{})
	releaseAll := sync.OnceFunc(func() { close(release) })
	var wg sync.WaitGroup
	var mu sync.Mutex // guards trs
	var trs []*quic.Transport
	defer func() {
		releaseAll()
		wg.Wait()
		mu.Lock()
		for _, tr := range trs {
			tr.Close()
			tr.Conn.Close()
		}
		mu.Unlock()
	}()
	const n = 150
	var stalled, failed atomic.Int64
	for range n {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		tr := &quic.Transport{Conn: pc}
		mu.Lock()
		trs = append(trs, tr)
		mu.Unlock()
		wg.Go(func() {
			cfg := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13,
				GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
					stalled.Add(1)
					// Never answer (the server waits for our Finished);
					// once released, fail: the client closes the connection.
					<-release
					return nil, errors.New("released")
				}}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			if _, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(e.h3Addr), cfg, &quic.Config{HandshakeIdleTimeout: 30 * time.Second}); err != nil {
				select {
				case <-release:
				default:
					failed.Add(1)
				}
			}
		})
	}
	// Until every attempt stalled or was refused, or 15s (a refusal
	// dropped past the server's queue is retransmitted after a backoff):
	// less than the server's handshake timeout, so none is let go and
	// replaced.
	for deadline := time.Now().Add(15 * time.Second); stalled.Load()+failed.Load() < n && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	pending, _, refused := e.h3.admission.counts()
	t.Logf("%d attempts from 127.0.0.1: %d got the server's flight, %d refused (server: %d pending, %d refused), %d identity lookups",
		n, stalled.Load(), failed.Load(), pending, refused, lookups.Load())
	if got := stalled.Load(); got > hbone.DefaultMaxPendingHandshakesPerSource {
		t.Errorf("%d concurrent pending handshakes from one source, want at most %d", got, hbone.DefaultMaxPendingHandshakesPerSource)
	}
	if got := failed.Load(); got < n/2 {
		t.Errorf("%d of %d attempts refused, want most", got, n)
	}
	if got := lookups.Load(); got > hbone.DefaultMaxPendingHandshakesPerSource {
		t.Errorf("%d identity lookups (and signatures) for %d held handshakes: refused ones got TLS work", got, stalled.Load())
	}
	if !e.h3.admission.needsRetry(net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:1"))) {
		t.Error("a source at its handshake bound is not asked for address validation (Retry)")
	}
	if e.h3.admission.needsRetry(net.UDPAddrFromAddrPort(netip.MustParseAddrPort("10.0.0.1:1"))) {
		t.Error("another source is asked for a Retry")
	}

	// The stalled handshakes fail: the source's count goes back to zero
	// and a real client connects (through a Retry or not).
	releaseAll() // and later attempts fail at once
	wg.Wait()
	// By the server's handshake timeout at the latest (a client's close
	// may be lost), usually at once.
	for deadline := time.Now().Add(handshakeTimeout + 5*time.Second); ; time.Sleep(10 * time.Millisecond) {
		pending, sources, _ := e.h3.admission.counts()
		if pending == 0 && sources == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d handshakes from %d sources still counted", pending, sources)
		}
	}
	var h3tr transport
	for _, tr := range e.transports(e.certs) {
		if tr.name == "h3" {
			h3tr = tr
		}
	}
	st, err := h3tr.dial(testCtx(t), e.request(h3tr))
	if err != nil {
		t.Fatalf("dial after the flood: %v", err)
	}
	st.Close()
	if pending, sources, _ := e.h3.admission.counts(); pending != 0 || sources != 1 {
		t.Errorf("after a completed handshake: %d pending, %d sources, want 0 and 1 (the live connection)", pending, sources)
	}
}

// Sources: IPv4 addresses, IPv6 /64s.
func TestQUICSourceKey(t *testing.T) {
	for in, want := range map[string]string{
		"10.1.2.3":                "10.1.2.3",
		"::ffff:10.1.2.3":         "10.1.2.3",
		"2001:db8:1:2:3:4:5:6":    "2001:db8:1:2::",
		"2001:db8:1:2:ffff::1%e0": "2001:db8:1:2::",
	} {
		if got := sourceKey(netip.MustParseAddr(in)); got != netip.MustParseAddr(want) {
			t.Errorf("sourceKey(%s) = %s, want %s", in, got, want)
		}
	}
}

// A source's connections are capped: past MaxConnsPerSource a new one is
// refused, and once one closes the next is accepted.
func TestQUICConnsPerSourceCapped(t *testing.T) {
	e := newEnv(t, echoHandler, func(s *Server) { s.MaxConnsPerSource = 2 })
	var dialers []*Dialer
	dial := func() error {
		d := &Dialer{Certs: e.certs, HandshakeTimeout: 2 * time.Second, Logger: dbgLog}
		dialers = append(dialers, d)
		t.Cleanup(func() { d.Close() })
		r := e.request(transport{addr: e.h3Addr})
		st, err := d.Dial(testCtx(t), r)
		if err == nil {
			st.Close()
		}
		return err
	}
	for i := range 2 {
		if err := dial(); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	err := dial()
	var tErr *quic.TransportError
	if !errors.As(err, &tErr) || tErr.ErrorCode != quic.ConnectionRefused {
		t.Fatalf("third connection from one source: %v, want CONNECTION_REFUSED", err)
	}
	dialers[0].Close()
	waitFor(t, "the closed connection to be uncounted", func() bool {
		e.h3.admission.mu.Lock()
		defer e.h3.admission.mu.Unlock()
		c := e.h3.admission.bySrc[netip.MustParseAddr("127.0.0.1")]
		return c != nil && c.conns == 1
	})
	if err := dial(); err != nil {
		t.Fatalf("connection after one closed: %v", err)
	}
}

// A pooled connection takes no new stream once a certificate of its
// handshake expired (as hbone.Dialer's): the next Dial handshakes again,
// which the expired SVID fails; the stream it carries goes on.
func TestQUICPooledConnRetiredAtCertificateExpiry(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	first, d, notAfter := expiringConn(t, e)
	defer first.Close()
	time.Sleep(time.Until(notAfter) + 10*time.Millisecond) // the certificates' own deadline
	if _, err := d.Dial(testCtx(t), e.request(transport{addr: e.h3Addr})); !errors.Is(err, hbone.ErrExpiredCertificate) {
		t.Fatalf("dial after the source SVID expired: %v, want ErrExpiredCertificate (not the pooled connection)", err)
	}
	checkEcho(t, first)
}

// A client that keeps using a connection after its certificate expired
// opens no new tunnel on it: the server answers 401 (a Rejection); the
// streams it carries go on.
func TestQUICServerRefusesStreamAfterPeerCertificateExpiry(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	first, d, notAfter := expiringConn(t, e)
	defer first.Close()
	d.mu.Lock() // a client that does not retire the connection at expiry
	for _, p := range d.pools {
		for _, c := range p.conns {
			c.notAfter = notAfter.Add(time.Hour)
		}
	}
	d.mu.Unlock()
	time.Sleep(time.Until(notAfter) + 10*time.Millisecond)
	_, err := d.Dial(testCtx(t), e.request(transport{addr: e.h3Addr}))
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusUnauthorized {
		t.Fatalf("stream on a connection whose client certificate expired: %v, want 401", err)
	}
	var got *hbone.Rejection
	for _, r := range e.rejections() {
		if r.Status == http.StatusUnauthorized {
			got = &r
		}
	}
	if got == nil || got.Reason != hbone.RejectHandshake || !errors.Is(got.Err, hbone.ErrExpiredCertificate) {
		t.Fatalf("rejections %+v, want one handshake/401 with ErrExpiredCertificate", e.rejections())
	}
	checkEcho(t, first)
}

// expiringConn opens a stream over h3 with both SVIDs expiring in about
// 1.5s and returns it, its Dialer and when the client's SVID expires.
func expiringConn(t *testing.T, e *env) (*hbone.Stream, *Dialer, time.Time) {
	t.Helper()
	const life = 1500 * time.Millisecond
	e.skew.Store(int64(-24*time.Hour + life)) // the CA issues for 24h: these expire in ~1.5s
	d := &Dialer{Certs: e.certs, Logger: dbgLog}
	t.Cleanup(func() { d.Close() })
	first, err := d.Dial(testCtx(t), e.request(transport{addr: e.h3Addr}))
	if err != nil {
		t.Fatal(err)
	}
	e.skew.Store(0)
	svid, err := e.certs.GetX509SVID(testCtx(t), e.cliID)
	if err != nil {
		t.Fatal(err)
	}
	notAfter := svid.Certificates[0].NotAfter
	if until := time.Until(notAfter); until <= 0 || until > life+time.Second {
		t.Fatalf("test SVID expires in %s, want about %s", until, life)
	}
	// Before expiry the pooled connection carries a second stream.
	second, err := d.Dial(testCtx(t), e.request(transport{addr: e.h3Addr}))
	if err != nil {
		t.Fatal(err)
	}
	second.Close()
	if n := d.Conns(); n != 1 {
		t.Fatalf("%d connections before expiry, want 1 reused", n)
	}
	return first, d, notAfter
}

func checkEcho(t *testing.T, st *hbone.Stream) {
	t.Helper()
	if _, err := io.WriteString(st, "ping"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(st, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("existing stream after expiry: %q %v", buf, err)
	}
}

// A failed dial leaves no pool entry behind.
func TestQUICFailedDialLeavesNoPool(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0") // answers nothing
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	d := &Dialer{Certs: e.certs, HandshakeTimeout: 300 * time.Millisecond, Logger: dbgLog}
	defer d.Close()
	for i := range 3 {
		r := e.request(transport{addr: pc.LocalAddr().(*net.UDPAddr).AddrPort()})
		r.Target = netip.AddrPortFrom(r.Target.Addr(), uint16(9000+i)) // same pool key; any target
		if _, err := d.Dial(testCtx(t), r); err == nil {
			t.Fatal("dial to a silent address succeeded")
		}
	}
	d.mu.Lock()
	n := len(d.pools)
	d.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d pool entries after failed dials, want 0", n)
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}
