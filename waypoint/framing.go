package waypoint

import (
	"bytes"
	"net"
	"net/textproto"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// framing watches the HTTP/1.x request heads a tunnelled connection
// carries, as net/http frames them, for what net/http hides from a
// handler: whether a head had a Transfer-Encoding together with a
// Content-Length (net/http drops the Content-Length and uses the chunked
// framing, as RFC 9112 6.3 allows; a front proxy that used the
// Content-Length would have seen other requests: smuggling). Envoy refuses
// such a request with 400, and so does the waypoint (serveHTTP).
//
// It reads nothing itself: Read passes net/http's reads through and looks
// at the bytes. Heads are followed while bodies are framed by
// Content-Length; the first head with a Transfer-Encoding is the last one
// looked at (its connection is closed after its answer), as is the HTTP/2
// preface (h2c) or a line longer than any head net/http accepts.
type framing struct {
	net.Conn

	// Read's state, touched only by the goroutine reading the connection.
	max    int    // longest line followed
	line   []byte // a line split across reads
	body   int64  // body bytes left before the next head
	inHead bool
	heads  int64   // heads seen (1-based index of the current one)
	te, cl bool    // the current head has Transfer-Encoding, Content-Length
	host   bool    // the current head has a Host field
	abs    bool    // the current head's request-target is not origin-form (http.ReadRequest drops its Host value)
	badHst bool    // the current head's Host value is malformed (looked at when abs)
	noHost []int64 // indexes of heads without a Host field, not yet asked about (hostOf)
	bad    []int64 // indexes of heads with a malformed Host value, not yet asked about
	badCL  bool    // its Content-Length does not parse (net/http refuses it)
	clen   int64
	done   bool

	teHead   atomic.Int64 // index of the head with a Transfer-Encoding (0: none)
	teWithCL atomic.Bool  // that head had a Content-Length too

	rdl lazyReadDeadline // the read deadline net/http sets
}

func newFraming(c net.Conn, maxHeaderBytes int) *framing {
	if maxHeaderBytes <= 0 {
		maxHeaderBytes = 1 << 20 // net/http's DefaultMaxHeaderBytes
	}
	f := &framing{Conn: c, max: maxHeaderBytes + 4096} // net/http's slack
	f.rdl.conn = c
	return f
}

// SetReadDeadline is lazyReadDeadline's: net/http sets one per request.
func (f *framing) SetReadDeadline(t time.Time) error { return f.rdl.set(t) }

// SetDeadline sets both deadlines, the read one as SetReadDeadline.
func (f *framing) SetDeadline(t time.Time) error {
	if err := f.rdl.set(t); err != nil {
		return err
	}
	return f.Conn.SetWriteDeadline(t)
}

// Close closes the connection and releases the deadline's timer.
func (f *framing) Close() error {
	f.rdl.stop()
	return f.Conn.Close()
}

// CloseWrite half-closes the tunnelled connection (net/http uses it when it
// closes after an answer).
func (f *framing) CloseWrite() error {
	if cw, ok := f.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (f *framing) Read(p []byte) (int, error) {
	n, err := f.Conn.Read(p)
	if n > 0 && !f.done {
		f.watch(p[:n])
	}
	return n, err
}

// transferEncoding reports whether the n-th request head (1-based) had a
// Transfer-Encoding, and whether it also had a Content-Length.
func (f *framing) transferEncoding(n int64) (te, withCL bool) {
	if f.teHead.Load() != n {
		return false, false
	}
	return true, f.teWithCL.Load()
}

// hostOf reports whether the n-th request head (1-based) had a Host field,
// and whether its value was valid where the request's Host does not show
// it (http.ReadRequest drops the field from the header, and takes an
// absolute-form target's host instead: h1server asks here). Heads are
// asked about in order; it is called by the goroutine reading the
// connection, or after it.
func (f *framing) hostOf(n int64) (had, valid bool) {
	for len(f.noHost) > 0 && f.noHost[0] < n {
		f.noHost = f.noHost[1:]
	}
	for len(f.bad) > 0 && f.bad[0] < n {
		f.bad = f.bad[1:]
	}
	return len(f.noHost) == 0 || f.noHost[0] != n, len(f.bad) == 0 || f.bad[0] != n
}

func (f *framing) watch(b []byte) {
	for len(b) > 0 && !f.done {
		if f.body > 0 {
			k := min(int64(len(b)), f.body)
			f.body -= k
			b = b[k:]
			continue
		}
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			if len(f.line)+len(b) > f.max {
				f.stop()
				return
			}
			f.line = append(f.line, b...)
			return
		}
		line := b[:i]
		if len(f.line) > 0 {
			if len(f.line)+i > f.max {
				f.stop()
				return
			}
			f.line = append(f.line, line...)
			line = f.line
		}
		b = b[i+1:]
		f.onLine(bytes.TrimSuffix(line, []byte("\r")))
		f.line = f.line[:0]
	}
}

func (f *framing) stop() {
	f.done = true
	f.line = nil
}

var h2Preface = []byte("PRI * HTTP/2.0")

func (f *framing) onLine(l []byte) {
	if !f.inHead {
		switch {
		case len(l) == 0: // blank lines before a request line
		case bytes.Equal(l, h2Preface):
			f.stop()
		default:
			f.inHead = true
			f.heads++
			f.te, f.cl, f.badCL, f.clen, f.host, f.badHst = false, false, false, 0, false, false
			_, target, _ := bytes.Cut(l, []byte(" "))
			f.abs = len(target) > 0 && target[0] != '/'
		}
		return
	}
	if len(l) == 0 { // the end of the head
		f.inHead = false
		if !f.host {
			f.noHost = append(f.noHost, f.heads)
		}
		if f.badHst {
			f.bad = append(f.bad, f.heads)
		}
		switch {
		case f.te:
			f.teWithCL.Store(f.cl)
			f.teHead.Store(f.heads)
			f.stop()
		case f.badCL:
			f.stop()
		case f.cl:
			f.body = f.clen
		}
		return
	}
	if l[0] == ' ' || l[0] == '\t' {
		return // a continuation of the previous field's value
	}
	name, value, ok := bytes.Cut(l, []byte(":"))
	if !ok {
		return
	}
	switch {
	case asciiEqualFold(name, "host"):
		f.host = true
		if f.abs && !httpguts.ValidHostHeader(string(textproto.TrimBytes(value))) {
			f.badHst = true
		}
	case asciiEqualFold(name, "transfer-encoding"):
		f.te = true
	case asciiEqualFold(name, "content-length"):
		if !f.cl { // net/http refuses differing repeats
			n, err := strconv.ParseUint(string(textproto.TrimBytes(value)), 10, 63)
			f.clen, f.badCL = int64(n), err != nil
		}
		f.cl = true
	}
}

// asciiEqualFold reports whether b is s (lowercase ASCII) ignoring case.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range len(b) {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}
