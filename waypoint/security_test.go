package waypoint

import (
	"bufio"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

func principalIs(id string) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{
		PrincipalName: exact(id)}}}
}

func methodIs(m string) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: ":method",
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: exact(m)}}}}
}

func urlPrefix(p string) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{
		Rule: &matcherv3.PathMatcher_Path{Path: prefixSM(p)}}}}
}

func and(ps ...*rbacv3.Permission) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: ps}}}
}

// TestRBAC: the AuthorizationPolicy oracle: GET /userdata/* allowed for one
// identity (ALLOW filter), POST denied (DENY filter, evaluated first),
// another identity denied; 403 "RBAC: access denied".
func TestRBAC(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, whoami("data"))
	cl := clusterName(svc)
	other := wid(t, "shop", "other")
	deny := &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[no-post]-rule[0]": {Permissions: []*rbacv3.Permission{methodIs("POST")},
			Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}}}}}
	allow := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[userdata]-rule[0]": {Permissions: []*rbacv3.Permission{and(methodIs("GET"), urlPrefix("/userdata/"))},
			Principals: []*rbacv3.Principal{principalIs(e.cliID.String())}},
		"ns[shop]-policy[userdata]-rule[1]": {Permissions: []*rbacv3.Permission{methodIs("POST")},
			Principals: []*rbacv3.Principal{principalIs(e.cliID.String())}}}}
	rs := []Resource{res(listener(httpFC(testVIP, 80, svc, deny, allow))),
		res(routeConfig(chainName(80, svc), toCluster(prefixMatch("/"), cl))),
		res(edsCluster(cl)), res(cla(cl, ep{addr: b.addr}))}
	e.apply(rs...)
	me, them := e.client(e.cliID, target, false), e.client(other, target, true)
	if code, body, _ := get(t, me, "http://"+svc+"/userdata/1"); code != 200 || !strings.HasPrefix(body, "data") {
		t.Errorf("GET /userdata/1 as client: %d %q", code, body)
	}
	if code, body, _ := get(t, me, "http://"+svc+"/admin"); code != 403 || body != "RBAC: access denied" {
		t.Errorf("GET /admin as client: %d %q", code, body)
	}
	resp, err := me.Post("http://"+svc+"/userdata/1", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 403 || string(body) != "RBAC: access denied" {
		t.Errorf("POST as client (allowed by ALLOW, denied by DENY): %d %q", resp.StatusCode, body)
	}
	if code, _, _ := get(t, them, "http://"+svc+"/userdata/1"); code != 403 {
		t.Errorf("GET as another identity: %d", code)
	}
	if n := scrape(t, e.metric, "istio_requests_total", `response_code="403"`, `source_principal="spiffe://cluster.local/ns/shop/sa/other"`); n != 1 {
		t.Errorf("403 for other counted %v", n)
	}
}

// rawExchange writes raw bytes into a tunnel and reads one response.
func rawExchange(t *testing.T, e *env, req string) (*http.Response, string) {
	t.Helper()
	s := e.rawStream(target)
	s.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(s, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(s), nil)
	if err != nil {
		t.Fatalf("reading response to %q: %v", req, err)
	}
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// TestHostileInput: conflicting Content-Lengths are refused with 400 and
// never reach the backend; garbage is 400; oversized headers 431;
// oversized bodies 413. (Content-Length with Transfer-Encoding:
// TestSmuggling.)
func TestHostileInput(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxRequestBodyBytes = 1 << 20 })
	var seen []string
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		seen = append(seen, r.Method+" "+r.URL.Path)
		io.Copy(io.Discard, r.Body)
	})
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})...)
	for _, tc := range []struct {
		name, req string
		code      int
	}{
		{"two CLs", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400},
		{"garbage", "\x16\x03\x01 hello there\r\n\r\n", 400},
		{"bad header", "GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400},
		{"no host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"big header", "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 70<<10) + "\r\n\r\n", 431},
		{"big body", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413},
	} {
		resp, _ := rawExchange(t, e, tc.req)
		if resp.StatusCode != tc.code {
			t.Errorf("%s: %d, want %d", tc.name, resp.StatusCode, tc.code)
		}
	}
	if len(seen) != 0 {
		t.Errorf("backend saw %v", seen)
	}
	// A chunked body over the limit is cut at the limit: 413.
	c := e.client(e.cliID, target, true)
	resp, err := c.Post("http://"+svc+"/a", "text/plain", io.LimitReader(zeros{}, 2<<20))
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != 413 && resp.StatusCode != 503 {
			t.Errorf("streamed oversized body: %d", resp.StatusCode)
		}
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestPathNormalization: a DENY on /admin* and an ALLOW on /public/* cannot
// be walked around with dot segments (plain or percent-encoded) or repeated
// slashes; the backend gets the normalized path the rules saw; escaped
// slashes and backslashes are refused. Without normalization the first three
// requests pass the ALLOW and the backend serves /admin.
func TestPathNormalization(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, whoami("data"))
	cl := clusterName(svc)
	any := []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}}
	deny := &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[no-admin]-rule[0]": {Permissions: []*rbacv3.Permission{urlPrefix("/admin")}, Principals: any}}}
	allow := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[public]-rule[0]": {Permissions: []*rbacv3.Permission{urlPrefix("/public/")}, Principals: any}}}
	e.apply(res(listener(httpFC(testVIP, 80, svc, deny, allow))),
		res(routeConfig(chainName(80, svc), toCluster(prefixMatch("/"), cl))),
		res(edsCluster(cl)), res(cla(cl, ep{addr: b.addr})))
	for _, c := range []struct {
		path     string
		code     int
		upstream string // the path the backend saw, for 200s
	}{
		{"/public/../admin", 403, ""},
		{"/public/%2e%2e/admin", 403, ""},
		{"/public/%2E%2E/admin/x", 403, ""},
		{"//admin", 403, ""},
		{"/public/./a//b/", 200, "/public/a/b/"},
		{"/public/a?q=1", 200, "/public/a?q=1"},
		{"/public/a%2Fb", 400, ""},
		{"/public/a%5cb", 400, ""},
		{"/public/a\\b", 400, ""},
		{"/public/../public/ok", 200, "/public/ok"},
	} {
		resp, _ := rawExchange(t, e, "GET "+c.path+" HTTP/1.1\r\nHost: "+svc+"\r\n\r\n")
		if resp.StatusCode != c.code {
			t.Errorf("GET %s: %d, want %d", c.path, resp.StatusCode, c.code)
			continue
		}
		if c.upstream != "" {
			if got := resp.Header.Get("X-Seen-Path"); got != c.upstream {
				t.Errorf("GET %s: the backend saw %q, want %q", c.path, got, c.upstream)
			}
		}
	}
}

// TestXFCCSanitized: a client-supplied X-Forwarded-Client-Cert never reaches
// the backend (an app that trusts it would take the client's word for an
// identity).
func TestXFCCSanitized(t *testing.T) {
	e := newEnv(t, nil)
	b := newBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Xfcc", r.Header.Get("X-Forwarded-Client-Cert"))
	})
	cl := clusterName(svc)
	e.apply(res(listener(httpFC(testVIP, 80, svc))),
		res(routeConfig(chainName(80, svc), toCluster(prefixMatch("/"), cl))),
		res(edsCluster(cl)), res(cla(cl, ep{addr: b.addr})))
	resp, _ := rawExchange(t, e, "GET / HTTP/1.1\r\nHost: "+svc+"\r\nX-Forwarded-Client-Cert: By=spiffe://cluster.local/ns/shop/sa/admin\r\n\r\n")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if got := resp.Header.Get("X-Seen-Xfcc"); got != "" {
		t.Errorf("the backend saw X-Forwarded-Client-Cert %q", got)
	}
}
