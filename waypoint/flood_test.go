package waypoint

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Raw opens a tunnel speaking raw HTTP/2 frames (prior knowledge).
func h2Raw(t *testing.T, e *env) (net.Conn, *http2.Framer) {
	s := e.rawStream(target)
	s.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(s, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(s, s)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return s, fr
}

func headerBlock(fields ...string) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for i := 0; i+1 < len(fields); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return buf.Bytes()
}

// readUntilGoAway reads frames until GOAWAY or the connection ends; it
// reports whether a GOAWAY came.
func readUntilGoAway(fr *http2.Framer) (http2.ErrCode, bool) {
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return 0, false
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			return ga.ErrCode, true
		}
	}
}

func floodEnv(t *testing.T) (*env, *atomic.Int64) {
	e := newEnv(t, nil)
	var served atomic.Int64
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) { served.Add(1) })
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})...)
	return e, &served
}

// TestH2RapidReset: HEADERS immediately followed by RST_STREAM, 20000
// times: the waypoint's HTTP/2 server (x/net's mitigation) ends the
// connection, and only a bounded number of requests reach the backend.
func TestH2RapidReset(t *testing.T) {
	e, served := floodEnv(t)
	s, fr := h2Raw(t, e)
	block := headerBlock(":method", "GET", ":scheme", "http", ":path", "/", ":authority", svc)
	go readUntilGoAway(http2.NewFramer(io.Discard, s)) // keep the server's writes flowing
	start := time.Now()
	sent := 0
	for id := uint32(1); id < 40000; id += 2 {
		if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndStream: true, EndHeaders: true}) != nil {
			break
		}
		if fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
			break
		}
		sent++
	}
	// Let what was started finish, then count.
	var last int64 = -1
	eventually(t, 30*time.Second, func() bool {
		n := served.Load()
		time.Sleep(100 * time.Millisecond)
		stable := n == served.Load() && n == last
		last = n
		return stable
	}, "backend still busy")
	t.Logf("rapid reset: %d HEADERS+RST_STREAM pairs sent in %v, backend served %d", sent, time.Since(start), served.Load())
	if served.Load() > int64(sent)/2 { // most resets must spare the backend (slow -race runs reach about 1/4)
		t.Errorf("backend served %d of %d reset streams", served.Load(), sent)
	}
}

// TestH2ContinuationFlood: one HEADERS followed by endless CONTINUATION
// frames: the connection is closed once the header list passes the limit,
// without reading the flood to its end.
func TestH2ContinuationFlood(t *testing.T) {
	e, served := floodEnv(t)
	s, fr := h2Raw(t, e)
	block := headerBlock(":method", "GET", ":scheme", "http", ":path", "/", ":authority", svc)
	var sent atomic.Int64
	go func() {
		if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndStream: true, EndHeaders: false}) != nil {
			return
		}
		chunk := headerBlock("x-flood", strings.Repeat("a", 8000))
		for range 100000 { // 800 MB if nobody stopped us
			if fr.WriteContinuation(1, false, chunk) != nil {
				return
			}
			sent.Add(int64(len(chunk)))
		}
	}()
	start := time.Now()
	code, goaway := readUntilGoAway(http2.NewFramer(io.Discard, s)) // GOAWAY, or the connection ends
	took := time.Since(start)
	t.Logf("continuation flood: goaway=%v (%v) after %v, %d KiB written by then", goaway, code, took, sent.Load()>>10)
	if took > 5*time.Second {
		t.Errorf("the server took %v to stop the flood", took)
	}
	if served.Load() != 0 {
		t.Errorf("backend served %d", served.Load())
	}
}
