package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// rejections collects what Server.OnReject is told.
type rejections struct {
	mu  sync.Mutex
	got []Rejection
	ch  chan struct{}
}

func (r *rejections) add(x Rejection) {
	r.mu.Lock()
	r.got = append(r.got, x)
	r.mu.Unlock()
	select {
	case r.ch <- struct{}{}:
	default:
	}
}

// wait returns the first rejection for reason.
func (r *rejections) wait(t *testing.T, reason RejectReason) Rejection {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		for _, x := range r.got {
			if x.Reason == reason {
				r.mu.Unlock()
				return x
			}
		}
		r.mu.Unlock()
		select {
		case <-r.ch:
		case <-deadline:
			t.Fatalf("no %s rejection (got %+v)", reason, r.got)
		}
	}
}

// OnReject hears of each kind of refusal, with its addresses and cause.
func TestOnReject(t *testing.T) {
	rs := &rejections{ch: make(chan struct{}, 1)}
	e := newEnv(t, echo, func(s *Server) { s.OnReject = rs.add })

	// A client without a certificate: the handshake fails.
	c, err := tls.Dial("tcp", e.addr.String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13})
	if err == nil {
		c.Read(make([]byte, 1)) // TLS 1.3: the server's verdict comes after the client's Finished
		c.Close()
	}
	r := rs.wait(t, RejectHandshake)
	if r.Err == nil || r.Local != e.addr || !r.Remote.IsValid() {
		t.Fatalf("handshake rejection %+v", r)
	}

	// A verified client that does not speak HTTP/2: a bad preface.
	svid, err := e.certs.GetX509SVID(t.Context(), e.cliID)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := net.Dial("tcp", e.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(nc, clientTLSConfig(svid, e.certs, []spiffeid.ID{e.srvID}))
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	io.WriteString(tc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	io.Copy(io.Discard, tc)
	tc.Close()
	if r := rs.wait(t, RejectPreface); r.Err == nil || r.Local != e.addr {
		t.Fatalf("preface rejection %+v", r)
	}

	// A misdirected CONNECT: 400, and told as bad_request.
	bad := e.request()
	bad.Target = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), e.target.Port())
	_, err = e.dialer().Dial(testCtx(t), bad)
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusBadRequest {
		t.Fatalf("dial: %v, want 400", err)
	}
	if r := rs.wait(t, RejectBadRequest); r.Status != http.StatusBadRequest {
		t.Fatalf("bad request rejection %+v", r)
	}
}

// Handlers run under the listener's BaseContext: ending it ends them.
func TestBaseContext(t *testing.T) {
	base, cancel := context.WithCancel(t.Context())
	defer cancel()
	type key struct{}
	base = context.WithValue(base, key{}, "from BaseContext")
	seen := make(chan any, 1)
	ended := make(chan struct{})
	e := newEnv(t, echo, func(s *Server) {
		s.BaseContext = func(net.Listener) context.Context { return base }
		s.Handler = HandlerFunc(func(ctx context.Context, r *Request) {
			seen <- ctx.Value(key{})
			st, err := r.Accept()
			if err != nil {
				return
			}
			<-ctx.Done()
			st.Close()
			close(ended)
		})
	})
	st, err := e.dialer().Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if v := <-seen; v != "from BaseContext" {
		t.Fatalf("handler context value %v", v)
	}
	cancel()
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler's context outlived BaseContext's")
	}
}
