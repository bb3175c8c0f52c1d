package waypoint

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// exchangeAll writes raw on one tunnelled connection and reads every
// response until the waypoint closes it.
func exchangeAll(t *testing.T, e *env, raw string) []*http.Response {
	t.Helper()
	s := e.rawStream(target)
	s.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(s, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(s)
	var out []*http.Response
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("%q: the connection stayed open after %d responses", raw, len(out))
			}
			return out
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body = io.NopCloser(bytes.NewReader(b))
		out = append(out, resp)
		if resp.Close {
			if _, err := br.ReadByte(); err == nil {
				t.Errorf("%q: bytes after a Connection: close response", raw)
			}
			return out
		}
	}
}

// TestSmuggling: at the byte level, a request with both Content-Length and
// Transfer-Encoding (either order, any case), or with a Transfer-Encoding
// on HTTP/1.0, is refused with 400 and the connection closed; nothing of it
// reaches the backend, and the requests before it on the connection are
// served. Content-Length bodies that look like such heads are data.
func TestSmuggling(t *testing.T) {
	e := newEnv(t, nil)
	var mu sync.Mutex
	var seen []string
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		seen = append(seen, fmt.Sprintf("%s %s %d", r.Method, r.URL.Path, len(body)))
		mu.Unlock()
	})
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})...)
	smuggled := "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
	clte := fmt.Sprintf("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s", 5+len(smuggled), smuggled)
	tecl := fmt.Sprintf("POST /a HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: %d\r\n\r\n0\r\n\r\n%s", 5+len(smuggled), smuggled)
	// A Content-Length body holding what looks like a CL+TE head.
	lookalike := "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
	for _, tc := range []struct {
		name  string
		raw   string
		codes []int
		seen  []string
	}{
		{"CL.TE", clte, []int{400}, nil},
		{"TE.CL", tecl, []int{400}, nil},
		{"after a good request", "GET /first HTTP/1.1\r\nHost: x\r\n\r\n" + clte, []int{200, 400}, []string{"GET /first 0"}},
		{"after a body", "POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + tecl, []int{200, 400}, []string{"POST /first 3"}},
		{"HTTP/1.0 with TE", "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", []int{400}, nil},
		{"chunked alone", "POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + smuggled, []int{200}, []string{"POST /c 3"}},
		{"lookalike body", fmt.Sprintf("POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%sGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", len(lookalike), lookalike),
			[]int{200, 200}, []string{fmt.Sprintf("POST /b %d", len(lookalike)), "GET /after 0"}},
		{"OPTIONS * first", "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n" + clte, []int{404, 400}, nil}, // no route for "*"
	} {
		mu.Lock()
		seen = nil
		mu.Unlock()
		resps := exchangeAll(t, e, tc.raw)
		var codes []int
		for _, r := range resps {
			codes = append(codes, r.StatusCode)
		}
		if fmt.Sprint(codes) != fmt.Sprint(tc.codes) {
			t.Errorf("%s: codes %v, want %v", tc.name, codes, tc.codes)
		}
		if n := len(resps); n > 0 && resps[n-1].StatusCode == 400 && !resps[n-1].Close {
			t.Errorf("%s: the 400 does not close the connection", tc.name)
		}
		mu.Lock()
		got := fmt.Sprint(seen)
		mu.Unlock()
		if got != fmt.Sprint(tc.seen) {
			t.Errorf("%s: backend saw %s, want %v", tc.name, got, tc.seen)
		}
	}
	if !strings.Contains(e.logs.String(), "http1.content_length_and_chunked_not_allowed") {
		t.Error("no access-log line with the refusal's details")
	}
}

// FuzzFraming: framing's verdict does not depend on how the bytes are
// split across reads, and nothing panics.
func FuzzFraming(f *testing.F) {
	f.Add([]byte("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), uint8(7))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST / HTTP/1.0\r\nTransfer-Encoding: x\r\n\r\n"), uint8(1))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), uint8(3))
	f.Add([]byte("POST / HTTP/1.1\r\nContent-Length: 9999999999999999999999\r\n\r\n"), uint8(2))
	f.Fuzz(func(t *testing.T, in []byte, step uint8) {
		whole := newFraming(nil, 64)
		whole.watch(bytes.Clone(in))
		split := newFraming(nil, 64)
		n := int(step%16) + 1
		for b := in; len(b) > 0; {
			k := min(n, len(b))
			split.watch(bytes.Clone(b[:k]))
			b = b[k:]
		}
		if whole.teHead.Load() != split.teHead.Load() || whole.teWithCL.Load() != split.teWithCL.Load() || whole.heads != split.heads {
			t.Fatalf("whole: head %d te@%d cl %v; in %d-byte reads: head %d te@%d cl %v",
				whole.heads, whole.teHead.Load(), whole.teWithCL.Load(), n, split.heads, split.teHead.Load(), split.teWithCL.Load())
		}
	})
}
