package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawClient is an HTTP/2 client made of x/net/http2's Framer over a real
// mTLS connection to a Server, to send what a conformant client would not.
type rawClient struct {
	t  *testing.T
	c  *tls.Conn
	fr *http2.Framer
}

func newRawClient(t *testing.T, e *env) *rawClient {
	t.Helper()
	svid, err := e.certs.GetX509SVID(context.Background(), e.cliID)
	if err != nil {
		t.Fatal(err)
	}
	c, err := e.tlsClient(svid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	rc := &rawClient{t: t, c: c, fr: http2.NewFramer(c, c)}
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := rc.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return rc
}

// connect opens stream id with a CONNECT to e's target.
func (rc *rawClient) connect(e *env, id uint32, end bool) {
	rc.t.Helper()
	rc.headers(id, end, []hpack.HeaderField{
		{Name: ":method", Value: "CONNECT"},
		{Name: ":authority", Value: e.target.String()},
	})
}

func (rc *rawClient) headers(id uint32, end bool, fields []hpack.HeaderField) {
	rc.t.Helper()
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range fields {
		enc.WriteField(f)
	}
	if err := rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: buf.Bytes(), EndStream: end, EndHeaders: true}); err != nil {
		rc.t.Fatal(err)
	}
}

// next returns the next frame other than SETTINGS, PING and WINDOW_UPDATE
// (acknowledging SETTINGS), or nil at the end of the connection.
func (rc *rawClient) next() http2.Frame {
	rc.t.Helper()
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				rc.t.Fatal("no answer from the server")
			}
			return nil // reset
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				rc.fr.WriteSettingsAck()
			}
			continue
		case *http2.PingFrame, *http2.WindowUpdateFrame:
			continue
		}
		return f
	}
}

// expectStatus reads stream id's response headers.
func (rc *rawClient) expectStatus(id uint32, status string) {
	rc.t.Helper()
	f := rc.next()
	h, ok := f.(*http2.MetaHeadersFrame)
	if !ok || h.StreamID != id || h.PseudoValue("status") != status {
		rc.t.Fatalf("got %v, want HEADERS :status %s on stream %d", f, status, id)
	}
}

// expectGoAway reads up to a GOAWAY with code, then the end of the
// connection.
func (rc *rawClient) expectGoAway(code http2.ErrCode) {
	rc.t.Helper()
	for {
		f := rc.next()
		if f == nil {
			rc.t.Fatalf("connection closed without GOAWAY %v", code)
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			if ga.ErrCode != code {
				rc.t.Fatalf("GOAWAY %v, want %v", ga.ErrCode, code)
			}
			break
		}
	}
	if f := rc.next(); f != nil {
		rc.t.Fatalf("after GOAWAY: %v, want the connection closed", f)
	}
}

// expectReset reads up to RST_STREAM on id, which must have code.
func (rc *rawClient) expectReset(id uint32, code http2.ErrCode) {
	rc.t.Helper()
	for {
		f := rc.next()
		switch f := f.(type) {
		case nil:
			rc.t.Fatalf("connection closed, want RST_STREAM %v on stream %d", code, id)
		case *http2.GoAwayFrame:
			rc.t.Fatalf("GOAWAY %v, want RST_STREAM %v on stream %d", f.ErrCode, code, id)
		case *http2.RSTStreamFrame:
			if f.StreamID != id || f.ErrCode != code {
				rc.t.Fatalf("RST_STREAM %v on stream %d, want %v on %d", f.ErrCode, f.StreamID, code, id)
			}
			return
		case *http2.DataFrame:
			if f.StreamID == id && f.StreamEnded() {
				rc.t.Fatalf("stream %d ended, want RST_STREAM %v", id, code)
			}
		}
	}
}

// TestProtocolViolations checks the RFC 9113 answers to frames a
// conformant client does not send.
func TestProtocolViolations(t *testing.T) {
	checkGoroutines(t)
	stop := make(chan struct{})
	// The pod keeps its side open until the test ends, so streams stay
	// open on the server; it reports whether its connection was closed
	// (writes fail) rather than half-closed.
	closed := make(chan bool, 16)
	e := newEnv(t, func(c net.Conn) {
		io.Copy(io.Discard, c)
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) {
			if _, err := c.Write([]byte("late")); err != nil {
				closed <- true
				<-stop
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		closed <- false
		<-stop
	}, nil)
	t.Cleanup(func() { close(stop) })

	t.Run("RST_STREAM on an idle stream", func(t *testing.T) {
		rc := newRawClient(t, e)
		rc.fr.WriteRSTStream(1, http2.ErrCodeCancel)
		rc.expectGoAway(http2.ErrCodeProtocol)
	})
	t.Run("RST_STREAM above the last opened stream", func(t *testing.T) {
		rc := newRawClient(t, e)
		rc.connect(e, 1, false)
		rc.expectStatus(1, "200")
		rc.fr.WriteRSTStream(5, http2.ErrCodeCancel)
		rc.expectGoAway(http2.ErrCodeProtocol)
	})
	t.Run("RST_STREAM on a server stream ID", func(t *testing.T) {
		rc := newRawClient(t, e)
		rc.connect(e, 1, false)
		rc.expectStatus(1, "200")
		rc.fr.WriteRSTStream(2, http2.ErrCodeCancel)
		rc.expectGoAway(http2.ErrCodeProtocol)
	})
	t.Run("WINDOW_UPDATE on an idle stream", func(t *testing.T) {
		rc := newRawClient(t, e)
		rc.connect(e, 1, false)
		rc.expectStatus(1, "200")
		rc.fr.WriteWindowUpdate(3, 1000)
		rc.expectGoAway(http2.ErrCodeProtocol)
	})
	t.Run("HEADERS after END_STREAM", func(t *testing.T) {
		rc := newRawClient(t, e)
		rc.connect(e, 1, true)
		rc.expectStatus(1, "200")
		rc.headers(1, true, []hpack.HeaderField{{Name: "x-trailer", Value: "1"}})
		rc.expectReset(1, http2.ErrCodeStreamClosed)
		// A stream error: the connection still serves.
		rc.connect(e, 3, false)
		rc.expectStatus(3, "200")
	})
	t.Run("HEADERS on a closed stream", func(t *testing.T) {
		rc := newRawClient(t, e)
		rc.headers(1, true, []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":authority", Value: e.target.String()}})
		rc.expectStatus(1, "400")
		rc.connect(e, 1, false)
		rc.expectGoAway(http2.ErrCodeStreamClosed)
	})
	t.Run("PRIORITY on itself", func(t *testing.T) {
		rc := newRawClient(t, e)
		rc.fr.WritePriority(1, http2.PriorityParam{StreamDep: 1})
		rc.expectReset(1, http2.ErrCodeProtocol)
		rc.connect(e, 3, false)
		rc.expectStatus(3, "200")
	})
	for _, end := range []bool{true, false} {
		name := "trailers on a tunnel"
		if !end {
			name += " without END_STREAM"
		}
		t.Run(name, func(t *testing.T) {
			rc := newRawClient(t, e)
			rc.connect(e, 1, false)
			rc.expectStatus(1, "200")
			rc.fr.WriteData(1, false, []byte("abc"))
			rc.headers(1, end, []hpack.HeaderField{{Name: "x-trailer", Value: "1"}})
			rc.expectReset(1, http2.ErrCodeProtocol)
			// Reset, not half-closed: the upstream connection is closed.
			select {
			case c := <-closed:
				if !c {
					t.Fatal("the upstream connection was half-closed, want closed")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the upstream connection stayed open")
			}
			rc.connect(e, 3, false)
			rc.expectStatus(3, "200")
		})
	}
}
