package h3

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/ambit-mesh/ambit/hbone"
)

// payload returns n deterministic pseudo-random bytes.
func payload(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// halfCloseHandler is the pod: it sends srvPayload and half-closes while
// reading what the client sends until EOF, whose SHA-256 it reports, with
// the request it saw.
type halfCloseHandler struct {
	srvPayload []byte
	got        chan [32]byte
	reqs       chan *hbone.Request
}

func (h *halfCloseHandler) ServeHBONE(ctx context.Context, r *hbone.Request) {
	st, err := r.Accept()
	if err != nil {
		return
	}
	h.reqs <- r
	var wg sync.WaitGroup
	wg.Go(func() {
		st.Write(h.srvPayload)
		st.CloseWrite()
	})
	sum := sha256.New()
	io.Copy(sum, st)
	wg.Wait()
	var s [32]byte
	copy(s[:], sum.Sum(nil))
	h.got <- s
}

// TestHalfCloseBothWays: the same SHA-checked payloads cross both
// transports in both directions, each side half-closing while the other
// still sends; the request carries the same fields and the peer identities
// are verified.
func TestHalfCloseBothWays(t *testing.T) {
	h := &halfCloseHandler{srvPayload: payload(2, 3<<20+17), got: make(chan [32]byte, 4), reqs: make(chan *hbone.Request, 4)}
	e := newEnv(t, h.ServeHBONE, nil)
	cli := payload(1, 5<<20+3)
	for _, tr := range e.transports(e.certs) {
		t.Run(tr.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			st, err := tr.dial(ctx, e.request(tr))
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			if st.Transport() != tr.name {
				t.Errorf("Transport() = %q, want %q", st.Transport(), tr.name)
			}
			if st.Peer() != e.srvID {
				t.Errorf("Peer() = %v, want %v", st.Peer(), e.srvID)
			}
			// Read the server's payload to its EOF first (it half-closed),
			// then send ours: the tunnel is open one way only meanwhile.
			got, err := io.ReadAll(st)
			if err != nil {
				t.Fatal(err)
			}
			if sha256.Sum256(got) != sha256.Sum256(h.srvPayload) {
				t.Fatalf("server->client: %d bytes, SHA mismatch (want %d)", len(got), len(h.srvPayload))
			}
			if _, err := st.Write(cli); err != nil {
				t.Fatal(err)
			}
			if err := st.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			select {
			case s := <-h.got:
				if s != sha256.Sum256(cli) {
					t.Fatal("client->server: SHA mismatch")
				}
			case <-ctx.Done():
				t.Fatal("server never read the client's EOF")
			}
			r := <-h.reqs
			if r.Peer != e.cliID || r.Local != e.srvID || r.Target != e.target {
				t.Errorf("request peer %v local %v target %v", r.Peer, r.Local, r.Target)
			}
			if r.Forwarded.For != netip.MustParseAddrPort("10.1.2.3:45678") || r.Baggage.Namespace != "shop" || len(r.TraceParent) != 55 {
				t.Errorf("request headers: forwarded %+v baggage %+v traceparent %q", r.Forwarded, r.Baggage, r.TraceParent)
			}
			if r.LocalAddr.Addr() != netip.MustParseAddr("127.0.0.1") || !r.PeerAddr.IsValid() {
				t.Errorf("request addresses: local %v peer %v", r.LocalAddr, r.PeerAddr)
			}
		})
	}
}

// TestAnswers: policy denial is 401, an upstream failure 503, a handler
// that returns without answering 503, a misdirected authority 400, on both
// transports.
func TestAnswers(t *testing.T) {
	var e *env
	handler := func(ctx context.Context, r *hbone.Request) {
		switch r.Target.Port() {
		case 401:
			r.Reject(http.StatusUnauthorized)
		case 503:
			r.Reject(http.StatusServiceUnavailable)
		case 504: // no answer
		default:
			st, err := r.Accept()
			if err == nil {
				st.Write([]byte("ok"))
				st.CloseWrite()
				io.Copy(io.Discard, st)
			}
		}
	}
	e = newEnv(t, handler, nil)
	for _, tr := range e.transports(e.certs) {
		t.Run(tr.name, func(t *testing.T) {
			for _, c := range []struct {
				target string
				want   int
			}{
				{"127.0.0.1:401", 401},
				{"127.0.0.1:503", 503},
				{"127.0.0.1:504", 503},
				{"127.0.0.2:80", 400}, // not the destination address
				{"127.0.0.1:80", 200},
			} {
				r := e.request(tr)
				r.Target = netip.MustParseAddrPort(c.target)
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				st, err := tr.dial(ctx, r)
				cancel()
				var se *hbone.StatusError
				switch {
				case c.want == 200 && err != nil:
					t.Errorf("%s: %v", c.target, err)
				case c.want == 200:
					b, _ := io.ReadAll(st)
					st.Close()
					if string(b) != "ok" {
						t.Errorf("%s: read %q", c.target, b)
					}
				case !errors.As(err, &se) || se.Code != c.want:
					t.Errorf("%s: err %v, want status %d", c.target, err, c.want)
				}
			}
			if n := tr.conns(); n != 1 {
				t.Errorf("%d connections after 5 dials, want 1 (pooled)", n)
			}
		})
	}
}

// TestRefusedPeers: a client from a foreign trust domain, a client with an
// expired certificate and a server outside the allowed identities are
// refused on both transports, and the server reports the handshakes.
func TestRefusedPeers(t *testing.T) {
	e := newEnv(t, func(ctx context.Context, r *hbone.Request) { r.Accept() }, nil)

	foreignCA := newCA(t, "evil.example", nil)
	foreign := newTestCerts(foreignCA, foreignCA, e.ca) // trusts cluster.local: only the server refuses
	for _, tr := range e.transports(foreign) {
		before := len(e.rejections())
		r := e.request(tr)
		r.Source = workloadID(t, "evil.example", "shop", "client")
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, err := tr.dial(ctx, r)
		cancel()
		if err == nil {
			t.Errorf("%s: foreign trust domain client accepted", tr.name)
		}
		waitFor(t, tr.name+" handshake rejection", func() bool {
			rs := e.rejections()
			return len(rs) > before && rs[len(rs)-1].Reason == hbone.RejectHandshake
		})
	}
	for _, tr := range e.transports(e.certs) {
		r := e.request(tr)
		r.Peers = []spiffeid.ID{workloadID(t, "cluster.local", "shop", "other")}
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, err := tr.dial(ctx, r)
		cancel()
		if err == nil {
			t.Errorf("%s: server with an identity not allowed accepted", tr.name)
		}
	}
}

// TestExpiredSourceRefusedBeforeDial: the Dialer refuses to present its own
// expired SVID (hbone.ErrExpiredCertificate), on both transports.
func TestExpiredSourceRefusedBeforeDial(t *testing.T) {
	e := newEnv(t, func(ctx context.Context, r *hbone.Request) { r.Accept() }, nil)
	expiredCA := newCA(t, "cluster.local", func() time.Time { return time.Now().Add(-48 * time.Hour) })
	for _, tr := range e.transports(newTestCerts(expiredCA, e.ca)) {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, err := tr.dial(ctx, e.request(tr))
		cancel()
		if !errors.Is(err, hbone.ErrExpiredCertificate) {
			t.Errorf("%s: %v, want ErrExpiredCertificate", tr.name, err)
		}
	}
}

// TestServerRefusesExpiredClient: a client presenting an expired SVID of
// the right trust domain (whatever its own checks) is refused by both
// servers.
func TestServerRefusesExpiredClient(t *testing.T) {
	e := newEnv(t, func(ctx context.Context, r *hbone.Request) { r.Accept() }, nil)
	e.skew.Store(int64(-48 * time.Hour))
	svid, err := e.ca.IssueSVID(e.cliID, time.Hour)
	e.skew.Store(0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()

	before := len(e.rejections())
	cfg := clientTLSConfig(svid, e.certs, []spiffeid.ID{e.srvID}, nil, netip.Addr{})
	if qc, err := quic.DialAddr(ctx, e.h3Addr.String(), cfg, &quic.Config{}); err == nil {
		// TLS 1.3: the client is done before the server checked its
		// certificate; the server closes the connection.
		select {
		case <-qc.Context().Done():
		case <-ctx.Done():
			t.Error("h3: connection with an expired client certificate kept open")
		}
		qc.CloseWithError(0, "")
	}
	waitFor(t, "h3 handshake rejection", func() bool { return len(e.rejections()) > before })

	before = len(e.rejections())
	cfg2 := tlsconfig.MTLSClientConfig(svid, e.certs, tlsconfig.AuthorizeID(e.srvID))
	cfg2.MinVersion, cfg2.NextProtos = tls.VersionTLS13, []string{"h2"}
	var d tls.Dialer
	d.Config = cfg2
	if c, err := d.DialContext(ctx, "tcp", e.h2Addr.String()); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		// TLS 1.3: the server checks the client's certificate after the
		// client finished; it answers with an alert.
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("h2: connection with an expired client certificate served")
		}
		c.Close()
	}
	waitFor(t, "h2 handshake rejection", func() bool { return len(e.rejections()) > before })
	for _, r := range e.rejections() {
		if r.Reason != hbone.RejectHandshake {
			t.Errorf("rejection %+v, want handshake", r)
		}
	}
}
