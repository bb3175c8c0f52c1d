package ambitctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/ambitctl"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/istiod-lite/envoy"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/waypoint"
	"github.com/ambit-mesh/ambit/ztunnel"
)

// meshSnapshot translates testdata/mesh/mesh.yaml with the control plane's
// own translation.
func meshSnapshot(t *testing.T) *model.Snapshot {
	t.Helper()
	f, err := os.Open("testdata/mesh/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	objs, _, err := translate.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	o := translate.NewObjects()
	for _, obj := range objs {
		o.Set(obj)
	}
	return translate.Build(o, translate.Options{}).Snapshot
}

// runCLI runs ambitctl in-process.
func runCLI(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	code := ambitctl.Run(ctx, args, &out, &errb)
	return out.String(), errb.String(), code
}

func mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, code := runCLI(t, args...)
	if code != 0 {
		t.Fatalf("ambitctl %s: exit %d: %s", strings.Join(args, " "), code, errs)
	}
	return out
}

// waitAdmin waits until GET url answers 200 and cond holds on its body.
func waitAdmin(t *testing.T, url string, cond func([]byte) bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 && cond(b) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s (last error %v)", url, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// volatile masks what changes from run to run: serials, times, durations,
// ephemeral ports.
var volatile = []struct {
	re   *regexp.Regexp
	repl string
}{
	{regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)`), "<time>"},
	{regexp.MustCompile(`\b[0-9a-f]{16,40}\b`), "<serial>"},
	{regexp.MustCompile(`\b(\d+h)?(\d+m)?\d+(\.\d+)?(ms|s|µs)\b`), "<dur>"},
	{regexp.MustCompile(`(127\.\d+\.\d+\.\d+):(3[2-9]\d{3}|[4-6]\d{4})\b`), "$1:<port>"}, // ephemeral ports
}

// mask replaces volatile values and re-aligns nothing: the goldens hold
// the masked text (columns may shift by the masked width).
func mask(s string) string {
	for _, v := range volatile {
		s = v.re.ReplaceAllString(s, v.repl)
	}
	s = regexp.MustCompile(` +`).ReplaceAllString(s, " ")
	return regexp.MustCompile(`ESTABLISHED \d+ \d+`).ReplaceAllString(s, "ESTABLISHED <bytes> <bytes>")
}

// TestZtunnelConfig reads a real ztunnel's admin API (in-process, every
// workload local, certificates from a real certs.Manager) while a
// connection from the client pod is open through it.
func TestZtunnelConfig(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	ca, err := certs.NewSelfSignedCA(td, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mgr := &certs.Manager{Issuer: ca}
	t.Cleanup(func() { mgr.Close() })
	store := &model.Store{}
	store.Replace(meshSnapshot(t))

	ctx, cancel := context.WithCancel(t.Context())
	p, err := ztunnel.New(ctx, ztunnel.Config{Store: store, Certs: mgr, AdminAddr: "127.0.0.1:0", SOCKS5Addr: "127.0.0.1:0",
		HBONEAddr: "127.0.0.1:0", DrainTimeout: time.Second})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		p.Close()
		<-done
	})
	admin := p.Addr(ztunnel.ListenerAdmin).String()

	// a server outside the mesh and one connection to it through the SOCKS5
	// listener from the client pod's address: passthrough
	ln, err := net.Listen("tcp", "127.83.41.60:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	conn := socks5(t, p.Addr(ztunnel.ListenerSOCKS5).String(), netip.MustParseAddr("127.83.41.11"), ln.Addr().(*net.TCPAddr).AddrPort())
	defer conn.Close()
	msg := bytes.Repeat([]byte("x"), 1000)
	if _, err := conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(conn, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	// (byte counts are not asserted: the proxy adds them as the copy
	// loops flush, not per read)
	waitAdmin(t, "http://"+admin+"/debug/connections", func(b []byte) bool {
		return bytes.Contains(b, []byte(`"established": true`))
	})
	// the enrolled local identities' certificates (client, reviews)
	waitAdmin(t, "http://"+admin+"/debug/certificates", func(b []byte) bool {
		return bytes.Count(b, []byte(`"chainPem"`)) == 2
	})

	for _, typ := range []string{"workloads", "services", "policies", "certificates", "connections", "all"} {
		t.Run(typ, func(t *testing.T) {
			out := mustCLI(t, "ztunnel-config", typ, "--address", admin)
			if typ == "certificates" || typ == "connections" || typ == "all" {
				golden(t, "ztunnel-config-"+typ, mask(out))
			} else {
				golden(t, "ztunnel-config-"+typ, out)
			}
		})
	}

	t.Run("capture off", func(t *testing.T) {
		out := mustCLI(t, "ztunnel-config", "capture", "--address", admin)
		if !strings.HasPrefix(out, "CAPTURE: off") {
			t.Errorf("a ztunnel without --capture:\n%s", out)
		}
	})

	t.Run("connections content", func(t *testing.T) {
		out := mustCLI(t, "ztunnel-config", "connections", "--address", admin)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 2 {
			t.Fatalf("want one connection:\n%s", out)
		}
		for _, want := range []string{"outbound", "socks5", "127.83.41.11:", ln.Addr().String(), "spiffe://cluster.local/ns/shop/sa/client", "ESTABLISHED", "passthrough"} {
			if !strings.Contains(lines[1], want) {
				t.Errorf("connection row lacks %q:\n%s", want, out)
			}
		}
	})

	t.Run("json and yaml are the admin API's", func(t *testing.T) {
		var ws []map[string]any
		if err := json.Unmarshal([]byte(mustCLI(t, "ztunnel-config", "workloads", "--address", admin, "-o", "json")), &ws); err != nil {
			t.Fatal(err)
		}
		var wy []map[string]any
		if err := yaml.Unmarshal([]byte(mustCLI(t, "ztunnel-config", "workloads", "--address", admin, "-o", "yaml")), &wy); err != nil {
			t.Fatal(err)
		}
		if len(ws) != 4 || len(wy) != 4 || ws[0]["identity"] != wy[0]["identity"] || ws[0]["identity"] == nil {
			t.Errorf("json %v\nyaml %v", ws, wy)
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"ztunnel-config", "pods", "--address", admin}, `unknown config type "pods"`},
			{[]string{"ztunnel-config", "workloads", "--address", "127.0.0.1"}, "want host:port"},
			{[]string{"ztunnel-config", "workloads", "--address", admin, "-o", "xml"}, "unknown output format"},
		} {
			_, errs, code := runCLI(t, tc.args...)
			if code == 0 || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
				t.Errorf("%v: exit %d, stderr %q; want one line with %q", tc.args, code, errs, tc.want)
			}
		}
		closed, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := closed.Addr().String()
		closed.Close()
		_, errs, _ := runCLI(t, "ztunnel-config", "workloads", "--address", addr)
		if !strings.Contains(errs, "cannot reach the admin API of "+addr) {
			t.Errorf("closed port: %q", errs)
		}
	})
}

// socks5 opens a connection to dst through the SOCKS5 proxy at proxy, from
// src.
func socks5(t *testing.T, proxy string, src netip.Addr, dst netip.AddrPort) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", proxy)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(15 * time.Second))
	ip := dst.Addr().As4()
	req := append([]byte{5, 1, 0, 5, 1, 0, 1}, ip[:]...)
	req = append(req, byte(dst.Port()>>8), byte(dst.Port()))
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	var rep [2 + 10]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		t.Fatal(err)
	}
	if rep[3] != 0 {
		t.Fatalf("socks5 reply %d", rep[3])
	}
	c.SetDeadline(time.Time{})
	return c
}

// TestProxyConfig reads a real waypoint's admin API, configured with what
// istiod-lite builds for the mesh's waypoint.
func TestProxyConfig(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	ca, err := certs.NewSelfSignedCA(td, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mgr := &certs.Manager{Issuer: ca}
	t.Cleanup(func() { mgr.Close() })
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/waypoint")
	p, err := waypoint.New(waypoint.Config{Identity: id, Certs: mgr})
	if err != nil {
		t.Fatal(err)
	}
	res, err := envoy.ForWaypoint(meshSnapshot(t), envoy.Waypoint{Namespace: "shop", Name: "waypoint"})
	if err != nil {
		t.Fatal(err)
	}
	var rs []waypoint.Resource
	add := func(m proto.Message) { rs = append(rs, waypoint.Resource{Version: "7", Resource: m}) }
	for _, x := range res.Listeners {
		add(x)
	}
	for _, x := range res.Routes {
		add(x)
	}
	for _, x := range res.Clusters {
		add(x)
	}
	for _, x := range res.Endpoints {
		add(x)
	}
	if err := p.Apply(rs); err != nil {
		t.Fatal(err)
	}
	listen := func() net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return ln
	}
	ls := waypoint.Listeners{HBONE: listen(), Admin: listen(), Metrics: listen(), Ready: listen()}
	admin := ls.Admin.Addr().String()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- p.Serve(ctx, ls) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	waitAdmin(t, "http://"+admin+"/clusters", func([]byte) bool { return true })

	for _, typ := range []string{"listeners", "routes", "clusters", "endpoints", "all"} {
		t.Run(typ, func(t *testing.T) {
			golden(t, "proxy-config-"+typ, mustCLI(t, "proxy-config", typ, "--address", admin))
		})
	}
	t.Run("json", func(t *testing.T) {
		var v []map[string]any
		if err := json.Unmarshal([]byte(mustCLI(t, "proxy-config", "routes", "--address", admin, "-o", "json")), &v); err != nil {
			t.Fatal(err)
		}
		if len(v) == 0 || v[0]["@type"] != nil || v[0]["name"] == nil {
			t.Errorf("routes as JSON: %v", v)
		}
		var e map[string]any
		if err := yaml.Unmarshal([]byte(mustCLI(t, "proxy-config", "endpoints", "--address", admin, "-o", "yaml")), &e); err != nil {
			t.Fatal(err)
		}
		if e["clusters"] == nil || e["clusterLoadAssignments"] == nil {
			t.Errorf("endpoints as YAML: %v", e)
		}
	})
	t.Run("ejection", func(t *testing.T) {
		// reviews-v1's DestinationRule ejects a host after one failure; its
		// only endpoint's HBONE port has nothing behind it
		d := &hbone.Dialer{Certs: mgr}
		defer d.Close()
		client := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client")
		hc := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.Dial(ctx, hbone.DialRequest{Source: client, Peers: []spiffeid.ID{id}, Addr: ls.HBONE.Addr().(*net.TCPAddr).AddrPort(),
				Target: netip.MustParseAddrPort("10.96.0.11:9080")})
		}}}
		defer hc.CloseIdleConnections()
		resp, err := hc.Get("http://reviews-v1.shop.svc.cluster.local:9080/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("status %d, want 503 (no endpoint listening)", resp.StatusCode)
		}
		out := mustCLI(t, "proxy-config", "endpoints", "--address", admin)
		if !regexp.MustCompile(`outbound\|9080\|\|reviews-v1\S+ +127\.83\.41\.21:8080 \(HBONE 15008\) +reviews-v1-0 +\S+ +EJECTED until \S+ +1 `).MatchString(out) {
			t.Errorf("reviews-v1's endpoint not shown ejected once:\n%s", out)
		}
		golden(t, "proxy-config-endpoints-ejected", mask(out))
		if out := mustCLI(t, "proxy-config", "clusters", "--address", admin); !regexp.MustCompile(`reviews-v1\S+ +EDS +ROUND_ROBIN +0/1 .* 1 5xx/10s +1\n`).MatchString(out) {
			t.Errorf("reviews-v1's cluster: want 0/1 healthy, outlier 1 5xx/10s, 1 ejection:\n%s", out)
		}
	})
	t.Run("needs a target", func(t *testing.T) {
		_, errs, code := runCLI(t, "proxy-config", "routes", "--kubeconfig", "/nonexistent")
		if code == 0 || !strings.Contains(errs, "which waypoint?") {
			t.Errorf("exit %d: %s", code, errs)
		}
	})
}
