package h3

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/ambit-mesh/ambit/hbone"
)

// echoHandler accepts and copies the stream back to itself, then
// half-closes.
func echoHandler(ctx context.Context, r *hbone.Request) {
	st, err := r.Accept()
	if err != nil {
		return
	}
	io.Copy(st, st)
	st.CloseWrite()
}

// roundTrip writes msg and reads it back (the stream stays open).
func roundTrip(t *testing.T, st *hbone.Stream, msg string) {
	t.Helper()
	st.SetDeadline(time.Now().Add(5 * time.Second))
	defer st.SetDeadline(time.Time{})
	if _, err := st.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(st, buf); err != nil || string(buf) != msg {
		t.Fatalf("read %q, %v; want %q", buf, err, msg)
	}
}

// signalCache is a session cache that says when a ticket was stored.
type signalCache struct {
	tls.ClientSessionCache
	put chan struct{}
}

func (c *signalCache) Put(key string, cs *tls.ClientSessionState) {
	c.ClientSessionCache.Put(key, cs)
	if cs != nil {
		select {
		case c.put <- struct{}{}:
		default:
		}
	}
}

// TestResumptionReverifiesPeer: a resumed session is verified again. A
// QUIC client's sessions are all cached under one key (no SNI), so a
// ticket from the server identity X is offered when dialing for Y; with
// go-spiffe's config as is (peer check in VerifyPeerCertificate, which
// crypto/tls skips on resumption) that handshake succeeds: the control
// below shows the trap. Ours checks in VerifyConnection and refuses it.
func TestResumptionReverifiesPeer(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	svid, err := e.certs.GetX509SVID(t.Context(), e.cliID)
	if err != nil {
		t.Fatal(err)
	}
	other := workloadID(t, "cluster.local", "shop", "other")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	dial := func(cfg *tls.Config) (*quic.Conn, error) {
		qc, err := quic.DialAddr(ctx, e.h3Addr.String(), cfg, &quic.Config{})
		if err != nil {
			return nil, err
		}
		// TLS 1.3: the server may still refuse after the client is done.
		select {
		case <-qc.HandshakeComplete():
		case <-ctx.Done():
		}
		return qc, nil
	}
	ticket := func(cache *signalCache, after string) {
		t.Helper()
		select {
		case <-cache.put:
		case <-ctx.Done():
			t.Fatal("no session ticket after", after)
		}
	}

	cache := &signalCache{ClientSessionCache: tls.NewLRUClientSessionCache(4), put: make(chan struct{}, 1)}
	qc, err := dial(clientTLSConfig(svid, e.certs, []spiffeid.ID{e.srvID}, cache, e.h3Addr.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	ticket(cache, "the full handshake")
	qc.CloseWithError(0, "")
	qc, err = dial(clientTLSConfig(svid, e.certs, []spiffeid.ID{e.srvID}, cache, e.h3Addr.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	if !qc.ConnectionState().TLS.DidResume {
		t.Fatal("second handshake did not resume: the test proves nothing")
	}
	ticket(cache, "the resumed handshake")
	qc.CloseWithError(0, "")

	// Control: go-spiffe's client config with the same cache resumes a
	// session of the server identity while only "other" is allowed.
	naive := tlsconfig.MTLSClientConfig(svid, e.certs, tlsconfig.AuthorizeID(other))
	naive.MinVersion, naive.NextProtos, naive.ClientSessionCache = tls.VersionTLS13, []string{alpn}, cache
	naive.ServerName = e.h3Addr.Addr().String()
	if qc, err := dial(naive); err == nil {
		if !qc.ConnectionState().TLS.DidResume {
			t.Error("control: did not resume")
		}
		ticket(cache, "the control")
		qc.CloseWithError(0, "")
	} else {
		t.Logf("control: crypto/tls verified the resumed session itself (%v)", err)
	}

	// Ours refuses it.
	if qc, err := dial(clientTLSConfig(svid, e.certs, []spiffeid.ID{other}, cache, e.h3Addr.Addr())); err == nil {
		qc.CloseWithError(0, "")
		t.Fatalf("resumed a session of %s while only %s is allowed (resumed: %v)", e.srvID, other, qc.ConnectionState().TLS.DidResume)
	}
}

// TestPoolPerKey: streams with the same (source, peers, address) share a
// connection; another source identity gets its own.
func TestPoolPerKey(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	d := &Dialer{Certs: e.certs, Logger: dbgLog}
	t.Cleanup(func() { d.Close() })
	tr := transport{addr: e.h3Addr}
	var streams []*hbone.Stream
	for _, src := range []spiffeid.ID{e.cliID, e.cliID, e.cliID, workloadID(t, "cluster.local", "shop", "client2")} {
		r := e.request(tr)
		r.Source = src
		st, err := d.Dial(t.Context(), r)
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, st, "hello "+src.String())
		streams = append(streams, st)
	}
	if n := d.Conns(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
	for _, st := range streams {
		st.Close()
	}
}

// TestStreamLimit: past MaxStreamsPerConn a second connection opens.
func TestStreamLimit(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	d := &Dialer{Certs: e.certs, MaxStreamsPerConn: 2, Logger: dbgLog}
	t.Cleanup(func() { d.Close() })
	var streams []*hbone.Stream
	for i := range 3 {
		st, err := d.Dial(t.Context(), e.request(transport{addr: e.h3Addr}))
		if err != nil {
			t.Fatal(i, err)
		}
		streams = append(streams, st)
	}
	if n := d.Conns(); n != 2 {
		t.Errorf("%d connections for 3 streams of at most 2, want 2", n)
	}
	for _, st := range streams {
		roundTrip(t, st, "x")
		st.Close()
	}
}

// TestIdleClose: a connection without streams for IdleTimeout is closed;
// the next Dial makes a new one.
func TestIdleClose(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	d := &Dialer{Certs: e.certs, IdleTimeout: 100 * time.Millisecond, Logger: dbgLog}
	t.Cleanup(func() { d.Close() })
	st, err := d.Dial(t.Context(), e.request(transport{addr: e.h3Addr}))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, st, "a")
	time.Sleep(200 * time.Millisecond) // longer than IdleTimeout: an open stream keeps it
	if d.Conns() != 1 {
		t.Fatal("connection with an open stream closed as idle")
	}
	st.Close()
	waitFor(t, "idle close", func() bool { return d.Conns() == 0 })
	st, err = d.Dial(t.Context(), e.request(transport{addr: e.h3Addr}))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, st, "b")
	st.Close()
}

// TestShutdownDrains: Shutdown lets an open stream finish, refuses new
// ones, and returns once the stream is done.
func TestShutdownDrains(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	d := &Dialer{Certs: e.certs, Logger: dbgLog}
	t.Cleanup(func() { d.Close() })
	st, err := d.Dial(t.Context(), e.request(transport{addr: e.h3Addr}))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, st, "before")
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(t.Context()), 10*time.Second)
		defer cancel()
		done <- e.h3.Shutdown(ctx)
	}()
	// A new stream is refused (GOAWAY, then the listener is gone).
	waitFor(t, "new streams refused", func() bool {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		st2, err := d.Dial(ctx, e.request(transport{addr: e.h3Addr}))
		if err == nil {
			st2.Close()
			return false
		}
		return true
	})
	roundTrip(t, st, "during drain")
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a stream open", err)
	default:
	}
	st.CloseWrite()
	io.ReadAll(st)
	st.Close()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the last stream ended")
	}
}
