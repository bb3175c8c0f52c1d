package waypoint

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1server.go: the waypoint's own HTTP/1.x server loop for one tunnelled
// connection. net/http's Server costs, per connection, a listener, a conn
// goroutine and, per request, a background-read goroutine (its wake-ups
// were a third of the waypoint's CPU); this loop serves the requests on the
// HBONE handler's goroutine, one after the other. Requests are parsed by
// net/http (http.ReadRequest); what net/http's server added around the
// parser is kept here: the head limit (431), Host checks (400),
// unsupported Transfer-Encoding (501), Expect (100 Continue on the first
// body read, 417 otherwise), ReadHeaderTimeout / IdleTimeout /
// ReadTimeout, keep-alive rules, the bounded drain of an unread request
// body (256 KiB), response framing (Content-Length, chunked, trailers,
// none for HEAD/1xx/204/304), Date, Flush. The request's context ends when
// the HBONE stream is reset (its handler context), when the request ends,
// and, as net/http's background read had it, when the client's FIN is read
// while the handler runs: once the request body is consumed and no
// pipelined bytes wait (hbone.Stream.OnReadEOF, no goroutine); the client
// is gone, and an answer the handler had not begun is not made up (the
// connection is closed). HTTP/2 with prior knowledge still goes to net/http
// (serveNetHTTP).

// innerServer is a tunnelled connection's server, as drain sees it:
// net/http's (h2c) or an h1conn.
type innerServer interface {
	Shutdown(context.Context) error
	Close() error
	SetKeepAlivesEnabled(bool)
}

// h1conn states, for drain: idle (waiting for a request's first byte),
// active (reading or answering a request), closed (by Shutdown while idle).
const (
	h1Idle int32 = iota
	h1Active
	h1Closed
)

// maxPostHandlerReadBytes is how much of a request body the handler left
// unread is read and dropped to keep the connection (net/http's).
const maxPostHandlerReadBytes = 256 << 10

var (
	h1Readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4<<10) }}
	h1Writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// h1conn serves HTTP/1.x on one tunnelled connection.
type h1conn struct {
	p      *Proxy
	ds     *downstream
	conn   *framing
	ctx    context.Context
	lim    io.LimitedReader // under br: bounds the bytes read while a head is parsed (net/http's MaxHeaderBytes plus its 4096 slack)
	br     *bufio.Reader
	bw     *bufio.Writer
	remote string

	readHeaderTimeout, readTimeout, idleTimeout time.Duration
	maxHeaderBytes                              int
	heads                                       int64 // request heads parsed (framing's index)
	lastPOST                                    bool  // the last request was a POST

	state     atomic.Int32 // h1Idle, h1Active, h1Closed
	keepAlive atomic.Bool  // cleared by drain (SetKeepAlivesEnabled)
	done      chan struct{}
	closeOnce sync.Once

	// wmu orders a 100 Continue (written by whoever reads the body) with
	// the response head; it guards bw until the head is out.
	wmu sync.Mutex

	dateSec int64 // the second date was formatted for
	date    []byte

	// fmu guards the fields below: the client's FIN (OnReadEOF, on the
	// HBONE connection's read loop) against the request in flight.
	fmu sync.Mutex
	// eof: the stream's reads are at their end. armed: the request's body
	// is consumed, so nothing reads br until the request ends (disarm).
	eof, armed bool
	cancelReq  context.CancelFunc // the request in flight's (nil between requests)
	finCancel  bool               // cancelReq was called for the FIN
}

// readEOFNotifier is what hbone.Stream offers: a call when its reads are
// at their end (the client's FIN, everything before it read).
type readEOFNotifier interface{ OnReadEOF(func()) }

// onReadEOF is the client's FIN: the request in flight, its body consumed
// and nothing pipelined behind it, is canceled (net/http's background read
// seeing EOF).
func (h *h1conn) onReadEOF() {
	h.fmu.Lock()
	h.eof = true
	cancel := h.finCancelLocked()
	h.fmu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// arm: the request's body is consumed (or there is none); reads of br
// stop until disarm. It cancels the request if the FIN was already read.
func (h *h1conn) arm() {
	h.fmu.Lock()
	h.armed = true
	cancel := h.finCancelLocked()
	h.fmu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// finCancelLocked returns the request's cancel if the client's FIN ends
// it now. h.fmu must be held.
func (h *h1conn) finCancelLocked() context.CancelFunc {
	if !h.eof || !h.armed || h.cancelReq == nil || h.finCancel || h.br.Buffered() > 0 {
		return nil
	}
	h.finCancel = true
	return h.cancelReq
}

// serveConn serves one tunnelled connection of an HTTP chain. The first
// bytes decide: the HTTP/2 preface goes to net/http's server (h2c, gRPC),
// anything else to the HTTP/1.x loop, on this goroutine.
func (p *Proxy) serveConn(ctx context.Context, c net.Conn, hc *httpChain, ds *downstream) {
	f := newFraming(c, hc.maxHeaderBytes)
	ds.framing = f
	h := &h1conn{p: p, ds: ds, conn: f, ctx: ctx, readHeaderTimeout: p.cfg.ReadHeaderTimeout,
		readTimeout: hc.requestTimeout, idleTimeout: hc.idleTimeout, maxHeaderBytes: hc.maxHeaderBytes,
		done: make(chan struct{})}
	if h.maxHeaderBytes <= 0 {
		h.maxHeaderBytes = http.DefaultMaxHeaderBytes
	}
	h.keepAlive.Store(true)
	h.state.Store(h1Active) // a new connection is served even while draining (once, without keep-alive)
	if !p.track(h) {
		c.Close()
		return
	}
	defer p.untrack(h)
	defer close(h.done)
	h.lim = io.LimitedReader{R: f, N: int64(h.maxHeaderBytes) + 4096}
	h.br = h1Readers.Get().(*bufio.Reader)
	h.br.Reset(&h.lim)
	f.SetReadDeadline(h.headDeadline(time.Now()))
	if h.isH2() {
		h.lim.N = math.MaxInt64
		f.SetReadDeadline(time.Time{})
		p.untrack(h)
		p.serveNetHTTP(ctx, &bufferedConn{framing: f, r: h.br}, hc, ds)
		return // h.br is net/http's until the end: not reused
	}
	h.bw = h1Writers.Get().(*bufio.Writer)
	h.bw.Reset(f)
	if a := c.RemoteAddr(); a != nil {
		h.remote = a.String()
	}
	if n, ok := c.(readEOFNotifier); ok {
		n.OnReadEOF(h.onReadEOF)
	}
	h.serve()
	h.close()
	h.br.Reset(nil)
	h1Readers.Put(h.br)
	h.bw.Reset(nil)
	h1Writers.Put(h.bw)
}

// headDeadline is when a head that starts at t must be read by (zero:
// never): ReadHeaderTimeout, or ReadTimeout without one (net/http's).
func (h *h1conn) headDeadline(t time.Time) time.Time {
	d := h.readHeaderTimeout
	if d <= 0 {
		d = h.readTimeout
	}
	if d <= 0 {
		return time.Time{}
	}
	return t.Add(d)
}

// isH2 reports whether the connection starts with the HTTP/2 preface. It
// reads no more than it must: a shorter HTTP/1.x request is not waited on.
func (h *h1conn) isH2() bool {
	pre := http2Preface
	for n := 1; n <= len(pre); n++ {
		if b := h.br.Buffered(); b > n {
			n = min(b, len(pre))
		}
		b, err := h.br.Peek(n)
		if !bytes.HasPrefix([]byte(pre), b) {
			return false
		}
		if err != nil {
			return false
		}
		if len(b) == len(pre) {
			return true
		}
	}
	return false
}

const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// bufferedConn is a connection whose first bytes were peeked into r.
type bufferedConn struct {
	*framing
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// serve answers requests until the connection ends or is not kept.
func (h *h1conn) serve() {
	for {
		if !h.serveOne() {
			return
		}
		h.state.Store(h1Idle)
		if !h.keepAlive.Load() {
			return // draining: not kept
		}
		var dl time.Time
		idle := h.idleTimeout
		if idle == 0 {
			idle = h.readTimeout // net/http's: ReadTimeout without an IdleTimeout
		}
		if idle > 0 {
			dl = time.Now().Add(idle)
		}
		h.conn.SetReadDeadline(dl)
		// The next head's timeout starts with its first byte.
		if _, err := h.br.Peek(1); err != nil {
			return
		}
		if !h.state.CompareAndSwap(h1Idle, h1Active) {
			return
		}
	}
}

// SetKeepAlivesEnabled(false) has the connection closed after the
// response in flight (which says "Connection: close"), or now if idle.
func (h *h1conn) SetKeepAlivesEnabled(on bool) {
	h.keepAlive.Store(on)
	if !on && h.state.CompareAndSwap(h1Idle, h1Closed) {
		h.close()
	}
}

// Shutdown is drain's: no more keep-alive, an idle connection closed now,
// a busy one after its response; it waits for that, or for ctx.
func (h *h1conn) Shutdown(ctx context.Context) error {
	h.SetKeepAlivesEnabled(false)
	select {
	case <-h.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes the connection at once.
func (h *h1conn) Close() error {
	h.close()
	return nil
}

func (h *h1conn) close() { h.closeOnce.Do(func() { h.conn.Close() }) }

// closeAfterReply ends the connection after an answer that left request
// bytes unread: the write side first (the answer reaches the client
// before a reset for unread data would), then a bounded wait for the
// client to finish (net/http's closeWriteAndWait).
func (h *h1conn) closeAfterReply(body *h1body) {
	h.bw.Flush()
	h.conn.CloseWrite()
	h.conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if body != nil {
		body.end() // waits for a reader left in it (the deadline ends its read)
	}
	io.Copy(io.Discard, io.LimitReader(h.br, maxPostHandlerReadBytes))
}

// replyError answers a request that could not be read, as net/http does,
// and closes the connection.
func (h *h1conn) replyError(code int, text string) {
	h.bw.WriteString("HTTP/1.1 " + strconv.Itoa(code) + " " + http.StatusText(code))
	if text != "" {
		h.bw.WriteString(": " + text)
	}
	h.bw.WriteString("\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n" + strconv.Itoa(code) + " " + http.StatusText(code))
	if text != "" {
		h.bw.WriteString(": " + text)
	}
	h.bw.Flush()
}

// isCommonNetReadError: the client went away or timed out; no answer
// (net/http's).
func isCommonNetReadError(err error) bool {
	if err == io.EOF {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "read"
}

// serveOne reads and answers one request; false ends the connection.
func (h *h1conn) serveOne() bool {
	t0 := time.Now()
	hdl := h.headDeadline(t0)
	var whole time.Time
	if h.readTimeout > 0 {
		whole = t0.Add(h.readTimeout)
	}
	h.conn.SetReadDeadline(hdl)
	h.lim.N = int64(h.maxHeaderBytes) + 4096
	if h.lastPOST {
		// Blank lines after a POST's body (old clients' CRLF), as
		// net/http skips them (RFC 9112 2.2).
		peek, _ := h.br.Peek(4) // ReadRequest gets the error
		n := 0
		for n < len(peek) && (peek[n] == '\r' || peek[n] == '\n') {
			n++
		}
		h.br.Discard(n)
	}
	req, err := http.ReadRequest(h.br)
	if err != nil {
		switch {
		case h.lim.N <= 0:
			h.replyError(http.StatusRequestHeaderFieldsTooLarge, "")
			h.closeAfterReply(nil)
		case strings.HasPrefix(err.Error(), "unsupported transfer encoding"):
			h.replyError(http.StatusNotImplemented, "")
		case isCommonNetReadError(err):
			return false
		default:
			h.replyError(http.StatusBadRequest, "")
		}
		h.conn.CloseWrite()
		return false
	}
	h.lim.N = math.MaxInt64
	h.lastPOST = req.Method == http.MethodPost
	if req.ProtoMajor != 1 {
		h.replyError(http.StatusHTTPVersionNotSupported, "unsupported protocol version")
		h.conn.CloseWrite()
		return false
	}
	h.heads++
	if msg := checkHead(req, h.conn, h.heads); msg != "" {
		h.replyError(http.StatusBadRequest, msg)
		h.conn.CloseWrite()
		return false
	}
	req.RemoteAddr = h.remote
	if !hdl.Equal(whole) {
		h.conn.SetReadDeadline(whole)
	}
	w := &h1resp{h: h, req: req, header: make(http.Header, 8), cl: -1,
		head: req.Method == http.MethodHead, is11: req.ProtoAtLeast(1, 1)}
	if ex := req.Header["Expect"]; len(ex) > 0 {
		if !hasToken(ex[0], "100-continue") || len(ex) > 1 {
			w.header.Set("Connection", "close")
			w.WriteHeader(http.StatusExpectationFailed)
			w.finish()
			h.conn.CloseWrite()
			return false
		}
		w.continueOwed = w.is11 && req.ContentLength != 0
		if !w.is11 {
			// An HTTP/1.0 client waits for no 100 Continue: the
			// expectation is ignored (RFC 9110 10.1.1, net/http), and not
			// passed on.
			delete(req.Header, "Expect")
		}
	}
	if req.Body != http.NoBody {
		w.body = &h1body{rc: req.Body, w: w}
		req.Body = w.body
	}
	ctx, cancel := context.WithCancel(h.ctx)
	req = req.WithContext(ctx)
	h.fmu.Lock()
	h.cancelReq, h.armed, h.finCancel = cancel, false, false
	h.fmu.Unlock()
	if w.body == nil {
		h.arm()
	}
	aborted := h.call(w, req)
	h.fmu.Lock()
	gone := h.finCancel
	h.cancelReq, h.armed = nil, false
	h.fmu.Unlock()
	cancel()
	if gone && !w.wroteHeader {
		aborted = true // the client left before an answer: none is made up
	}
	if aborted {
		h.close() // the client sees the answer cut short
		if w.body != nil {
			w.body.end()
		}
		return false
	}
	reuse := w.finish()
	switch {
	case reuse:
		if w.body != nil {
			w.body.end() // read to its end: no reader is left in it
		}
	case w.bodyLimitHit || w.bodyLeft:
		h.closeAfterReply(w.body)
	default:
		h.conn.CloseWrite() // the client reads the end of the answer, then EOF
		h.close()           // a reader left in the body returns
		if w.body != nil {
			w.body.end()
		}
	}
	return reuse
}

// call runs the handler; true if it panicked (http.ErrAbortHandler: the
// answer must be cut short).
func (h *h1conn) call(w *h1resp, r *http.Request) (aborted bool) {
	defer func() {
		if v := recover(); v != nil {
			aborted = true
			if v != http.ErrAbortHandler {
				h.p.log.Error("waypoint: handler panic", "panic", v)
			}
		}
	}()
	h.p.serveHTTP(w, r, h.ds)
	return false
}

// checkHead applies net/http's server checks to a parsed head: Host
// present on HTTP/1.1 (framing saw it; http.ReadRequest refuses repeats
// and drops it from the header), valid (the field's value too, which an
// absolute-form target hides), and field names and values valid.
func checkHead(r *http.Request, f *framing, n int64) string {
	hadHost, validHost := f.hostOf(n)
	if r.ProtoAtLeast(1, 1) && !hadHost && r.Method != http.MethodConnect {
		return "missing required Host header"
	}
	if !validHost || !httpguts.ValidHostHeader(r.Host) {
		return "malformed Host header"
	}
	for k, vv := range r.Header {
		if !httpguts.ValidHeaderFieldName(k) {
			return "invalid header name"
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				return "invalid header value"
			}
		}
	}
	return ""
}

// hasToken reports whether the comma-separated list v holds token,
// ASCII case-insensitively.
func hasToken(v, token string) bool {
	for f := range strings.SplitSeq(v, ",") {
		if strings.EqualFold(strings.TrimSpace(f), token) {
			return true
		}
	}
	return false
}

// h1body is the request body the handler reads: it answers Expect:
// 100-continue on the first read, records how the body ended, and once
// the request is over refuses reads (a reader left behind, such as an
// upstream pool's body writer, must not take the next request's bytes).
type h1body struct {
	w  *h1resp
	mu sync.Mutex // guards the fields below and reads of rc
	rc io.ReadCloser
	// sawEOF: read to its end; closed: closed by the handler; ended: the
	// request is over; failed: a read failed otherwise.
	sawEOF, closed, ended, failed bool
	n                             int64 // bytes read
}

func (b *h1body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.ended {
		return 0, http.ErrBodyReadAfterClose
	}
	if b.sawEOF {
		return 0, io.EOF
	}
	b.w.sendContinue()
	n, err := b.rc.Read(p)
	b.n += int64(n)
	switch {
	case err == io.EOF:
		b.sawEOF = true
		b.w.h.arm()
	case err != nil:
		b.failed = true
	}
	return n, err
}

func (b *h1body) Close() error {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	return nil
}

// reusable reads what the handler left of the body, up to
// maxPostHandlerReadBytes: whether the connection can carry another
// request.
func (b *h1body) reusable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.sawEOF:
		return true
	case b.closed || b.failed || b.ended:
		return false
	case b.w.req.ContentLength-b.n > maxPostHandlerReadBytes:
		return false // not worth reading
	}
	_, err := io.CopyN(io.Discard, b.rc, maxPostHandlerReadBytes+1)
	if err == io.EOF {
		b.sawEOF = true
		return true
	}
	return false
}

// end refuses further reads.
func (b *h1body) end() {
	b.mu.Lock()
	b.ended = true
	b.mu.Unlock()
}

// h1resp is the http.ResponseWriter of one HTTP/1.x request. Its head is
// written at WriteHeader (the framing decided from the header then: the
// handler's Content-Length, else chunked on HTTP/1.1, else until close).
type h1resp struct {
	h      *h1conn
	req    *http.Request
	body   *h1body // nil without a body
	header http.Header

	status       int
	wroteHeader  bool
	committed    bool // the head is in bw (guarded by h.wmu: 100 Continue)
	continueOwed bool // Expect: 100-continue, not answered yet (guarded by h.wmu)
	head, is11   bool // a HEAD request; HTTP/1.1 or later
	bodyOK       bool // the status allows a body
	chunked      bool
	closeAfter   bool  // the connection ends after this response
	bodyLimitHit bool  // MaxBytesReader refused the rest of the body
	bodyLeft     bool  // request bytes left unread: the connection ends
	cl           int64 // the handler's Content-Length (-1: none)
	written      int64
	trailers     []string // declared in the head's Trailer
	err          error    // a write failed: the connection ends
}

func (w *h1resp) Header() http.Header { return w.header }

// requestTooLarge is MaxBytesReader's hook: the connection ends after the
// answer (net/http's).
func (w *h1resp) requestTooLarge() {
	w.closeAfter = true
	w.bodyLimitHit = true
	if !w.wroteHeader {
		w.header.Set("Connection", "close")
	}
}

// sendContinue answers Expect: 100-continue, once, unless the final
// answer's head is already out.
func (w *h1resp) sendContinue() {
	h := w.h
	h.wmu.Lock()
	defer h.wmu.Unlock()
	if !w.continueOwed || w.committed {
		return
	}
	w.continueOwed = false
	h.bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
	h.bw.Flush() // a failure shows in the response's writes
}

func bodyAllowedForStatus(code int) bool {
	switch {
	case code >= 100 && code <= 199, code == http.StatusNoContent, code == http.StatusNotModified:
		return false
	}
	return true
}

func (w *h1resp) WriteHeader(code int) {
	if w.wroteHeader {
		return
	}
	if code < 100 || code > 999 {
		panic("invalid WriteHeader code " + strconv.Itoa(code))
	}
	if code >= 100 && code <= 199 && code != http.StatusSwitchingProtocols {
		w.writeInformational(code)
		return
	}
	w.wroteHeader = true
	w.status = code
	w.commit()
}

// writeInformational sends a 1xx head (the handler's header so far).
func (w *h1resp) writeInformational(code int) {
	h := w.h
	h.wmu.Lock()
	defer h.wmu.Unlock()
	if code == http.StatusContinue {
		if !w.continueOwed {
			return
		}
		w.continueOwed = false
	}
	h.bw.Write(appendStatusLine(nil, true, code))
	w.header.WriteSubset(h.bw, nil)
	h.bw.WriteString("\r\n")
	if err := h.bw.Flush(); err != nil {
		w.err = err
	}
}

func appendStatusLine(b []byte, is11 bool, code int) []byte {
	if is11 {
		b = append(b, "HTTP/1.1 "...)
	} else {
		b = append(b, "HTTP/1.0 "...)
	}
	b = strconv.AppendInt(b, int64(code), 10)
	b = append(b, ' ')
	if t := http.StatusText(code); t != "" {
		b = append(b, t...)
	} else {
		b = append(b, "status code "...)
		b = strconv.AppendInt(b, int64(code), 10)
	}
	return append(b, "\r\n"...)
}

var excludeFraming = map[string]bool{"Transfer-Encoding": true, "Connection": true}

// commit decides the response's framing and connection handling from the
// header and writes the head into bw.
func (w *h1resp) commit() {
	h, hdr, r := w.h, w.header, w.req
	w.bodyOK = bodyAllowedForStatus(w.status)
	if v := hdr["Content-Length"]; len(v) > 0 {
		if n, err := strconv.ParseInt(v[0], 10, 64); err == nil && n >= 0 && len(v) == 1 {
			w.cl = n
		} else {
			delete(hdr, "Content-Length")
		}
	}
	if w.status == http.StatusNoContent || w.status == http.StatusSwitchingProtocols {
		delete(hdr, "Content-Length")
		w.cl = -1
	}
	if tr := hdr["Trailer"]; len(tr) > 0 {
		for _, v := range tr {
			for f := range strings.SplitSeq(v, ",") {
				if f = strings.TrimSpace(f); f != "" {
					w.trailers = append(w.trailers, http.CanonicalHeaderKey(f))
				}
			}
		}
	}
	switch {
	case !w.bodyOK || w.head:
	case w.cl >= 0 && len(w.trailers) == 0:
	case w.is11:
		w.chunked = true
		delete(hdr, "Content-Length")
		w.cl = -1
	default:
		w.closeAfter = true // HTTP/1.0: the body ends with the connection
		delete(hdr, "Content-Length")
		w.cl = -1
	}
	if !w.chunked {
		w.trailers = nil
	}

	// Keep-alive (net/http's rules).
	conn := hdr.Get("Connection")
	ka10 := !w.is11 && hasToken(r.Header.Get("Connection"), "keep-alive")
	keepHdr := false
	switch {
	case ka10 && !w.closeAfter && (w.head || w.cl >= 0 || !w.bodyOK):
		keepHdr = conn == ""
	case !w.is11 || r.Close:
		w.closeAfter = true
	}
	if hasToken(conn, "close") || !h.keepAlive.Load() || h.p.draining.Load() {
		w.closeAfter = true
	}
	h.wmu.Lock()
	owed := w.continueOwed
	h.wmu.Unlock()
	if owed {
		w.closeAfter = true // the body was never asked for: what follows may be it, or not
	}
	if w.body != nil && !w.closeAfter && !w.body.reusable() {
		w.closeAfter, w.bodyLeft = true, true
	}
	if w.closeAfter {
		keepHdr = false
	}

	h.wmu.Lock()
	defer h.wmu.Unlock()
	w.committed = true
	bw := h.bw
	var sl [64]byte
	bw.Write(appendStatusLine(sl[:0], w.is11, w.status))
	exclude := excludeFraming
	for k := range hdr {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			exclude = map[string]bool{"Transfer-Encoding": true, "Connection": true}
			for k := range hdr {
				if strings.HasPrefix(k, http.TrailerPrefix) {
					exclude[k] = true
				}
			}
			break
		}
	}
	if err := hdr.WriteSubset(bw, exclude); err != nil {
		w.err = err
	}
	switch {
	case w.closeAfter && w.is11:
		bw.WriteString("Connection: close\r\n")
	case keepHdr:
		bw.WriteString("Connection: keep-alive\r\n")
	case conn != "" && !w.closeAfter:
		bw.WriteString("Connection: ")
		bw.WriteString(sanitizeValue(conn))
		bw.WriteString("\r\n")
	}
	if w.chunked {
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if _, ok := hdr["Date"]; !ok {
		bw.WriteString("Date: ")
		bw.Write(h.now())
		bw.WriteString("\r\n")
	}
	bw.WriteString("\r\n")
}

func sanitizeValue(v string) string {
	return strings.NewReplacer("\r", " ", "\n", " ").Replace(v)
}

// now is the Date header's value, formatted once a second.
func (h *h1conn) now() []byte {
	t := time.Now()
	if s := t.Unix(); s != h.dateSec || h.date == nil {
		h.dateSec = s
		h.date = t.UTC().AppendFormat(h.date[:0], http.TimeFormat)
	}
	return h.date
}

func (w *h1resp) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return 0, w.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if !w.bodyOK {
		return 0, http.ErrBodyNotAllowed
	}
	if w.cl >= 0 && w.written+int64(len(p)) > w.cl {
		return 0, http.ErrContentLength
	}
	w.written += int64(len(p))
	if w.head {
		return len(p), nil
	}
	bw := w.h.bw
	if w.chunked {
		var b [20]byte
		bw.Write(strconv.AppendInt(b[:0], int64(len(p)), 16))
		bw.WriteString("\r\n")
	}
	n, err := bw.Write(p)
	if w.chunked && err == nil {
		_, err = bw.WriteString("\r\n")
	}
	if err != nil {
		w.err = err
	}
	return n, err
}

// Flush sends what is buffered (http.Flusher).
func (w *h1resp) Flush() { w.FlushError() }

// FlushError is Flush with its error (http.ResponseController).
func (w *h1resp) FlushError() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return w.err
	}
	if err := w.h.bw.Flush(); err != nil {
		w.err = err
	}
	return w.err
}

// finish ends the response after the handler: the last chunk and the
// trailers, the flush; whether the connection carries another request.
func (w *h1resp) finish() bool {
	if !w.wroteHeader {
		if w.header.Get("Content-Length") == "" && !w.head {
			w.header.Set("Content-Length", "0") // nothing written (net/http's)
		}
		w.WriteHeader(http.StatusOK)
	}
	bw := w.h.bw
	if w.chunked && w.err == nil {
		bw.WriteString("0\r\n")
		for _, k := range w.trailers {
			for _, v := range w.header[k] {
				w.writeField(k, v)
			}
		}
		for k, vs := range w.header {
			if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
				for _, v := range vs {
					w.writeField(name, v)
				}
			}
		}
		bw.WriteString("\r\n")
	}
	if w.err == nil {
		if err := bw.Flush(); err != nil {
			w.err = err
		}
	}
	if w.cl >= 0 && w.bodyOK && !w.head && w.written != w.cl {
		return false // short of its Content-Length: the client sees the cut
	}
	return w.err == nil && !w.closeAfter
}

func (w *h1resp) writeField(k, v string) {
	if !httpguts.ValidHeaderFieldName(k) {
		return
	}
	bw := w.h.bw
	bw.WriteString(k)
	bw.WriteString(": ")
	bw.WriteString(sanitizeValue(strings.TrimSpace(v)))
	bw.WriteString("\r\n")
}
