package hbone

import (
	"errors"
	"io"
	"testing"
	"time"
)

// A pooled connection takes no new stream once a certificate of its
// handshake has expired: the next Dial handshakes again, which an expired
// SVID fails (fail closed), while the stream it already carries goes on.
func TestPooledConnRetiredAtCertificateExpiry(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	// Both SVIDs are issued (and cached) now, expiring in 1.5s.
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
	// Before expiry the pooled connection carries a second stream.
	second, err := d.Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	second.Close()
	d.mu.Lock()
	pools, conns := len(d.pools), 0
	for _, list := range d.pools {
		conns += len(list)
	}
	d.mu.Unlock()
	if pools != 1 || conns != 1 {
		t.Fatalf("%d pools, %d connections before expiry, want 1 reused connection", pools, conns)
	}

	time.Sleep(time.Until(notAfter) + 10*time.Millisecond) // the certificates' own deadline
	if _, err := d.Dial(testCtx(t), e.request()); !errors.Is(err, ErrExpiredCertificate) {
		t.Fatalf("dial after the source SVID expired: %v, want ErrExpiredCertificate (not the pooled connection)", err)
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
