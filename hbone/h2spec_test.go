package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"

	"github.com/ambit-mesh/ambit/relay"
)

// TestH2Spec runs the h2spec HTTP/2 conformance suite (RFC 9113 parts:
// "http2") against a Server, through a shim that takes h2spec's plaintext
// (prior-knowledge) connections to the Server over mTLS with a client
// SVID, and for comparison against x/net/http2's server. It runs when
// H2SPEC names the h2spec binary (go install
// github.com/summerwind/h2spec/cmd/h2spec@v2.2.1); the suite takes about a
// minute, so it is not part of the default run. A Server answers any
// request other than a CONNECT with 400, which h2spec accepts as a
// response.
func TestH2Spec(t *testing.T) {
	bin := os.Getenv("H2SPEC")
	if bin == "" {
		t.Skip("H2SPEC is not set (the h2spec binary)")
	}
	e := newEnv(t, echo, nil)
	svid, err := e.certs.GetX509SVID(context.Background(), e.cliID)
	if err != nil {
		t.Fatal(err)
	}
	shim := listen(t, func(c net.Conn) {
		up, err := tls.Dial("tcp", e.addr.String(), clientTLSConfig(svid, e.certs, []spiffeid.ID{e.srvID}))
		if err != nil {
			c.Close()
			return
		}
		relay.Join(t.Context(), c, up, nil)
	})
	ref := listen(t, func(c net.Conn) {
		//lint:ignore SA1019 x/net's server is the reference this run compares hbone with
		(&http2.Server{}).ServeConn(c, &http2.ServeConnOpts{BaseConfig: &http.Server{ErrorLog: log.New(io.Discard, "", 0)}, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusBadRequest)
		})})
	})
	for _, target := range []struct {
		name string
		ln   net.Listener
	}{{"hbone.Server", shim}, {"x/net/http2.Server", ref}} {
		port := target.ln.Addr().(*net.TCPAddr).Port
		start := time.Now()
		out, _ := exec.CommandContext(t.Context(), bin, "http2", "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-o", "1").CombinedOutput()
		sum := regexp.MustCompile(`(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed`).FindString(string(out))
		t.Logf("%s: %s (%v)", target.name, sum, time.Since(start).Round(time.Second))
		if os.Getenv("H2SPEC_VERBOSE") != "" || sum == "" {
			t.Logf("%s", out)
		}
	}
}

// listen serves each connection on a loopback listener with serve, until
// the end of the test.
func listen(t *testing.T, serve func(net.Conn)) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c)
			}()
		}
	}()
	return ln
}
