package hbone

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The tests here check the wire protocol against another HTTP/2
// implementation (net/http's client and server), not just against
// ourselves.

func TestInteropNetHTTPClient(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	svid, _ := e.certs.GetX509SVID(context.Background(), e.cliID)
	tr := &http.Transport{
		DialTLSContext: func(context.Context, string, string) (net.Conn, error) {
			return e.tlsClient(svid)
		},
		Protocols: new(http.Protocols),
	}
	tr.Protocols.SetHTTP2(true)
	defer tr.CloseIdleConnections()
	pr, pw := io.Pipe()
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Scheme: "https", Host: e.target.String()},
		Host:   e.target.String(),
		Header: http.Header{"Forwarded": {`for="10.1.2.3:4567"`}},
		Body:   pr,
	}
	resp, err := tr.RoundTrip(req.WithContext(testCtx(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	io.WriteString(pw, "interop")
	pw.Close() // END_STREAM
	got, err := io.ReadAll(resp.Body)
	if err != nil || string(got) != "interop" {
		t.Fatalf("echo %q, %v", got, err)
	}
}

func TestInteropNetHTTPServer(t *testing.T) {
	checkGoroutines(t)
	e := newEnv(t, echo, nil)
	svid, _ := e.certs.GetX509SVID(context.Background(), e.srvID)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *http.Request, 1)
	srv := &http.Server{
		TLSConfig: serverTLSConfig(svid, e.certs),
		Protocols: new(http.Protocols),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			got <- r
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			buf := make([]byte, 1024)
			for {
				n, err := r.Body.Read(buf)
				w.Write(buf[:n])
				w.(http.Flusher).Flush()
				if err != nil {
					return
				}
			}
		}),
	}
	srv.Protocols.SetHTTP2(true)
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeTLS(ln, "", "")
	}()
	defer func() { srv.Close(); <-done }()
	d := e.dialer()
	r := e.request()
	r.Addr = ln.Addr().(*net.TCPAddr).AddrPort()
	r.Peers = []spiffeid.ID{e.srvID}
	s, err := d.Dial(testCtx(t), r)
	if err != nil {
		t.Fatal(err)
	}
	req := <-got
	if req.Method != "CONNECT" || req.Host != e.target.String() || req.Header.Get("Forwarded") != `for="10.1.2.3:45678"` {
		t.Errorf("x/net saw %s %s forwarded %q", req.Method, req.Host, req.Header.Get("Forwarded"))
	}
	io.WriteString(s, "interop")
	s.CloseWrite()
	echoed, err := io.ReadAll(s)
	if err != nil || string(echoed) != "interop" {
		t.Fatalf("echo %q, %v", echoed, err)
	}
	s.Close()
	d.Close()
}
