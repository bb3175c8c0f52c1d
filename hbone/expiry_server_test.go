package hbone

import (
	"errors"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"
)

// A client that keeps using a connection after its certificate expired
// (ours retires it, others may not) opens no new tunnel on it: the server
// refuses the stream (401, a Rejection) and sends GOAWAY; the streams the
// connection carries go on.
func TestServerRefusesStreamAfterPeerCertificateExpiry(t *testing.T) {
	checkGoroutines(t)
	var mu sync.Mutex
	var rejects []Rejection
	e := newEnv(t, echo, func(s *Server) {
		s.OnReject = func(r Rejection) { mu.Lock(); rejects = append(rejects, r); mu.Unlock() }
	})
	const life = 1500 * time.Millisecond
	e.certs.ttl = time.Hour
	e.skew.Store(int64(-time.Hour + life))
	d := e.dialer()
	first, err := d.Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	e.skew.Store(0)
	svid, err := e.certs.GetX509SVID(testCtx(t), e.cliID)
	if err != nil {
		t.Fatal(err)
	}
	notAfter := svid.Certificates[0].NotAfter
	if until := time.Until(notAfter); until <= 0 || until > life+time.Second {
		t.Fatalf("test SVID expires in %s, want about %s", until, life)
	}
	// A client that does not retire the connection at expiry.
	d.mu.Lock()
	for _, list := range d.pools {
		for _, pc := range list {
			pc.notAfter = notAfter.Add(time.Hour)
		}
	}
	d.mu.Unlock()

	time.Sleep(time.Until(notAfter) + 10*time.Millisecond) // the certificates' own deadline
	_, err = d.Dial(testCtx(t), e.request())
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusUnauthorized {
		t.Fatalf("stream on a connection whose client certificate expired: %v, want 401", err)
	}
	mu.Lock()
	var got *Rejection
	for i := range rejects {
		if rejects[i].Status == http.StatusUnauthorized {
			got = &rejects[i]
		}
	}
	mu.Unlock()
	if got == nil || got.Reason != RejectHandshake || !errors.Is(got.Err, ErrExpiredCertificate) {
		t.Fatalf("rejections %+v, want one handshake/401 with ErrExpiredCertificate", rejects)
	}
	// GOAWAY: the next dial does not use the connection; it handshakes
	// again, which the expired SVID fails. The GOAWAY follows the 401 on
	// the wire: wait for the client's read loop to have taken it.
	waitFor(t, "the client to read the GOAWAY", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, list := range d.pools {
			for _, pc := range list {
				if pc.c != nil {
					pc.c.mu.Lock()
					away := pc.c.goingAway || pc.c.err != nil
					pc.c.mu.Unlock()
					if !away {
						return false
					}
				}
			}
		}
		return true
	})
	if _, err := d.Dial(testCtx(t), e.request()); !errors.Is(err, ErrExpiredCertificate) {
		t.Fatalf("dial after GOAWAY: %v, want ErrExpiredCertificate", err)
	}
	// The stream opened before expiry still works.
	if _, err := io.WriteString(first, "ping"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(first, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("existing stream after expiry: %q %v", buf, err)
	}
}
