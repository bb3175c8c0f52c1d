package h3

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/hbone"
)

// TestFallback: a QUIC dial that gets no answer falls back to HTTP/2 (the
// same stream contract), the address is then dialed over HTTP/2 only until
// RetryAfter; a 401 over QUIC is final; Use keeps QUIC off.
func TestFallback(t *testing.T) {
	e := newEnv(t, echoHandler, nil)
	var fallbacks int
	f := &Fallback{
		H2: &hbone.Dialer{Certs: e.certs}, H3: &Dialer{Certs: e.certs, HandshakeTimeout: 300 * time.Millisecond},
		DialTimeout: 300 * time.Millisecond, RetryAfter: time.Hour,
		OnFallback: func(hbone.DialRequest, error) { fallbacks++ },
	}
	defer f.Close()
	// Nothing serves QUIC on the HTTP/2 server's port: the QUIC dial fails.
	r := e.request(transport{addr: e.h2Addr})
	for i := range 2 {
		start := time.Now()
		st, err := f.Dial(t.Context(), r)
		if err != nil {
			t.Fatal(err)
		}
		if st.Transport() != hbone.TransportH2 {
			t.Errorf("dial %d: transport %s, want h2", i, st.Transport())
		}
		roundTrip(t, st, "over h2")
		st.Close()
		if i == 1 && time.Since(start) > 200*time.Millisecond {
			t.Errorf("second dial took %v: QUIC was tried again", time.Since(start))
		}
	}
	if fallbacks != 1 {
		t.Errorf("%d fallbacks, want 1 (remembered)", fallbacks)
	}

	// Where QUIC answers, it is used; a policy answer over QUIC is final.
	f2 := &Fallback{H2: &hbone.Dialer{Certs: e.certs}, H3: &Dialer{Certs: e.certs}}
	defer f2.Close()
	r3 := e.request(transport{addr: e.h3Addr})
	st, err := f2.Dial(t.Context(), r3)
	if err != nil {
		t.Fatal(err)
	}
	if st.Transport() != hbone.TransportH3 {
		t.Errorf("transport %s, want h3", st.Transport())
	}
	st.Close()
	e2 := newEnv(t, func(ctx context.Context, r *hbone.Request) { r.Reject(401) }, nil)
	f3 := &Fallback{H2: &hbone.Dialer{Certs: e2.certs}, H3: &Dialer{Certs: e2.certs},
		OnFallback: func(hbone.DialRequest, error) { t.Error("fell back after a 401") }}
	defer f3.Close()
	_, err = f3.Dial(t.Context(), e2.request(transport{addr: e2.h3Addr}))
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != 401 {
		t.Errorf("err %v, want a 401", err)
	}
	// Use false: HTTP/2 without trying.
	f4 := &Fallback{H2: &hbone.Dialer{Certs: e.certs}, H3: &Dialer{Certs: e.certs},
		Use: func(hbone.DialRequest) bool { return false }}
	defer f4.Close()
	st, err = f4.Dial(t.Context(), e.request(transport{addr: e.h2Addr}))
	if err != nil || st.Transport() != hbone.TransportH2 || f4.H3.Conns() != 0 {
		t.Errorf("Use false: %v, %v", err, f4.H3.Conns())
	}
	if st != nil {
		st.Close()
	}
}
