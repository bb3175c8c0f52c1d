package waypoint

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/durationpb"
)

// h1Env is a waypoint with a real backend behind "/" (it echoes the path
// and body, and obeys ?flush, ?trailer, ?nocl, ?status=N, ?block) and a
// direct response on /direct, which never reads the request body. A
// ?block request is sent on blocked and waits for its context's end or
// for release to be closed.
func h1Env(t *testing.T, cfg func(*Config), hcm func(*hcmv3.HttpConnectionManager)) (*env, chan *http.Request) {
	e, blocked, _ := h1EnvRelease(t, cfg, hcm)
	return e, blocked
}

func h1EnvRelease(t *testing.T, cfg func(*Config), hcm func(*hcmv3.HttpConnectionManager)) (*env, chan *http.Request, chan struct{}) {
	t.Helper()
	e := newEnv(t, cfg)
	blocked := make(chan *http.Request, 4)
	release := make(chan struct{})
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		q := r.URL.Query()
		if q.Has("block") {
			blocked <- r
			select {
			case <-r.Context().Done():
				return
			case <-release:
			}
		}
		if q.Has("trailer") {
			w.Header().Set("Trailer", "X-Sum")
		}
		out := r.Method + " " + r.URL.Path + " " + string(body)
		if !q.Has("nocl") && !q.Has("flush") && !q.Has("trailer") {
			w.Header().Set("Content-Length", strconv.Itoa(len(out)))
		}
		if s := q.Get("status"); s != "" {
			n, _ := strconv.Atoi(s)
			w.WriteHeader(n)
		}
		if q.Has("flush") {
			io.WriteString(w, out[:len(out)/2])
			w.(http.Flusher).Flush()
			io.WriteString(w, out[len(out)/2:])
		} else {
			io.WriteString(w, out)
		}
		if q.Has("trailer") {
			w.Header().Set("X-Sum", "42")
		}
	})
	cl := clusterName(svc)
	direct := &routev3.Route{Name: "direct", Match: prefixMatch("/direct"), Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{
		Status: 200, Body: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: "direct"}}}}}
	if hcm == nil {
		hcm = func(*hcmv3.HttpConnectionManager) {}
	}
	e.apply(res(listener(httpFCWith(testVIP, 80, svc, hcm))), res(routeConfig(chainName(80, svc), direct, toCluster(prefixMatch("/"), cl))),
		res(edsCluster(cl)), res(cla(cl, ep{addr: b.addr})))
	return e, blocked, release
}

// rawConn is one tunnelled connection for hand-written requests.
type rawConn struct {
	t  *testing.T
	s  net.Conn
	br *bufio.Reader
}

func (e *env) raw(t *testing.T) *rawConn {
	s := e.rawStream(target)
	s.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawConn{t: t, s: s, br: bufio.NewReader(s)}
}

func (c *rawConn) send(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.s, s); err != nil {
		c.t.Fatal(err)
	}
}

// read reads one response (to a request with method) and its body.
func (c *rawConn) read(method string) (*http.Response, string) {
	c.t.Helper()
	resp, err := http.ReadResponse(c.br, &http.Request{Method: method})
	if err != nil {
		c.t.Fatalf("reading a response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("reading a body: %v", err)
	}
	return resp, string(b)
}

// closed reports whether the waypoint ended the connection (EOF) with
// nothing more to read.
func (c *rawConn) closed() bool {
	_, err := c.br.ReadByte()
	return err != nil && !isTimeout(err)
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestH1ServerRequests: net/http's server rules, kept by the waypoint's
// own loop, each on its own connection.
func TestH1ServerRequests(t *testing.T) {
	e, _ := h1Env(t, nil, nil)
	for _, tc := range []struct {
		name, req string
		code      int
		body      string // a prefix of the body, when set
		close     bool   // the connection ends after the answer
	}{
		{"get", "GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 200, "GET /a ", false},
		{"post", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 200, "POST /a abc", false},
		{"chunked request", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 200, "POST /a abc", true},
		{"two hosts", "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "", true},
		{"no host", "GET / HTTP/1.1\r\n\r\n", 400, "", true},
		{"no host, absolute form", "GET http://x/ HTTP/1.1\r\n\r\n", 400, "", true},
		{"bad host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "", true},
		{"bad host, absolute form", "GET http://x/a HTTP/1.1\r\nHost: bad host\r\n\r\n", 400, "", true},
		{"1.0 expecting 100-continue", "POST /a HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc", 200, "POST /a abc", true},
		{"blank line after a POST", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\r\n", 200, "POST /a abc", false},
		{"no host on 1.0", "GET /a HTTP/1.0\r\n\r\n", 200, "GET /a ", true},
		{"unknown transfer-encoding", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "", true},
		{"bad version", "GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "", true},
		{"bad request line", "GET\r\n\r\n", 400, "", true},
		{"bad content-length", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "", true},
		{"bad header value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400, "", true},
		{"expectation", "POST / HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\n", 417, "", true},
		{"connection close", "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200, "GET /a ", true},
		{"1.0 keep-alive", "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 200, "GET /a ", false},
		{"options *", "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404, "", false},
		{"chunked answer", "GET /a?flush HTTP/1.1\r\nHost: x\r\n\r\n", 200, "GET /a ", false},
		{"1.0, close-delimited answer", "GET /a?flush HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 200, "GET /a ", true},
		{"unread small body", "POST /direct HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 200, "direct", false},
		{"unread big body", "POST /direct HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\nhello", 200, "direct", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := e.raw(t)
			c.send(tc.req)
			method, _, _ := strings.Cut(tc.req, " ")
			resp, body := c.read(method)
			if resp.StatusCode != tc.code || !strings.HasPrefix(body, tc.body) {
				t.Fatalf("%d %q, want %d %q", resp.StatusCode, body, tc.code, tc.body)
			}
			if resp.StatusCode < 400 && resp.Header.Get("Date") == "" {
				t.Error("no Date")
			}
			if tc.name == "chunked answer" && (len(resp.TransferEncoding) == 0 || resp.ContentLength != -1) {
				t.Errorf("not chunked: %v %d", resp.TransferEncoding, resp.ContentLength)
			}
			if tc.name == "1.0 keep-alive" && resp.Header.Get("Connection") != "keep-alive" {
				t.Errorf("Connection %q, want keep-alive", resp.Header.Get("Connection"))
			}
			if !tc.close {
				// The connection carries another request.
				c.send("GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
				if resp, body := c.read("GET"); resp.StatusCode != 200 || body != "GET /next " {
					t.Fatalf("next: %d %q", resp.StatusCode, body)
				}
				return
			}
			if !c.closed() {
				t.Fatal("the connection stayed open")
			}
		})
	}
}

// TestH1ServerResponses: framing of answers: HEAD and 204/304 without a
// body, trailers, pipelined requests in order.
func TestH1ServerResponses(t *testing.T) {
	e, _ := h1Env(t, nil, nil)
	c := e.raw(t)
	c.send("HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /s?status=204 HTTP/1.1\r\nHost: x\r\n\r\n" +
		"GET /s?status=304 HTTP/1.1\r\nHost: x\r\n\r\nGET /t?trailer HTTP/1.1\r\nHost: x\r\n\r\n" +
		"POST /p1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nabPOST /p2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\ncd")
	if resp, body := c.read("HEAD"); resp.StatusCode != 200 || body != "" || resp.ContentLength != int64(len("HEAD /h ")) {
		t.Errorf("HEAD: %d %q cl %d", resp.StatusCode, body, resp.ContentLength)
	}
	for _, code := range []int{204, 304} {
		if resp, body := c.read("GET"); resp.StatusCode != code || body != "" {
			t.Errorf("%d: %d %q", code, resp.StatusCode, body)
		}
	}
	resp, body := c.read("GET")
	if body != "GET /t " || resp.Trailer.Get("X-Sum") != "42" {
		t.Errorf("trailer: %q %v", body, resp.Trailer)
	}
	for _, want := range []string{"POST /p1 ab", "POST /p2 cd"} {
		if _, body := c.read("POST"); body != want {
			t.Errorf("pipelined: %q, want %q", body, want)
		}
	}
}

// TestH1ServerExpectContinue: 100 Continue goes out when the request's
// body is first read, before the client sent it; the answer follows.
func TestH1ServerExpectContinue(t *testing.T) {
	e, _ := h1Env(t, nil, nil)
	c := e.raw(t)
	c.send("POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
	line, err := c.br.ReadString('\n')
	if err != nil || line != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("%q %v, want 100 Continue", line, err)
	}
	if l, _ := c.br.ReadString('\n'); l != "\r\n" {
		t.Fatalf("after 100 Continue: %q", l)
	}
	c.send("xyz")
	if resp, body := c.read("POST"); resp.StatusCode != 200 || body != "POST /e xyz" {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
	// The body never asked for: the answer without 100 Continue ends the
	// connection.
	c = e.raw(t)
	c.send("POST /direct HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
	if resp, _ := c.read("POST"); resp.StatusCode != 200 || !resp.Close {
		t.Fatalf("%d close=%v", resp.StatusCode, resp.Close)
	}
}

// TestH1ServerTimeouts: ReadHeaderTimeout ends a connection whose head
// does not come, IdleTimeout one between requests, request_timeout one
// whose body does not come (408 from net/http's parser is not sent: the
// connection ends).
func TestH1ServerTimeouts(t *testing.T) {
	e, _ := h1Env(t, func(c *Config) { c.ReadHeaderTimeout = 300 * time.Millisecond }, func(h *hcmv3.HttpConnectionManager) {
		h.CommonHttpProtocolOptions = &corev3.HttpProtocolOptions{IdleTimeout: durationpb.New(300 * time.Millisecond)}
		h.RequestTimeout = durationpb.New(600 * time.Millisecond)
	})
	for _, tc := range []struct{ name, req string }{
		{"head", "GET / HTTP/1.1\r\nHost: x\r\n"},
		{"idle", "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"},
		{"body", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := e.raw(t)
			start := time.Now()
			c.send(tc.req)
			if tc.name == "idle" {
				c.read("GET")
			}
			if tc.name == "body" {
				resp, err := http.ReadResponse(c.br, nil)
				if err == nil {
					_, err = io.ReadAll(resp.Body)
				}
				if err == nil && resp.StatusCode == 200 {
					t.Fatal("answered 200 to a body cut short")
				}
			} else if !c.closed() {
				t.Fatal("still open")
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("closed after %v", d)
			}
		})
	}
}

// TestH1ServerClientGone: a client that resets its tunnel ends its
// request's context (the upstream request is canceled).
func TestH1ServerClientGone(t *testing.T) {
	e, blocked := h1Env(t, nil, nil)
	c := e.raw(t)
	c.send("GET /b?block HTTP/1.1\r\nHost: x\r\n\r\n")
	var r *http.Request
	select {
	case r = <-blocked:
	case <-time.After(5 * time.Second):
		t.Fatal("the request did not reach the backend")
	}
	c.s.Close() // reset
	select {
	case <-r.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream request outlived its client")
	}
}

// TestH1ServerClientFIN: a client's FIN, read once its request's body is
// consumed and with nothing pipelined behind it, ends the request's
// context (net/http's background read): the upstream request is canceled
// and no answer is made up. Pipelined requests are not canceled.
func TestH1ServerClientFIN(t *testing.T) {
	e, blocked, release := h1EnvRelease(t, nil, nil)
	for _, req := range []string{
		"GET /b?block HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /b?block HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
		"POST /b?block HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
	} {
		c := e.raw(t)
		c.send(req)
		var r *http.Request
		select {
		case r = <-blocked:
		case <-time.After(5 * time.Second):
			t.Fatalf("%q: the request did not reach the backend", req)
		}
		c.s.(interface{ CloseWrite() error }).CloseWrite()
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("%q: the upstream request outlived its client's FIN", req)
		}
		if b, err := io.ReadAll(c.br); len(b) != 0 {
			t.Errorf("%q: answered %q (%v) to a client gone", req, b, err)
		}
	}
	eventually(t, 5*time.Second, func() bool {
		return strings.Count(e.logs.String(), `"response_flags":"DC"`) == 3
	}, "the three requests not logged DC")

	// Pipelined: the FIN comes after the second request; the first is
	// answered, then the second (a direct response).
	c := e.raw(t)
	c.send("GET /b?block HTTP/1.1\r\nHost: x\r\n\r\nGET /direct HTTP/1.1\r\nHost: x\r\n\r\n")
	c.s.(interface{ CloseWrite() error }).CloseWrite()
	select {
	case <-blocked:
	case <-time.After(5 * time.Second):
		t.Fatal("the request did not reach the backend")
	}
	close(release)
	if resp, body := c.read("GET"); resp.StatusCode != 200 || body != "GET /b " {
		t.Fatalf("pipelined first: %d %q", resp.StatusCode, body)
	}
	if resp, body := c.read("GET"); resp.StatusCode != 200 || body != "direct" {
		t.Fatalf("pipelined second: %d %q", resp.StatusCode, body)
	}
}

// TestH1ServerBodyErrors: a request body the client got wrong is the
// client's error, not an upstream reset: 400 (DPE) for a malformed chunk,
// 413 over MaxRequestBodyBytes; the connection ends after the answer.
func TestH1ServerBodyErrors(t *testing.T) {
	e, _ := h1Env(t, func(c *Config) { c.MaxRequestBodyBytes = 1 << 10 }, nil)
	chunk := "400\r\n" + strings.Repeat("x", 1<<10) + "\r\n"
	for _, tc := range []struct {
		name, body string
		code       int
		details    string
	}{
		{"chunk extension over 4 KiB", "3;" + strings.Repeat("e", 5000) + "\r\nabc\r\n0\r\n\r\n", 400, "downstream_body_error"},
		{"bad chunk size", "zz\r\nabc\r\n0\r\n\r\n", 400, "downstream_body_error"},
		{"chunked body over the limit", strings.Repeat(chunk, 8) + "0\r\n\r\n", 413, "request_payload_too_large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := e.raw(t)
			c.send("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + tc.body)
			resp, _ := c.read("POST")
			if resp.StatusCode != tc.code || !resp.Close {
				t.Fatalf("%d close=%v, want %d and Connection: close", resp.StatusCode, resp.Close, tc.code)
			}
			if !c.closed() {
				t.Fatal("the connection stayed open")
			}
			eventually(t, 5*time.Second, func() bool {
				return strings.Contains(e.logs.String(), `"response_code_details":"`+tc.details+`"`)
			}, "not logged "+tc.details)
		})
	}
	logs := e.logs.String()
	if n := strings.Count(logs, `"response_flags":"DPE"`); n != 2 {
		t.Errorf("%d requests flagged DPE, want 2:\n%s", n, logs)
	}
	if strings.Contains(logs, `"response_flags":"UR"`) || strings.Contains(logs, "upstream_reset") {
		t.Errorf("a client's body error counted as an upstream reset:\n%s", logs)
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_flags="UR"`); n != 0 {
		t.Errorf("%v requests counted UR", n)
	}
}

// TestH1ServerDrain: on drain, an idle HTTP/1.1 connection is closed at
// once, and the request in flight is answered with Connection: close.
func TestH1ServerDrain(t *testing.T) {
	e, blocked, release := h1EnvRelease(t, nil, nil)
	idle := e.raw(t)
	idle.send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
	idle.read("GET")
	busy := e.raw(t)
	busy.send("GET /slow?block HTTP/1.1\r\nHost: x\r\n\r\n")
	var r *http.Request
	select {
	case r = <-blocked:
	case <-time.After(5 * time.Second):
		t.Fatal("the request did not reach the backend")
	}
	start := time.Now()
	e.cancel()
	if !idle.closed() {
		t.Fatal("idle connection not closed")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("idle connection closed after %v", d)
	}
	if r.Context().Err() != nil {
		t.Fatal("the request in flight was canceled by the drain")
	}
	close(release)
	resp, body := busy.read("GET")
	if resp.StatusCode != 200 || body != "GET /slow " || !resp.Close {
		t.Errorf("the answer in flight while draining: %d %q close=%v; want 200 with Connection: close", resp.StatusCode, body, resp.Close)
	}
	if !busy.closed() {
		t.Error("busy connection stayed open")
	}
}

// FuzzH1Server: arbitrary bytes on a tunnelled connection: no panic, no
// hang, and the answers parse as HTTP/1.x responses up to the end.
func FuzzH1Server(f *testing.F) {
	for _, s := range []string{
		"GET /direct HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /direct HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /direct HTTP/1.0\r\n\r\n",
		"POST /direct HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX: y\r\n\r\n",
		"POST /direct HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
		"POST /direct HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
		"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET /direct HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"\x16\x03\x01\x00",
	} {
		f.Add([]byte(s))
	}
	e := newEnv(f, func(c *Config) { c.ReadHeaderTimeout = 2 * time.Second })
	direct := &routev3.Route{Name: "direct", Match: prefixMatch("/"), Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{
		Status: 200, Body: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: "direct"}}}}}
	e.apply(res(listener(httpFC(testVIP, 80, svc))), res(routeConfig(chainName(80, svc), direct)))
	snap := e.p.snap.Load()
	tgt := netip.MustParseAddrPort(target)
	hc := snap.chainFor(tgt).http
	ln := listen(f)
	defer ln.Close()
	f.Fuzz(func(t *testing.T, in []byte) {
		cli, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		srv, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			e.p.serveConn(t.Context(), srv, hc, &downstream{target: tgt})
		}()
		cli.SetDeadline(time.Now().Add(10 * time.Second))
		go func() {
			cli.Write(in)
			cli.(*net.TCPConn).CloseWrite()
		}()
		out, err := io.ReadAll(cli)
		if err != nil && !isReset(err) {
			t.Fatalf("reading the answers: %v", err)
		}
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the server loop did not end")
		}
		if bytes.HasPrefix(in, []byte("PRI ")) || bytes.Contains(in, []byte("HEAD")) {
			return // HTTP/2, or answers to HEAD: not parsed here
		}
		br := bufio.NewReader(bytes.NewReader(out))
		for n := 0; ; n++ {
			if _, err := br.Peek(1); err == io.EOF {
				return
			}
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("answer %d does not parse: %v\n%q", n, err, out)
			}
			if _, err := io.ReadAll(resp.Body); err != nil {
				t.Fatalf("answer %d's body: %v\n%q", n, err, out)
			}
		}
	})
}

func isReset(err error) bool {
	return strings.Contains(err.Error(), "connection reset")
}

// TestH1ServerRequestTooLarge: a body over MaxRequestBodyBytes, found
// where forward reads it (MaxBytesReader's error), reaches the writer:
// Connection: close, and the connection is drained, not kept
// (bodyLimitHit), as net/http's own writer has it.
func TestH1ServerRequestTooLarge(t *testing.T) {
	var out bytes.Buffer
	h := &h1conn{p: &Proxy{}, bw: bufio.NewWriter(&out)}
	h.keepAlive.Store(true)
	req, err := http.ReadRequest(bufio.NewReader(strings.NewReader("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")))
	if err != nil {
		t.Fatal(err)
	}
	w := &h1resp{h: h, req: req, header: make(http.Header), cl: -1, is11: true}
	bodyError(&respWriter{ResponseWriter: w}, &record{}, &http.MaxBytesError{Limit: 4})
	if reuse := w.finish(); reuse || !w.bodyLimitHit {
		t.Fatalf("reuse=%v bodyLimitHit=%v, want the connection drained and ended", reuse, w.bodyLimitHit)
	}
	resp, err := http.ReadResponse(bufio.NewReader(&out), nil)
	if err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge || !resp.Close {
		t.Fatalf("%v %v, want 413 with Connection: close", resp, err)
	}
}
