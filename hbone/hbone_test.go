package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestEcho(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	d := e.dialer()
	s, err := d.Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Peer() != e.srvID {
		t.Errorf("peer %v, want %v", s.Peer(), e.srvID)
	}
	if _, err := s.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "hello" {
		t.Fatalf("got %q", got)
	}
}

// TestTransferHashed sends different multi-megabyte streams both ways at
// once and checks both ends' SHA-256.
func TestTransferHashed(t *testing.T) {
	checkGoroutines(t)
	const up, down = 7<<20 + 123, 5<<20 + 77
	upData, downData := make([]byte, up), make([]byte, down)
	rand.Read(upData)
	rand.Read(downData)
	podGot := make(chan [32]byte, 1)
	pod := func(c net.Conn) {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Write(downData)
			c.(*net.TCPConn).CloseWrite()
		}()
		h := sha256.New()
		io.Copy(h, c)
		podGot <- [32]byte(h.Sum(nil))
		wg.Wait()
	}
	e := newEnv(t, pod, nil)
	s, err := e.dialer().Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	writeErr := make(chan error, 1)
	go func() {
		// Uneven write sizes exercise frame splitting.
		rest := upData
		for i := 1; len(rest) > 0; i++ {
			n := min(len(rest), i*7919)
			if _, err := s.Write(rest[:n]); err != nil {
				writeErr <- err
				return
			}
			rest = rest[n:]
		}
		writeErr <- s.CloseWrite()
	}()
	h := sha256.New()
	n, err := io.Copy(h, s)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-writeErr; err != nil {
		t.Fatal(err)
	}
	if n != down || [32]byte(h.Sum(nil)) != sha256.Sum256(downData) {
		t.Errorf("client received %d bytes with a different hash (want %d)", n, down)
	}
	if got := <-podGot; got != sha256.Sum256(upData) {
		t.Error("pod received different bytes")
	}
}

// TestHalfClose checks that EOF crosses the tunnel in each direction while
// the other direction keeps working.
func TestHalfClose(t *testing.T) {
	checkGoroutines(t)
	t.Run("client first", func(t *testing.T) {
		pod := func(c net.Conn) {
			got, _ := io.ReadAll(c) // until the client's CloseWrite
			fmt.Fprintf(c, "got %s", got)
		}
		e := newEnv(t, pod, nil)
		s, err := e.dialer().Dial(testCtx(t), e.request())
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		io.WriteString(s, "request")
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write([]byte("x")); err == nil {
			t.Error("write after CloseWrite succeeded")
		}
		got, err := io.ReadAll(s)
		if err != nil || string(got) != "got request" {
			t.Fatalf("read %q, %v", got, err)
		}
	})
	t.Run("server first", func(t *testing.T) {
		podGot := make(chan string, 1)
		pod := func(c net.Conn) {
			io.WriteString(c, "banner")
			c.(*net.TCPConn).CloseWrite()
			got, _ := io.ReadAll(c)
			podGot <- string(got)
		}
		e := newEnv(t, pod, nil)
		s, err := e.dialer().Dial(testCtx(t), e.request())
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		got, err := io.ReadAll(s) // EOF arrives while our side is open
		if err != nil || string(got) != "banner" {
			t.Fatalf("read %q, %v", got, err)
		}
		io.WriteString(s, "reply after EOF")
		s.CloseWrite()
		if got := <-podGot; got != "reply after EOF" {
			t.Fatalf("pod got %q", got)
		}
	})
}

func TestRequestHeaders(t *testing.T) {
	checkGoroutines(t)
	reqs := make(chan *Request, 2)
	e := newEnv(t, echo, func(s *Server) {
		s.Handler = HandlerFunc(func(ctx context.Context, r *Request) {
			reqs <- r
			dialHandler(ctx, r)
		})
	})
	d := e.dialer()
	r := e.request()
	r.Host = "reviews.shop.svc.cluster.local"
	bag := Baggage{ClusterName: "c1", Namespace: "shop", WorkloadKind: "deployment", WorkloadName: "client-v1", ServiceName: "client", Version: "v1"}
	r.Baggage = bag.String()
	var traces []string
	for range 2 {
		s, err := d.Dial(testCtx(t), r)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		got := <-reqs
		if got.Peer != e.cliID || got.Local != e.srvID {
			t.Errorf("peer %v local %v", got.Peer, got.Local)
		}
		if got.Target != e.target || got.LocalAddr != e.addr || !got.PeerAddr.Addr().IsLoopback() {
			t.Errorf("target %v local %v peer %v", got.Target, got.LocalAddr, got.PeerAddr)
		}
		if want := (Forwarded{For: r.ForwardedFor, Host: r.Host}); got.Forwarded != want {
			t.Errorf("forwarded %+v, want %+v (header %q)", got.Forwarded, want, got.Header.Get("Forwarded"))
		}
		if got.Baggage != bag {
			t.Errorf("baggage %+v, want %+v", got.Baggage, bag)
		}
		if !regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-01$`).MatchString(got.TraceParent) {
			t.Errorf("traceparent %q", got.TraceParent)
		}
		traces = append(traces, got.TraceParent)
	}
	if traces[0] == traces[1] {
		t.Error("traceparent reused across streams")
	}
	if n := d.Conns(); n != 1 {
		t.Errorf("%d connections for sequential streams, want 1", n)
	}
}

// TestPooling opens 1000 concurrent tunnelled connections and checks that
// they share ceil(1000/100) HBONE connections.
func TestPooling(t *testing.T) {
	checkGoroutines(t)
	const n, perConn = 1000, 100
	e := newEnv(t, echo, nil)
	d := e.dialer()
	ctx := testCtx(t)
	var ready, release sync.WaitGroup
	ready.Add(n)
	release.Add(1)
	errs := make(chan error, n)
	for i := range n {
		go func() {
			s, err := d.Dial(ctx, e.request())
			if err != nil {
				ready.Done()
				errs <- err
				return
			}
			defer s.Close()
			msg := fmt.Sprintf("conn %d", i)
			io.WriteString(s, msg)
			buf := make([]byte, len(msg))
			_, err = io.ReadFull(s, buf)
			ready.Done()
			if err == nil && string(buf) != msg {
				err = fmt.Errorf("echo %q, want %q", buf, msg)
			}
			release.Wait() // hold the stream open until all are open
			if err == nil {
				s.CloseWrite()
				_, err = io.ReadAll(s)
			}
			errs <- err
		}()
	}
	ready.Wait()
	if got, want := d.Conns(), (n+perConn-1)/perConn; got != want {
		t.Errorf("%d HBONE connections for %d streams, want %d", got, n, want)
	}
	release.Done()
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestIdleClose(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, func(s *Server) { s.IdleTimeout = 150 * time.Millisecond })
	d := &Dialer{Certs: e.certs, IdleTimeout: 100 * time.Millisecond}
	defer d.Close()
	s, err := d.Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // an open stream keeps the conn
	if d.Conns() != 1 {
		t.Fatal("connection with an open stream was closed")
	}
	s.Close()
	waitFor(t, "client idle close", func() bool { return d.Conns() == 0 })
	// A client that never opens a stream is closed by the server.
	svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
	c, err := e.tlsClient(svid)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, http2.ClientPreface)
	http2.NewFramer(c, c).WriteSettings()
	start := time.Now()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Fatalf("server did not close the idle connection: %v", err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("idle close took %v", el)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func statusOf(err error) int {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

func TestStatusCodes(t *testing.T) {
	checkGoroutines(t)
	denied := workloadID(t, "cluster.local", "other", "intruder")
	e := newEnv(t, echo, func(s *Server) {
		s.IsWaypointFor = func(local, target netip.Addr) bool {
			return target == netip.MustParseAddr("127.0.0.3")
		}
		s.Handler = HandlerFunc(func(ctx context.Context, r *Request) {
			switch {
			case r.Peer == denied:
				r.Reject(http.StatusUnauthorized)
			case r.Target.Port() == 1: // a handler that forgets to answer
			case r.Target.Addr() == netip.MustParseAddr("127.0.0.3"):
				s, err := r.Accept()
				if err == nil {
					io.WriteString(s, "waypoint")
				}
			default:
				dialHandler(ctx, r)
			}
		})
	})
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedAddr := closed.Addr().(*net.TCPAddr).AddrPort()
	closed.Close()
	d := e.dialer()
	tests := []struct {
		name string
		edit func(*DialRequest)
		want int
	}{
		{"ok", func(*DialRequest) {}, 200},
		{"policy denies", func(r *DialRequest) { r.Source = denied }, 401},
		{"upstream refuses", func(r *DialRequest) { r.Target = closedAddr }, 503},
		{"handler does not answer", func(r *DialRequest) { r.Target = netip.AddrPortFrom(r.Target.Addr(), 1) }, 503},
		{"authority differs from destination", func(r *DialRequest) { r.Target = netip.MustParseAddrPort("127.0.0.2:80") }, 400},
		{"destination is the target's waypoint", func(r *DialRequest) { r.Target = netip.MustParseAddrPort("127.0.0.3:80") }, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.request()
			tt.edit(&r)
			s, err := d.Dial(testCtx(t), r)
			got := 200
			if err != nil {
				if got = statusOf(err); got == 0 {
					t.Fatalf("dial: %v (not a status)", err)
				}
			} else {
				s.Close()
			}
			if got != tt.want {
				t.Errorf("status %d, want %d (err %v)", got, tt.want, err)
			}
		})
	}
	t.Run("oversized headers", func(t *testing.T) {
		r := e.request()
		r.Baggage = "k=" + strings.Repeat("v", DefaultMaxHeaderBytes)
		if _, err := d.Dial(testCtx(t), r); !errors.Is(err, ErrHeadersTooLarge) {
			t.Fatalf("dial: %v, want ErrHeadersTooLarge", err)
		}
	})
	// All of that over one healthy connection per source identity.
	if n := d.Conns(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
}

// rawRequest sends one HEADERS frame with fields over a fresh mTLS
// connection and returns the response status (or -1 if the stream was
// reset).
func (e *env) rawRequest(t *testing.T, fields []hpack.HeaderField) int {
	t.Helper()
	svid, err := e.certs.GetX509SVID(context.Background(), e.cliID)
	if err != nil {
		t.Fatal(err)
	}
	c, err := e.tlsClient(svid)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, http2.ClientPreface)
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.WriteSettings()
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range fields {
		enc.WriteField(f)
	}
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: buf.Bytes(), EndHeaders: true})
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			var status int
			fmt.Sscan(f.PseudoValue("status"), &status)
			return status
		case *http2.RSTStreamFrame:
			return -1
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		}
	}
}

func TestBadRequests(t *testing.T) {
	checkGoroutines(t)
	called := make(chan struct{}, 10)
	e := newEnv(t, echo, func(s *Server) {
		s.Handler = HandlerFunc(func(ctx context.Context, r *Request) {
			called <- struct{}{}
			dialHandler(ctx, r)
		})
	})
	hf := func(kv ...string) []hpack.HeaderField {
		var out []hpack.HeaderField
		for i := 0; i < len(kv); i += 2 {
			out = append(out, hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return out
	}
	auth := e.target.String()
	tests := []struct {
		name   string
		fields []hpack.HeaderField
		want   int
	}{
		{"GET", hf(":method", "GET", ":scheme", "https", ":path", "/", ":authority", auth), 400},
		{"POST", hf(":method", "POST", ":scheme", "https", ":path", "/", ":authority", auth), 400},
		{"CONNECT with a path", hf(":method", "CONNECT", ":scheme", "https", ":path", "/", ":authority", auth), 400},
		{"hostname authority", hf(":method", "CONNECT", ":authority", "reviews:9080"), 400},
		{"no port", hf(":method", "CONNECT", ":authority", "127.0.0.1"), 400},
		{"port 0", hf(":method", "CONNECT", ":authority", "127.0.0.1:0"), 400},
		{"unbracketed ipv6", hf(":method", "CONNECT", ":authority", "::1:80"), 400},
		{"empty authority", hf(":method", "CONNECT", ":authority", ""), 400},
		{"bad forwarded", hf(":method", "CONNECT", ":authority", auth, "forwarded", `for="1.2.3.4:5`), 400},
		{"oversized header", hf(":method", "CONNECT", ":authority", auth, "baggage", strings.Repeat("v", DefaultMaxHeaderBytes)), 431},
		{"too many headers", append(hf(":method", "CONNECT", ":authority", auth), slices.Repeat(hf("x-pad", strings.Repeat("p", 100)), DefaultMaxHeaderBytes/100)...), 431},
		{"ok", hf(":method", "CONNECT", ":authority", auth), 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := e.rawRequest(t, tt.fields); got != tt.want {
				t.Errorf("status %d, want %d", got, tt.want)
			}
		})
	}
	if len(called) != 1 {
		t.Errorf("handler called %d times, want once (for the good request)", len(called))
	}
}

func TestUnknownLocalWorkload(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, func(s *Server) {
		s.LocalIdentity = func(netip.Addr) (spiffeid.ID, bool) { return spiffeid.ID{}, false }
	})
	_, err := e.dialer().Dial(testCtx(t), e.request())
	if err == nil || statusOf(err) != 0 {
		t.Fatalf("dial: %v, want a handshake failure", err)
	}
}

// TestSlowloris checks that clients stalling in the TLS handshake or the
// HTTP/2 preface are cut off after HandshakeTimeout.
func TestSlowloris(t *testing.T) {
	checkGoroutines(t)
	const timeout = 200 * time.Millisecond
	e := newEnv(t, echo, func(s *Server) { s.HandshakeTimeout = timeout })
	expectClosed := func(t *testing.T, c net.Conn) {
		t.Helper()
		start := time.Now()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.Copy(io.Discard, c)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatal("server kept the connection open")
		}
		if el := time.Since(start); el < timeout/2 || el > 3*time.Second {
			t.Errorf("closed after %v, want about %v", el, timeout)
		}
	}
	t.Run("half a ClientHello", func(t *testing.T) {
		// Capture a real ClientHello and send half of it.
		cli, srv := net.Pipe()
		go tls.Client(cli, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}).Handshake()
		hello := make([]byte, 4096)
		n, _ := srv.Read(hello)
		cli.Close()
		srv.Close()
		c, err := net.Dial("tcp", e.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(hello[:n/2])
		expectClosed(t, c)
	})
	t.Run("half the preface", func(t *testing.T) {
		svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
		c, err := e.tlsClient(svid)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, http2.ClientPreface[:10])
		expectClosed(t, c)
	})
	t.Run("half a HEADERS frame", func(t *testing.T) {
		svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
		c, err := e.tlsClient(svid)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, http2.ClientPreface)
		fr := http2.NewFramer(c, c)
		fr.WriteSettings()
		// A frame header announcing 100 bytes of HEADERS, then 10 of them.
		c.Write([]byte{0, 0, 100, byte(http2.FrameHeaders), byte(http2.FlagHeadersEndHeaders), 0, 0, 0, 1})
		c.Write(make([]byte, 10))
		expectClosed(t, c)
	})
	t.Run("preface without settings", func(t *testing.T) {
		svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
		c, err := e.tlsClient(svid)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, http2.ClientPreface)
		expectClosed(t, c)
	})
}

// TestClientAuthentication checks the server's rejection of clients
// without a valid certificate from its trust domain.
func TestClientAuthentication(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	rejected := func(t *testing.T, c *tls.Conn, err error) {
		t.Helper()
		if err == nil {
			// TLS 1.3: the client finishes first; the server's verdict
			// arrives as an alert on the first read.
			defer c.Close()
			io.WriteString(c, http2.ClientPreface)
			_, err = c.Read(make([]byte, 1))
		}
		if err == nil {
			t.Fatal("server accepted the client")
		}
	}
	t.Run("no certificate", func(t *testing.T) {
		c, err := e.tlsClient(nil)
		rejected(t, c, err)
	})
	t.Run("foreign trust domain", func(t *testing.T) {
		evil := newCA(t, "evil.example", nil)
		id := workloadID(t, "evil.example", "shop", "client")
		svid, err := evil.IssueSVID(id, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		c, err := e.tlsClient(svid)
		rejected(t, c, err)
		// The same through the Dialer, with the foreign bundle trusted by
		// the client: still refused by the server.
		d := &Dialer{Certs: newTestCerts(evil, evil, e.ca)}
		defer d.Close()
		r := e.request()
		r.Source = id
		if _, err := d.Dial(testCtx(t), r); err == nil {
			t.Fatal("dial with a foreign identity succeeded")
		}
	})
	t.Run("expired certificate", func(t *testing.T) {
		e.skew.Store(int64(-48 * time.Hour)) // the CA's clock
		svid, err := e.ca.IssueSVID(e.cliID, time.Hour)
		e.skew.Store(0)
		if err != nil {
			t.Fatal(err)
		}
		c, err := e.tlsClient(svid)
		rejected(t, c, err)
	})
	t.Run("valid certificate", func(t *testing.T) {
		svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
		c, err := e.tlsClient(svid)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, http2.ClientPreface)
		if _, err := c.Read(make([]byte, 1)); err != nil {
			t.Fatalf("valid client rejected: %v", err)
		}
	})
}

func TestServerIdentityMismatch(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	r := e.request()
	r.Peers = []spiffeid.ID{workloadID(t, "cluster.local", "shop", "someone-else")}
	_, err := e.dialer().Dial(testCtx(t), r)
	if err == nil {
		t.Fatal("dial accepted a server with the wrong identity")
	}
	r.Peers = append(r.Peers, e.srvID) // one of several allowed
	s, err := e.dialer().Dial(testCtx(t), r)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}

func TestExpiredSourceCertificate(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	e.skew.Store(int64(-48 * time.Hour))
	_, err := e.dialer().Dial(testCtx(t), e.request())
	if !errors.Is(err, ErrExpiredCertificate) {
		t.Fatalf("dial: %v, want ErrExpiredCertificate", err)
	}
}

func TestShutdown(t *testing.T) {
	checkGoroutines(t)
	t.Run("drains", func(t *testing.T) {
		e := newEnv(t, echo, nil)
		d := e.dialer()
		s, err := d.Dial(testCtx(t), e.request())
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- e.server.Shutdown(testCtx(t)) }()
		waitFor(t, "GOAWAY", func() bool {
			e.server.mu.Lock()
			defer e.server.mu.Unlock()
			return len(e.server.listeners) == 0
		})
		// The open stream still works; new dials do not.
		io.WriteString(s, "still here")
		s.CloseWrite()
		got, err := io.ReadAll(s)
		if err != nil || string(got) != "still here" {
			t.Fatalf("read %q, %v", got, err)
		}
		s.Close()
		if err := <-done; err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if _, err := d.Dial(testCtx(t), e.request()); err == nil {
			t.Fatal("dial after Shutdown succeeded")
		}
	})
	t.Run("deadline", func(t *testing.T) {
		e := newEnv(t, echo, nil)
		s, err := e.dialer().Dial(testCtx(t), e.request())
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if err := e.server.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown: %v, want deadline exceeded", err)
		}
		if _, err := io.ReadAll(s); err == nil {
			t.Error("stream survived the forced close")
		}
		e.server.Close() // idempotent
	})
}

func TestStreamDeadline(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	s, err := e.dialer().Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read: %v, want deadline exceeded", err)
	}
	s.SetReadDeadline(time.Time{})
	io.WriteString(s, "x")
	if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
}

func TestDialerClose(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	d := &Dialer{Certs: e.certs}
	s, err := d.Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if _, err := s.Read(make([]byte, 1)); err == nil {
		t.Error("stream survived Dialer.Close")
	}
	if _, err := d.Dial(testCtx(t), e.request()); !errors.Is(err, ErrDialerClosed) {
		t.Errorf("dial after Close: %v", err)
	}
	d.Close()
}

// TestServerStreamLimit checks that a client learns a lower server limit:
// refused streams are retried on further connections.
func TestServerStreamLimit(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, func(s *Server) { s.MaxConcurrentStreams = 2 })
	d := e.dialer()
	const n = 10
	streams := make([]*Stream, n)
	errs := make(chan error, n)
	for i := range n { // concurrently: the first ones race the server's SETTINGS
		go func() {
			var err error
			streams[i], err = d.Dial(testCtx(t), e.request())
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for i, s := range streams {
		msg := fmt.Sprint(i)
		io.WriteString(s, msg)
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(s, buf); err != nil || string(buf) != msg {
			t.Fatalf("stream %d: %q, %v", i, buf, err)
		}
		s.Close()
	}
	if got := d.Conns(); got < n/2 {
		t.Errorf("%d connections for %d streams, at most 2 each", got, n)
	}
}

func TestIPv6(t *testing.T) {
	checkGoroutines(t)
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	up, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		c, err := up.Accept()
		if err == nil {
			echo(c)
			c.Close()
		}
	}()
	defer up.Close()
	e := newEnv(t, echo, nil)
	authority := make(chan string, 1)
	srv := &Server{
		Certs: e.certs,
		LocalIdentity: func(dst netip.Addr) (spiffeid.ID, bool) {
			return e.srvID, dst == netip.IPv6Loopback()
		},
		Handler: HandlerFunc(func(ctx context.Context, r *Request) {
			authority <- r.Target.String()
			dialHandler(ctx, r)
		}),
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	defer func() { srv.Close(); <-done }()
	r := e.request()
	r.Addr = ln.Addr().(*net.TCPAddr).AddrPort()
	r.Target = up.Addr().(*net.TCPAddr).AddrPort()
	r.ForwardedFor = netip.MustParseAddrPort("[fd00::7]:4567")
	s, err := e.dialer().Dial(testCtx(t), r)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := <-authority; got != r.Target.String() || !strings.HasPrefix(got, "[::1]:") {
		t.Errorf("authority %q, want %s", got, r.Target)
	}
	io.WriteString(s, "six")
	s.CloseWrite()
	if got, err := io.ReadAll(s); err != nil || string(got) != "six" {
		t.Fatalf("echo %q, %v", got, err)
	}
}

// TestRapidReset opens and resets streams as fast as possible: handlers of
// reset streams stay bounded per connection.
func TestRapidReset(t *testing.T) {
	checkGoroutines(t)
	const limit = 5
	var running, peak atomic.Int32
	e := newEnv(t, echo, func(s *Server) {
		s.MaxConcurrentStreams = limit
		s.Handler = HandlerFunc(func(ctx context.Context, r *Request) {
			n := running.Add(1)
			defer running.Add(-1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			<-ctx.Done()
			time.Sleep(20 * time.Millisecond) // slow cleanup
		})
	})
	svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
	c, err := e.tlsClient(svid)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, http2.ClientPreface)
	fr := http2.NewFramer(c, c)
	fr.WriteSettings()
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: e.target.String()})
	acked := make(chan struct{})
	go func() { // the server has read everything when it answers our PING
		rf := http2.NewFramer(io.Discard, c)
		for {
			f, err := rf.ReadFrame()
			if err != nil {
				return
			}
			if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
				close(acked)
			}
		}
	}()
	for id := uint32(1); id < 2000; id += 2 {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: buf.Bytes(), EndHeaders: true})
		fr.WriteRSTStream(id, http2.ErrCodeCancel)
	}
	fr.WritePing(false, [8]byte{1})
	<-acked
	waitFor(t, "handlers to finish", func() bool { return peak.Load() > 0 && running.Load() == 0 })
	if p := peak.Load(); p == 0 || p > 2*limit {
		t.Errorf("%d handlers ran at once, want at most %d", p, 2*limit)
	}
}

// TestKeepAlive cuts the network silently under an open stream: the PINGs
// go unanswered and both sides close the connection.
func TestKeepAlive(t *testing.T) {
	checkGoroutines(t)
	const ka = 200 * time.Millisecond // generous: a loaded, race-checked machine is slow to answer
	e := newEnv(t, echo, func(s *Server) { s.KeepAlive = ka })
	var frozen atomic.Bool
	proxy := listenBlackhole(t, e.addr, &frozen)
	d := &Dialer{Certs: e.certs, KeepAlive: ka}
	defer d.Close()
	r := e.request()
	r.Addr = proxy
	s, err := d.Dial(testCtx(t), r)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	time.Sleep(3 * ka) // pings answered: still up
	io.WriteString(s, "x")
	if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
		t.Fatalf("before the cut: %v", err)
	}
	frozen.Store(true)
	waitFor(t, "keep-alive close", func() bool { return d.Conns() == 0 })
	if _, err := s.Read(make([]byte, 1)); err == nil {
		t.Error("stream survived a dead connection")
	}
	waitFor(t, "server side close", func() bool {
		e.server.mu.Lock()
		defer e.server.mu.Unlock()
		return len(e.server.conns) == 0
	})
}

// listenBlackhole forwards TCP to dst until frozen, then drops everything
// silently.
func listenBlackhole(t *testing.T, dst netip.AddrPort, frozen *atomic.Bool) netip.AddrPort {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	pump := func(dst, src net.Conn) {
		defer wg.Done()
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if err != nil {
				dst.Close()
				return
			}
			if !frozen.Load() {
				dst.Write(buf[:n])
			}
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", dst.String())
			if err != nil {
				c.Close()
				continue
			}
			wg.Add(2)
			go pump(u, c)
			go pump(c, u)
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// TestFlowControl checks that flow control holds a writer back while the
// peer does not read, and lets it go on as the peer reads. The handler
// accepts and does not read: a Write into one stream stops after exactly
// the stream window and stays blocked; it resumes by exactly what the
// handler reads and completes once the handler reads everything. Writes
// into more streams than the connection window holds stop after exactly
// the connection window.
func TestFlowControl(t *testing.T) {
	t.Run("stream", func(t *testing.T) {
		checkGoroutines(t)
		h := newHeldStreams(t)
		e := newEnv(t, echo, func(s *Server) { s.Handler = h })
		cs, err := e.dialer().Dial(testCtx(t), e.request())
		if err != nil {
			t.Fatal(err)
		}
		defer cs.Close()
		ss := h.next(t)
		data := make([]byte, 2*streamWindow+12345)
		rand.Read(data)
		wrote := make(chan error, 1)
		go func() { wrote <- writeAndClose(cs, data) }()

		// The writer stops when the handler holds a full window.
		blocked := func(when string, received int) {
			t.Helper()
			waitFor(t, when+": the handler's window to fill", func() bool { return bufferedOn(ss) >= streamWindow || len(wrote) > 0 })
			select {
			case err := <-wrote:
				t.Fatalf("%s: Write of %d bytes returned (%v) with %d bytes expected to have reached the peer: it did not block on flow control",
					when, len(data), err, received)
			default:
			}
			if n := bufferedOn(ss); n != streamWindow {
				t.Fatalf("%s: the handler holds %d unread bytes, more than its window (%d)", when, n, streamWindow)
			}
			if w, _ := sendWindows(cs); w != 0 {
				t.Fatalf("%s: the client's stream send window is %d, want 0", when, w)
			}
		}
		blocked("at first", streamWindow)

		// Reading a quarter of the window lets exactly that much more in,
		// and the writer blocks again.
		first := make([]byte, streamWindow/4)
		if _, err := io.ReadFull(ss, first); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(first, data[:len(first)]) {
			t.Fatal("handler read different bytes")
		}
		blocked("after reading a quarter", streamWindow+len(first))

		// Reading everything lets the Write complete.
		got := make(chan [32]byte, 1)
		go func() {
			hash := sha256.New()
			io.Copy(hash, ss)
			got <- [32]byte(hash.Sum(nil))
		}()
		select {
		case err := <-wrote:
			if err != nil {
				t.Fatalf("write: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the Write did not complete once the handler read")
		}
		select {
		case sum := <-got:
			if sum != sha256.Sum256(data[len(first):]) {
				t.Fatal("handler received different bytes")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the handler did not read to the end")
		}
	})

	t.Run("connection", func(t *testing.T) {
		checkGoroutines(t)
		h := newHeldStreams(t)
		e := newEnv(t, echo, func(s *Server) { s.Handler = h })
		d := e.dialer()
		const n = connWindow/streamWindow + 1 // their stream windows hold more than the connection's
		var cli, srv []*Stream
		for range n {
			cs, err := d.Dial(testCtx(t), e.request())
			if err != nil {
				t.Fatal(err)
			}
			defer cs.Close()
			if len(cli) > 0 && cs.s.c != cli[0].s.c {
				t.Fatal("streams on different connections")
			}
			cli = append(cli, cs)
			srv = append(srv, h.next(t))
		}
		data := make([][]byte, n)
		wrote := make(chan error, n)
		for i, cs := range cli {
			data[i] = make([]byte, streamWindow+12345)
			rand.Read(data[i])
			go func() { wrote <- writeAndClose(cs, data[i]) }()
		}
		total := func() int {
			sum := 0
			for _, ss := range srv {
				sum += bufferedOn(ss)
			}
			return sum
		}
		waitFor(t, "the connection window to fill", func() bool { return total() >= connWindow || len(wrote) > 0 })
		select {
		case err := <-wrote:
			t.Fatalf("a Write returned (%v) while the connection window was exhausted (%d bytes reached the handlers)", err, total())
		default:
		}
		if got := total(); got != connWindow {
			t.Fatalf("the handlers hold %d unread bytes, more than the connection window (%d)", got, connWindow)
		}
		if _, w := sendWindows(cli[0]); w != 0 {
			t.Fatalf("the client's connection send window is %d, want 0", w)
		}

		// Reading lets every Write complete.
		got := make(chan bool, n)
		for i, ss := range srv {
			go func() {
				hash := sha256.New()
				io.Copy(hash, ss)
				got <- [32]byte(hash.Sum(nil)) == sha256.Sum256(data[i])
			}()
		}
		for range n {
			select {
			case err := <-wrote:
				if err != nil {
					t.Fatalf("write: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the Writes did not complete once the handlers read")
			}
		}
		for range n {
			select {
			case ok := <-got:
				if !ok {
					t.Fatal("a handler received different bytes")
				}
			case <-time.After(10 * time.Second):
				t.Fatal("a handler did not read to the end")
			}
		}
	})
}

// heldStreams is a Handler that accepts every request and hands its stream
// to the test, which reads it (or not); the handler returns when the test
// ends or the stream's context does.
type heldStreams struct {
	streams chan *Stream
	done    chan struct{}
}

func newHeldStreams(t *testing.T) *heldStreams {
	h := &heldStreams{streams: make(chan *Stream), done: make(chan struct{})}
	t.Cleanup(func() { close(h.done) })
	return h
}

func (h *heldStreams) ServeHBONE(ctx context.Context, r *Request) {
	st, err := r.Accept()
	if err != nil {
		return
	}
	select {
	case h.streams <- st:
	case <-ctx.Done():
		return
	case <-h.done:
		return
	}
	select {
	case <-ctx.Done():
	case <-h.done:
	}
}

// next returns the next accepted stream.
func (h *heldStreams) next(t *testing.T) *Stream {
	t.Helper()
	select {
	case st := <-h.streams:
		return st
	case <-time.After(5 * time.Second):
		t.Fatal("no stream reached the handler")
		return nil
	}
}

// bufferedOn reports the bytes a stream received and not yet read.
func bufferedOn(st *Stream) int {
	st.s.c.mu.Lock()
	defer st.s.c.mu.Unlock()
	return st.s.recv.Len()
}

// sendWindows reports what a stream and its connection may still send.
func sendWindows(st *Stream) (stream, conn int64) {
	st.s.c.mu.Lock()
	defer st.s.c.mu.Unlock()
	return st.s.sendWindow, st.s.c.sendWindow
}

// writeAndClose writes p and half-closes.
func writeAndClose(st *Stream, p []byte) error {
	if _, err := st.Write(p); err != nil {
		return err
	}
	return st.CloseWrite()
}

// TestDialCanceled cancels a Dial while the server's handler is still
// connecting upstream: the handler's context ends too.
func TestDialCanceled(t *testing.T) {
	checkGoroutines(t)
	handlerDone := make(chan error, 1)
	e := newEnv(t, echo, func(s *Server) {
		s.Handler = HandlerFunc(func(ctx context.Context, r *Request) {
			<-ctx.Done() // a slow upstream connect
			handlerDone <- ctx.Err()
		})
	})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := e.dialer().Dial(ctx, e.request())
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial: %v, want deadline exceeded", err)
	}
	select {
	case err := <-handlerDone:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("handler context: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler context not canceled by the client's reset")
	}
}

// TestClientGoAway: a client's GOAWAY (it will accept no pushed streams)
// does not cut its own open streams.
func TestClientGoAway(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
	c, err := e.tlsClient(svid)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, http2.ClientPreface)
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.WriteSettings()
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: e.target.String()})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: buf.Bytes(), EndHeaders: true})
	var echoed []byte
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("read: %v (echoed %q)", err, echoed)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if st := f.PseudoValue("status"); st != "200" {
				t.Fatalf("status %s", st)
			}
			fr.WriteGoAway(0, http2.ErrCodeNo, nil)
			fr.WriteData(1, true, []byte("after goaway"))
		case *http2.DataFrame:
			echoed = append(echoed, f.Data()...)
			if f.StreamEnded() {
				if string(echoed) != "after goaway" {
					t.Fatalf("echoed %q", echoed)
				}
				return
			}
		case *http2.RSTStreamFrame:
			t.Fatalf("stream reset: %v", f.ErrCode)
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		}
	}
}

// TestMultiplexedTransfers runs bulk echoes on many streams of one
// connection at once: the connection window is shared and contended.
func TestMultiplexedTransfers(t *testing.T) {
	checkGoroutines(t)
	const streams, size = 24, 1<<20 + 4321
	e := newEnv(t, echo, nil)
	d := e.dialer()
	errs := make(chan error, streams)
	for i := range streams {
		go func() {
			data := make([]byte, size)
			rand.Read(data)
			s, err := d.Dial(testCtx(t), e.request())
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			werr := make(chan error, 1)
			go func() {
				_, err := s.Write(data)
				if err == nil {
					err = s.CloseWrite()
				}
				werr <- err
			}()
			h := sha256.New()
			n, err := io.Copy(h, s)
			if err == nil {
				err = <-werr
			}
			if err == nil && (n != size || [32]byte(h.Sum(nil)) != sha256.Sum256(data)) {
				err = fmt.Errorf("stream %d: echoed %d bytes, hash mismatch or short", i, n)
			}
			errs <- err
		}()
	}
	for range streams {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := d.Conns(); n != 1 {
		t.Errorf("%d connections, want 1", n)
	}
}

func TestStreamClosedErrors(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	s, err := e.dialer().Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	blocked := make(chan error, 1)
	go func() {
		_, err := s.Read(make([]byte, 1))
		blocked <- err
	}()
	time.Sleep(20 * time.Millisecond)
	s.Close()
	if err := <-blocked; !errors.Is(err, net.ErrClosed) {
		t.Errorf("pending Read after Close: %v, want net.ErrClosed", err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after Close: %v, want net.ErrClosed", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestTLSParameters: only TLS 1.3 with ALPN h2 is served.
func TestTLSParameters(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
	for name, edit := range map[string]func(*tls.Config){
		"TLS 1.2":       func(c *tls.Config) { c.MinVersion, c.MaxVersion = tls.VersionTLS12, tls.VersionTLS12 },
		"ALPN http/1.1": func(c *tls.Config) { c.NextProtos = []string{"http/1.1"} },
		"no ALPN":       func(c *tls.Config) { c.NextProtos = nil },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := clientTLSConfig(svid, e.certs, []spiffeid.ID{e.srvID})
			edit(cfg)
			nc, err := net.Dial("tcp", e.addr.String())
			if err != nil {
				t.Fatal(err)
			}
			c := tls.Client(nc, cfg)
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if err := c.Handshake(); err != nil {
				return // refused in the handshake
			}
			io.WriteString(c, http2.ClientPreface)
			http2.NewFramer(c, c).WriteSettings()
			if _, err := io.Copy(io.Discard, c); err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Fatal("server served the connection")
				}
			}
		})
	}
}

// TestResetStreamsReturnWindow resets streams while large DATA frames for
// them are arriving: the bytes dropped must go back to the connection
// window, or the connection would stall once they add up to it.
func TestResetStreamsReturnWindow(t *testing.T) {
	checkGoroutines(t)
	pod := func(c net.Conn) {
		var one [1]byte
		if _, err := io.ReadFull(c, one[:]); err != nil {
			return
		}
		if one[0] == 'e' { // the last stream: echo
			c.Write(one[:])
			echo(c)
		}
		// Otherwise read a while, then close while more arrives: the
		// server resets the stream.
		io.CopyN(io.Discard, c, 8<<20)
	}
	e := newEnv(t, pod, nil)
	d := e.dialer()
	data := bytes.Repeat([]byte{'x'}, 64<<20)
	for range 24 { // each stream is reset with data in flight: more than a connection window in all
		s, err := d.Dial(testCtx(t), e.request())
		if err != nil {
			t.Fatal(err)
		}
		s.SetDeadline(time.Now().Add(10 * time.Second)) // a stalled window fails the test
		for rest := data; len(rest) > 0; rest = rest[min(len(rest), 200<<10):] {
			if _, err := s.Write(rest[:min(len(rest), 200<<10)]); err != nil {
				break // reset by the server
			}
		}
		s.Close()
	}
	s, err := d.Dial(testCtx(t), e.request())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(10 * time.Second))
	msg := append([]byte{'e'}, data[:1<<20]...)
	go s.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(s, got); err != nil {
		t.Fatalf("read after the resets: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("echo differs")
	}
	if n := d.Conns(); n != 1 {
		t.Errorf("%d connections, want 1", n)
	}
}
