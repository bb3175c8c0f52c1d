package waypoint

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	pathpkg "path"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// record is what one request leaves for metrics and the access log.
type record struct {
	start       time.Time
	ds          *downstream
	r           *http.Request
	protocol    string // "http" or "grpc"
	code        int
	flags       []string
	details     string
	route       string
	cluster     *clusterView
	clusterName string
	host        *host
	service     string
	policy      string // the AuthorizationPolicy that decided RBAC ("<ns>/<name>"), if one did
	requestID   string
	traceparent string
	upstreamMs  int64
	attempts    int
	reqBytes    countingBody
}

func (rec *record) flag(f string) {
	for _, x := range rec.flags {
		if x == f {
			return
		}
	}
	rec.flags = append(rec.flags, f)
}

func (rec *record) flagString() string {
	if len(rec.flags) == 0 {
		return "-"
	}
	return strings.Join(rec.flags, ",")
}

// countingBody counts request body bytes read, and keeps the first read
// error other than io.EOF: the client's (a malformed chunk, a body over
// MaxRequestBodyBytes, a client gone), not the upstream's.
type countingBody struct {
	io.ReadCloser
	n   atomic.Int64
	err atomic.Pointer[error]
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	if err != nil && err != io.EOF && c.err.Load() == nil {
		c.err.Store(&err)
	}
	return n, err
}

// failed is the body's read error (nil: none).
func (c *countingBody) failed() error {
	if e := c.err.Load(); e != nil {
		return *e
	}
	return nil
}

// bodyError answers a request whose body could not be read from the
// client: 413 over MaxRequestBodyBytes (the connection ends after it, as
// net/http's MaxBytesReader has it), else 400 (DPE, a downstream protocol
// error, as Envoy flags it).
func bodyError(w *respWriter, rec *record, err error) {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		if t, ok := w.ResponseWriter.(interface{ requestTooLarge() }); ok {
			t.requestTooLarge()
		}
		localReply(w, rec, http.StatusRequestEntityTooLarge, "", "request_payload_too_large", "Payload Too Large")
		return
	}
	w.Header().Set("Connection", "close")
	localReply(w, rec, http.StatusBadRequest, "DPE", "downstream_body_error", "")
}

// respWriter counts response bytes and remembers whether headers went out.
type respWriter struct {
	http.ResponseWriter
	code  int
	bytes int64
}

func (w *respWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *respWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.bytes += int64(n)
	return n, err
}

func (w *respWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// localReply answers from the waypoint itself (Envoy's local replies).
func localReply(w *respWriter, rec *record, code int, flag, details, body string) {
	rec.code = code
	if flag != "" {
		rec.flag(flag)
	}
	rec.details = details
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	io.WriteString(w, body)
}

func newRequestID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// childTraceParent continues the caller's W3C trace with a new span (the
// waypoint's), or starts a sampled trace when tp is absent or malformed.
func childTraceParent(tp string) string {
	parts := strings.Split(tp, "-")
	if len(parts) == 4 && parts[0] == "00" && len(parts[1]) == 32 && len(parts[2]) == 16 && len(parts[3]) == 2 &&
		isHex(parts[1]) && isHex(parts[3]) && parts[1] != strings.Repeat("0", 32) {
		return "00-" + parts[1] + "-" + randHex(8) + "-" + parts[3]
	}
	return "00-" + randHex(16) + "-" + randHex(8) + "-01"
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil && strings.ToLower(s) == s
}

// serveHTTP is the HTTP connection manager + router for one request.
func (p *Proxy) serveHTTP(w http.ResponseWriter, r *http.Request, ds *downstream) {
	rw := &respWriter{ResponseWriter: w}
	rec := &record{start: time.Now(), ds: ds, r: r, protocol: "http"}
	if isGRPC(r) {
		rec.protocol = "grpc"
	}
	defer func() { p.finish(rec, rw) }()
	snap := p.snap.Load()
	if r.ProtoMajor == 1 && ds.framing != nil {
		// What net/http hides (framing): a Transfer-Encoding with a
		// Content-Length, or on HTTP/1.0, is refused, as Envoy does (RFC
		// 9112 6.1, 6.3: the framing is faulty; a proxy that framed by the
		// other header would see other requests).
		te, withCL := ds.framing.transferEncoding(ds.h1Requests.Add(1))
		switch {
		case te && withCL:
			w.Header().Set("Connection", "close")
			localReply(rw, rec, http.StatusBadRequest, "", "http1.content_length_and_chunked_not_allowed", "Bad Request")
			return
		case te && r.ProtoMinor == 0:
			w.Header().Set("Connection", "close")
			localReply(rw, rec, http.StatusBadRequest, "", "http1.invalid_transfer_encoding", "Bad Request")
			return
		}
	}
	if r.ProtoMajor == 1 && len(r.TransferEncoding) > 0 {
		// Chunked: close after this response anyway, so that bytes another
		// parser framed differently never become a second request here
		// (and framing stops watching after this head).
		w.Header().Set("Connection", "close")
	}
	if p.draining.Load() {
		// Draining: the client reconnects, elsewhere once the control
		// plane has taken this waypoint out (HTTP/2: net/http sends GOAWAY).
		w.Header().Set("Connection", "close")
	}

	// A client's own X-Forwarded-Client-Cert claims an identity it never
	// proved: dropped, as Envoy's default (SANITIZE) does.
	r.Header.Del("X-Forwarded-Client-Cert")
	if r.Header.Get("X-Request-Id") == "" {
		r.Header.Set("X-Request-Id", newRequestID())
	}
	rec.requestID = r.Header.Get("X-Request-Id")
	rec.traceparent = childTraceParent(r.Header.Get("Traceparent"))
	r.Header.Set("Traceparent", rec.traceparent)
	if r.Body != nil && r.Body != http.NoBody {
		if p.cfg.MaxRequestBodyBytes > 0 {
			if r.ContentLength > p.cfg.MaxRequestBodyBytes {
				localReply(rw, rec, http.StatusRequestEntityTooLarge, "", "request_payload_too_large", "Payload Too Large")
				return
			}
			r.Body = http.MaxBytesReader(w, r.Body, p.cfg.MaxRequestBodyBytes)
		}
		rec.reqBytes.ReadCloser = r.Body
		r.Body = &rec.reqBytes
	}

	if !normalizePath(r) {
		localReply(rw, rec, http.StatusBadRequest, "", "path_normalization_failed", "Bad Request")
		return
	}

	chain := snap.chainFor(ds.target)
	if chain == nil || chain.http == nil {
		localReply(rw, rec, http.StatusServiceUnavailable, "NR", "filter_chain_not_found", "no filter chain")
		return
	}
	hc := chain.http
	rec.service = chain.service
	in := &rbacInput{r: r, principal: ds.principal(), port: uint32(ds.target.Port())}
	for _, f := range hc.rbac {
		deny, policy := f.decide(in)
		if policy != "" {
			rec.policy = policy // the last deciding one: a DENY's, or the ALLOW that let it through
		}
		if deny {
			localReply(rw, rec, http.StatusForbidden, "", "rbac_access_denied", "RBAC: access denied")
			return
		}
	}
	vh := hc.routes.pick(r.Host)
	var rt *route
	if vh != nil {
		for _, x := range vh.routes {
			if x.match.match(r) {
				rt = x
				break
			}
		}
	}
	if rt == nil {
		localReply(rw, rec, http.StatusNotFound, "NR", "route_not_found", "")
		return
	}
	rec.route = rt.name
	table := hc.routes
	respMods := func(h http.Header, wc *weightedCluster) {
		if wc != nil {
			applyHeaders(h, wc.mods.respRemove, wc.mods.respAdd)
		}
		applyHeaders(h, rt.mods.respRemove, rt.mods.respAdd)
		applyHeaders(h, vh.mods.respRemove, vh.mods.respAdd)
		applyHeaders(h, table.mods.respRemove, table.mods.respAdd)
	}
	switch {
	case rt.direct != nil:
		respMods(rw.Header(), nil)
		localReply(rw, rec, rt.direct.status, "", "direct_response", rt.direct.body)
		return
	case rt.redirect != nil:
		respMods(rw.Header(), nil)
		rw.Header().Set("Location", redirectLocation(rt.redirect, rt.match, r))
		localReply(rw, rec, rt.redirect.code, "", "redirect", "")
		return
	}
	ra := rt.action
	wc := ra.pickCluster()
	rec.clusterName = wc.name
	if s := serviceFromCluster(wc.name); s != "" {
		rec.service = s
	}
	applyHeaders(r.Header, wc.mods.reqRemove, wc.mods.reqAdd)
	applyHeaders(r.Header, rt.mods.reqRemove, rt.mods.reqAdd)
	applyHeaders(r.Header, vh.mods.reqRemove, vh.mods.reqAdd)
	applyHeaders(r.Header, table.mods.reqRemove, table.mods.reqAdd)
	rewritePath(ra, rt.match, r)
	if ra.hostRewrite != "" {
		r.Host = ra.hostRewrite
	}
	v := snap.clusters[wc.name]
	if v == nil {
		localReply(rw, rec, ra.notFoundCode, "NC", "cluster_not_found", "")
		return
	}
	rec.cluster = v
	p.forward(rw, r, rec, ra, v, snap, hc.streamIdleTimeout, func(h http.Header) { respMods(h, wc) })
}

func redirectLocation(ra *redirectAction, m *routeMatch, r *http.Request) string {
	scheme := "http"
	if ra.scheme != "" {
		scheme = ra.scheme
	}
	host := r.Host
	if ra.host != "" {
		if _, port, err := net.SplitHostPort(host); err == nil && !strings.Contains(ra.host, ":") {
			host = net.JoinHostPort(ra.host, port)
		} else {
			host = ra.host
		}
	}
	if ra.port != 0 {
		h := host
		if hh, _, err := net.SplitHostPort(host); err == nil {
			h = hh
		}
		host = net.JoinHostPort(h, strconv.Itoa(int(ra.port)))
	}
	if hh, port, err := net.SplitHostPort(host); err == nil && ((scheme == "http" && port == "80") || (scheme == "https" && port == "443")) {
		host = hh
	}
	path, query, _ := strings.Cut(r.URL.RequestURI(), "?")
	switch {
	case ra.path != "":
		path = ra.path
		if p, q, ok := strings.Cut(ra.path, "?"); ok {
			path, query = p, q
		}
	case ra.prefix != nil:
		rest, _ := trimPrefixFold(path, m.value, m.fold)
		path = *ra.prefix + rest
	}
	u := scheme + "://" + host + path
	if query != "" && !ra.stripQuery {
		u += "?" + query
	}
	return u
}

// normalizePath normalizes the request's path before policy and routing see
// it, as Istio's default (Envoy's normalize_path, plus merged slashes):
// dot segments are removed ("/a/../b" and "/a/%2e%2e/b" are "/b") and
// repeated slashes merged, and the normalized path is what goes upstream, so
// that the path an RBAC rule or a route matched is the path the backend
// serves. Escaped slashes and backslashes (%2F, %5C, \) are refused: a
// backend may decode them into separators that no rule saw. It reports
// false for a path it refuses.
func normalizePath(r *http.Request) bool {
	p := r.URL.Path
	if p == "" || p == "*" {
		return true
	}
	raw := r.URL.EscapedPath()
	if strings.ContainsRune(p, '\\') || containsFold(raw, "%2f") || containsFold(raw, "%5c") {
		return false
	}
	if p[0] != '/' {
		return false
	}
	clean := pathpkg.Clean(p)
	if strings.HasSuffix(p, "/") && clean != "/" {
		clean += "/"
	}
	if clean != p {
		r.URL.Path, r.URL.RawPath = clean, ""
	}
	return true
}

// containsFold reports whether s contains sub, ASCII case-insensitively.
func containsFold(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if strings.EqualFold(s[i:i+len(sub)], sub) {
			return true
		}
	}
	return false
}

// rewritePath applies prefix_rewrite or regex_rewrite to the path (the
// query is kept).
func rewritePath(ra *routeAction, m *routeMatch, r *http.Request) {
	if ra.prefixRewrite == nil && ra.regexRewrite == nil {
		return
	}
	path := r.URL.EscapedPath()
	switch {
	case ra.prefixRewrite != nil:
		rest, _ := trimPrefixFold(path, m.value, m.fold)
		path = *ra.prefixRewrite + rest
	case ra.regexRewrite != nil:
		path = ra.regexRewrite.ReplaceAllString(path, ra.regexSubst)
	}
	if path == "" {
		path = "/"
	}
	r.URL.RawPath = ""
	r.URL.Path = path
	if u, err := r.URL.Parse(path); err == nil {
		r.URL.Path, r.URL.RawPath = u.Path, u.RawPath
	}
}

var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade"}

func removeHopHeaders(h http.Header) {
	for _, f := range h.Values("Connection") {
		for _, sf := range strings.Split(f, ",") {
			if sf = strings.TrimSpace(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
	te := h.Get("Te")
	for _, n := range hopHeaders {
		h.Del(n)
	}
	if strings.Contains(strings.ToLower(te), "trailers") {
		h.Set("Te", "trailers") // gRPC needs it end to end
	}
}

// try outcome kinds.
const (
	tryOK       = iota
	tryConnect  // connect failure (UF)
	tryReset    // reset or disconnect before headers (UR)
	tryRefused  // HTTP/2 REFUSED_STREAM
	tryPerTry   // per-try timeout (UT, retriable as 504)
	tryCanceled // the route timeout or the client ended the request
)

type tryResult struct {
	kind   int
	resp   *http.Response
	err    error
	finish func() // releases the attempt; call after the body is done
}

// try sends one attempt to h with an optional per-try timeout covering
// the wait for response headers.
func (p *Proxy) try(ctx context.Context, v *clusterView, h *host, req *http.Request, body io.ReadCloser, perTry time.Duration, h2 bool) tryResult {
	// Its own context only with a per-try timeout to cancel it: otherwise
	// ctx already ends it (and the pools let go of it once the body is
	// done).
	tctx, cancel := ctx, context.CancelFunc(func() {})
	if perTry > 0 {
		tctx, cancel = context.WithCancel(ctx)
	}
	var state atomic.Int32 // 0 waiting, 1 headers, 2 timed out
	var timer *time.Timer
	if perTry > 0 {
		timer = time.AfterFunc(perTry, func() {
			if state.CompareAndSwap(0, 2) {
				cancel()
			}
		})
	}
	out := req.WithContext(tctx) // a shallow copy: the pools do not change the request
	out.Body = body
	if body == nil {
		out.Body = http.NoBody
	}
	h.active.Add(1)
	resp, err := p.roundTripper(v, h, h2).RoundTrip(out)
	done := func() { h.active.Add(-1); cancel() }
	if !state.CompareAndSwap(0, 1) {
		if resp != nil {
			resp.Body.Close()
		}
		done()
		return tryResult{kind: tryPerTry, err: context.DeadlineExceeded}
	}
	if timer != nil {
		timer.Stop()
	}
	if err != nil {
		done()
		var ce *connectError
		var se http2.StreamError
		switch {
		case ctx.Err() != nil:
			return tryResult{kind: tryCanceled, err: err}
		case errors.As(err, &ce):
			return tryResult{kind: tryConnect, err: err}
		case errors.As(err, &se) && se.Code == http2.ErrCodeRefusedStream,
			strings.Contains(err.Error(), "REFUSED_STREAM"): // net/http's bundled HTTP/2 has its own error type
			return tryResult{kind: tryRefused, err: err}
		default:
			return tryResult{kind: tryReset, err: err}
		}
	}
	return tryResult{kind: tryOK, resp: resp, finish: done}
}

var grpcRetryBits = map[string]int{"1": retryGRPCCancelled, "4": retryGRPCDeadline, "8": retryGRPCResource, "14": retryGRPCUnavailable}

// retriable applies retry_on to an attempt's outcome.
func (rp *retryPolicy) retriable(t tryResult) bool {
	on := rp.on
	switch t.kind {
	case tryConnect:
		return on&(retry5xx|retryGatewayError|retryConnectFailure|retryReset) != 0
	case tryReset:
		return on&(retry5xx|retryGatewayError|retryReset) != 0
	case tryRefused:
		return on&(retry5xx|retryGatewayError|retryReset|retryRefusedStream) != 0
	case tryPerTry:
		return on&(retry5xx|retryGatewayError|retryReset) != 0
	case tryCanceled:
		return false
	}
	code := t.resp.StatusCode
	switch {
	case on&retry5xx != 0 && code >= 500:
		return true
	case on&retryGatewayError != 0 && code >= 502 && code <= 504:
		return true
	case on&retryStatusCodes != 0 && rp.codes[code]:
		return true
	}
	if bit, ok := grpcRetryBits[t.resp.Header.Get("Grpc-Status")]; ok && on&bit != 0 {
		return true
	}
	return false
}

// backoff is Envoy's fully jittered exponential backoff for retry n (1..).
func (rp *retryPolicy) backoff(n int) time.Duration {
	ceil := rp.base << min(n, 20)
	if ceil > rp.max || ceil <= 0 {
		ceil = rp.max
	}
	return time.Duration(mrand.Int64N(int64(ceil) + 1))
}

func outcomeOf(t tryResult) int {
	switch t.kind {
	case tryOK:
		switch c := t.resp.StatusCode; {
		case c >= 502 && c <= 504:
			return outcomeGateway
		case c >= 500:
			return outcome5xx
		}
		return outcomeOK
	case tryCanceled:
		return -1
	}
	return outcomeGateway // local-origin failures count as 503 (Envoy, without split_external_local_origin_errors)
}

// forward is the router: retries, timeouts, circuit breakers, outlier
// detection, mirroring, and the streamed response.
func (p *Proxy) forward(w *respWriter, r *http.Request, rec *record, ra *routeAction, v *clusterView, snap *snapshot,
	streamIdle time.Duration, respMods func(http.Header)) {
	ctx := r.Context()
	if ra.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, ra.timeout)
		defer cancel()
	}
	// stream_idle_timeout: no progress from the upstream for this long
	// (waiting for headers, or between body reads) ends the stream.
	var idle *time.Timer
	if streamIdle > 0 {
		var cancel context.CancelCauseFunc
		ctx, cancel = context.WithCancelCause(ctx)
		defer cancel(nil)
		idle = time.AfterFunc(streamIdle, func() { cancel(errStreamIdle) })
		defer idle.Stop()
	}
	h2 := v.s.proto == protoHTTP2 || (v.s.proto == protoDownstream && r.ProtoMajor == 2)
	out := r.Clone(ctx)
	out.RequestURI = ""
	out.URL.Scheme = "http"
	out.URL.Host = "upstream" // pools are per host already; this only names the pool
	if r.Host == "" {
		out.Host = v.s.service
	}
	out.Close = false
	removeHopHeaders(out.Header)
	if out.Header.Get("X-Forwarded-Proto") == "" {
		out.Header.Set("X-Forwarded-Proto", "http")
	}

	// The body: buffered (replayable) when small and a retry or mirror may
	// need it, else streamed once.
	var buf []byte
	replayable := r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0
	var stream io.ReadCloser
	if !replayable {
		if ra.retry != nil || len(ra.mirrors) > 0 {
			if r.ContentLength <= p.cfg.RetryBufferBytes {
				// Sized from Content-Length: one allocation, no growth.
				bb := bytes.NewBuffer(make([]byte, 0, max(r.ContentLength, 0)+bytes.MinRead))
				_, err := bb.ReadFrom(io.LimitReader(r.Body, p.cfg.RetryBufferBytes+1))
				b := bb.Bytes()
				if err != nil {
					bodyError(w, rec, err)
					return
				}
				buf = b
				if int64(len(b)) <= p.cfg.RetryBufferBytes {
					replayable = true
				} else {
					stream = struct {
						io.Reader
						io.Closer
					}{io.MultiReader(bytes.NewReader(b), r.Body), r.Body}
				}
			} else {
				stream = r.Body
			}
		} else {
			stream = r.Body
		}
	}
	bodyFor := func() io.ReadCloser {
		if !replayable {
			s := stream
			stream = nil // once
			return s
		}
		if len(buf) == 0 {
			return nil
		}
		return io.NopCloser(bytes.NewReader(buf))
	}
	if replayable {
		out.ContentLength = int64(len(buf))
		if r.Body == nil || r.Body == http.NoBody {
			out.ContentLength = r.ContentLength
		}
		out.GetBody = nil
		if len(buf) > 0 { // the pool may resend it on a fresh connection
			out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf)), nil }
		}
	}
	if replayable {
		for _, m := range ra.mirrors {
			if mv := snap.clusters[m.cluster]; mv != nil && mrand.Uint64N(m.den) < m.num {
				p.mirror(out, buf, mv, ra.timeout)
			}
		}
	}

	numRetries := 0
	var perTry time.Duration
	if rp := ra.retry; rp != nil {
		numRetries, perTry = rp.numRetries, rp.perTryTimeout
	}
	var tried []*host
	var res tryResult
	upstart := time.Now()
	for attempt := 0; ; attempt++ {
		rec.attempts = attempt + 1
		var avoid []*host
		if ra.retry != nil && ra.retry.previousHosts {
			avoid = tried
		}
		h := v.pick(time.Now(), avoid)
		if h == nil {
			localReply(w, rec, http.StatusServiceUnavailable, "UH", "no_healthy_upstream", "no healthy upstream")
			return
		}
		rec.host = h
		tried = append(tried, h)
		release, err := v.admit(ctx, h2)
		if err != nil {
			if errors.Is(err, errOverflow) {
				localReply(w, rec, http.StatusServiceUnavailable, "UO", "upstream_reset_before_response_started{overflow}",
					"upstream connect error or disconnect/reset before headers. reset reason: overflow")
			} else {
				p.canceled(ctx, w, r, rec)
			}
			return
		}
		if idle != nil {
			idle.Reset(streamIdle)
		}
		res = p.try(ctx, v, h, out, bodyFor(), perTry, h2)
		if res.kind != tryOK {
			release()
		} else {
			fin := res.finish
			res.finish = func() { fin(); release() }
		}
		if res.kind != tryOK && res.kind != tryCanceled {
			if err := rec.reqBytes.failed(); err != nil {
				// The client's body failed the attempt: its error, not
				// the upstream's (no UR, no outlier detection).
				bodyError(w, rec, err)
				return
			}
		}
		if o := outcomeOf(res); o >= 0 {
			v.report(h, o, time.Now())
		}
		if ra.retry == nil || !ra.retry.retriable(res) {
			break
		}
		if attempt >= numRetries || !replayable {
			if attempt >= numRetries && numRetries > 0 {
				rec.flag("URX")
			}
			break
		}
		if !v.admitRetry() {
			break // max_retries overflow: keep this answer
		}
		if res.resp != nil {
			io.Copy(io.Discard, io.LimitReader(res.resp.Body, 4<<10))
			res.resp.Body.Close()
			res.finish()
		}
		wait := ra.retry.backoff(attempt + 1)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			v.c.retries.Add(-1)
			p.canceled(ctx, w, r, rec)
			return
		}
		v.c.retries.Add(-1)
	}
	rec.upstreamMs = time.Since(upstart).Milliseconds()
	if res.err != nil {
		p.log.Debug("waypoint: upstream", "cluster", v.s.name, "host", hostAddr(rec.host), "err", res.err)
	}
	switch res.kind {
	case tryConnect:
		localReply(w, rec, http.StatusServiceUnavailable, "UF", "upstream_reset_before_response_started{connection_failure}",
			"upstream connect error or disconnect/reset before headers. reset reason: connection failure")
		return
	case tryReset, tryRefused:
		localReply(w, rec, http.StatusServiceUnavailable, "UR", "upstream_reset_before_response_started{remote_reset}",
			"upstream connect error or disconnect/reset before headers. reset reason: remote reset")
		return
	case tryPerTry:
		localReply(w, rec, http.StatusGatewayTimeout, "UT", "upstream_per_try_timeout", "upstream request timeout")
		return
	case tryCanceled:
		p.canceled(ctx, w, r, rec)
		return
	}
	resp := res.resp
	defer res.finish()
	defer resp.Body.Close()
	removeHopHeaders(resp.Header)
	for k, vs := range resp.Header {
		w.Header()[k] = vs
	}
	respMods(w.Header())
	for k := range resp.Trailer {
		w.Header().Add("Trailer", k)
	}
	w.Header().Set("X-Envoy-Upstream-Service-Time", strconv.FormatInt(rec.upstreamMs, 10))
	rec.code = resp.StatusCode
	w.WriteHeader(resp.StatusCode)
	flush := r.ProtoMajor == 2 || resp.ContentLength < 0
	bpp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bpp)
	bp := *bpp
	for {
		n, err := resp.Body.Read(bp)
		if idle != nil && n > 0 {
			idle.Reset(streamIdle)
		}
		if n > 0 {
			if _, werr := w.Write(bp[:n]); werr != nil {
				rec.flag("DC")
				return
			}
			if flush {
				w.Flush()
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			// Headers are out: the only honest answer is a reset.
			if errors.Is(context.Cause(ctx), errStreamIdle) {
				rec.flag("SI")
			} else if ctx.Err() != nil && r.Context().Err() == nil {
				rec.flag("UT")
			} else if r.Context().Err() != nil {
				rec.flag("DC")
			} else {
				rec.flag("UR")
			}
			panic(http.ErrAbortHandler)
		}
	}
	for k, vs := range resp.Trailer {
		w.Header()[http.TrailerPrefix+k] = vs
	}
}

var errStreamIdle = errors.New("stream idle timeout")

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// canceled answers when the route timeout fired (504 UT) or notes that
// the client went away (DC).
func (p *Proxy) canceled(ctx context.Context, w *respWriter, r *http.Request, rec *record) {
	if r.Context().Err() != nil {
		rec.code = 0
		rec.flag("DC")
		return
	}
	if errors.Is(context.Cause(ctx), errStreamIdle) {
		localReply(w, rec, http.StatusRequestTimeout, "SI", "stream_idle_timeout", "stream timeout")
		return
	}
	localReply(w, rec, http.StatusGatewayTimeout, "UT", "response_timeout", "upstream request timeout")
}

// mirror sends a copy of the request to mv, fire and forget, with
// "-shadow" appended to the host.
func (p *Proxy) mirror(out *http.Request, body []byte, mv *clusterView, timeout time.Duration) {
	if timeout <= 0 {
		timeout = defaultRouteTimeout
	}
	p.mu.Lock()
	if p.closed || p.bgCtx == nil {
		p.mu.Unlock()
		return
	}
	ctx := p.bgCtx
	p.bg.Add(1)
	p.mu.Unlock()
	m := out.Clone(ctx)
	m.Host = shadowHost(out.Host)
	h2 := mv.s.proto == protoHTTP2 || (mv.s.proto == protoDownstream && out.ProtoMajor == 2)
	go func() {
		defer p.bg.Done()
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		h := mv.pick(time.Now(), nil)
		if h == nil {
			return
		}
		release, err := mv.admit(ctx, h2)
		if err != nil {
			return
		}
		defer release()
		var b io.ReadCloser
		if len(body) > 0 {
			b = io.NopCloser(bytes.NewReader(body))
		}
		res := p.try(ctx, mv, h, m.WithContext(ctx), b, 0, h2)
		if res.kind == tryOK {
			io.Copy(io.Discard, res.resp.Body)
			res.resp.Body.Close()
			res.finish()
		}
		p.m.mirrored.WithLabelValues(mv.s.name, strconv.FormatBool(res.kind == tryOK)).Inc()
	}()
}

func shadowHost(h string) string {
	if host, port, err := net.SplitHostPort(h); err == nil {
		return net.JoinHostPort(host+"-shadow", port)
	}
	return h + "-shadow"
}
