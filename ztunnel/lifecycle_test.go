package ztunnel

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/ztunnel/configfile"
)

// TestDrain: when Run's context ends the proxy stops accepting, lets an
// open connection finish, and returns once it has.
func TestDrain(t *testing.T) {
	m := newTestMesh(t, nil)
	ip := m.net.ip
	// A server that answers only when told to, so the connection stays open
	// across the start of the drain.
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip(21), 7100).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	release := make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		<-release
		c.Write([]byte("late reply"))
	}()
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), netip.AddrPortFrom(ip(21), 7100).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, "connection established at node2", func() bool { return m.n2.p.connCount() == 1 })

	m.n1.cancel() // SIGTERM
	waitFor(t, "node1 draining", func() bool { return m.n1.p.draining.Load() })
	if code, _ := httpGet(t, m.n1.p.Addr(ListenerReady), "/healthz/ready"); code != 503 {
		t.Errorf("readiness while draining: %d", code)
	}
	if c2, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), m.vip.String()); err == nil {
		c2.Close()
		t.Fatal("a new connection was accepted while draining")
	}
	select {
	case err := <-m.n1.done:
		t.Fatalf("Run returned (%v) with a connection open", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "late reply" {
		t.Fatalf("reply during drain: %q, %v", got, err)
	}
	c.Close()
	select {
	case err := <-m.n1.done:
		m.n1.done <- err // for the cleanup
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the last connection closed")
	}
}

// TestDrainDeadline: connections still open at the deadline are closed.
func TestDrainDeadline(t *testing.T) {
	m := newTestMesh(t, func(c *Config) { c.DrainTimeout = 300 * time.Millisecond })
	ip := m.net.ip
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip(21), 7101).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			defer c.Close()
			io.Copy(io.Discard, c) // never answers
		}
	}()
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), netip.AddrPortFrom(ip(21), 7101).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, "connection established", func() bool { return m.n2.p.connCount() == 1 })
	start := time.Now()
	m.n1.cancel()
	select {
	case err := <-m.n1.done:
		m.n1.done <- err
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return at the drain deadline")
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Errorf("returned after %s, before the deadline", d)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after the drain deadline")
	}
	if !strings.Contains(m.n1.logs.String(), `"outcome":"aborted"`) {
		t.Errorf("the aborted connection was not logged as such")
	}
}

func TestAdminMetricsReadiness(t *testing.T) {
	store := &model.Store{}
	cs := newTestCerts(t, "cluster.local")
	n := newTestNet()
	w := &model.Workload{UID: "u1", Name: "a", Namespace: "ns", ServiceAccount: "sa", Node: "n", Addresses: []netip.Addr{n.ip(5)}, Enrolled: true, Ready: true}
	synced := make(chan struct{})
	node := startNode(t, "n", store, cs, func(c *Config) {
		c.Synced = func() bool {
			select {
			case <-synced:
				return true
			default:
				return false
			}
		}
	})
	if code, body := httpGet(t, node.p.Addr(ListenerReady), "/healthz/ready"); code != 503 || body != "" { // readiness tells nothing but its status
		t.Fatalf("ready before config: %d %q", code, body)
	}
	store.Replace(model.NewSnapshot([]*model.Workload{w}, nil,
		[]*model.Policy{{Name: "p", Namespace: "ns", Action: model.ActionDeny}}, nil))
	close(synced)
	if code, _ := httpGet(t, node.p.Addr(ListenerReady), "/healthz/ready"); code != 200 {
		t.Fatalf("ready after config: %d", code)
	}
	waitFor(t, "identities handed to the certificate manager", func() bool {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		return len(cs.asked) == 1 && cs.asked[0] == spiffeid.RequireFromString("spiffe://cluster.local/ns/ns/sa/sa")
	})

	var workloads []map[string]any
	_, body := httpGet(t, node.p.Addr(ListenerAdmin), "/debug/workloads")
	if err := json.Unmarshal([]byte(body), &workloads); err != nil || len(workloads) != 1 || workloads[0]["local"] != true ||
		workloads[0]["identity"] != "spiffe://cluster.local/ns/ns/sa/sa" {
		t.Fatalf("workloads dump %s (%v)", body, err)
	}
	var certsDump []certDump
	_, body = httpGet(t, node.p.Addr(ListenerAdmin), "/debug/certificates")
	if err := json.Unmarshal([]byte(body), &certsDump); err != nil || len(certsDump) != 1 || certsDump[0].Expired ||
		time.Until(certsDump[0].NotAfter) < time.Hour {
		t.Fatalf("certificates dump %s (%v)", body, err)
	}
	_, body = httpGet(t, node.p.Addr(ListenerAdmin), "/debug/policies")
	if !strings.Contains(body, `"name": "p"`) {
		t.Fatalf("policies dump %s", body)
	}
	_, body = httpGet(t, node.p.Addr(ListenerAdmin), "/debug/config_dump")
	for _, k := range []string{"workloads", "services", "policies", "certificates", "connections"} {
		if !strings.Contains(body, `"`+k+`"`) {
			t.Errorf("config_dump lacks %s", k)
		}
	}
	if code, body := httpGet(t, node.p.Addr(ListenerMetrics), "/metrics"); code != 200 || !strings.Contains(body, "go_goroutines") {
		t.Fatalf("metrics: %d", code)
	}
	// Scrapes are answered uncompressed (no flate compressor kept per
	// scrape), even to a scraper that takes gzip, as Prometheus does.
	req, _ := http.NewRequest("GET", "http://"+node.p.Addr(ListenerMetrics).String()+"/metrics", nil)
	req.Header.Set("Accept-Encoding", "gzip")
	resp, err := (&http.Transport{DisableCompression: true}).RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if ce := resp.Header.Get("Content-Encoding"); ce != "" || resp.StatusCode != 200 {
		t.Errorf("metrics with Accept-Encoding gzip: %d, Content-Encoding %q; want 200 uncompressed", resp.StatusCode, ce)
	}
}

// TestLiveConnectionsDump: the admin API lists an open connection with its
// identities and bytes so far.
func TestLiveConnectionsDump(t *testing.T) {
	m := newTestMesh(t, nil)
	ip := m.net.ip
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip(21), 7102).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			defer c.Close()
			io.Copy(io.Discard, c)
		}
	}()
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), netip.AddrPortFrom(ip(21), 7102).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(make([]byte, 12345))
	var dump []connDump
	waitFor(t, "connection in the dump", func() bool {
		_, body := httpGet(t, m.n2.p.Addr(ListenerAdmin), "/debug/connections")
		dump = nil
		json.Unmarshal([]byte(body), &dump)
		return len(dump) == 1 && dump[0].BytesReceived == 12345
	})
	d := dump[0]
	if d.Direction != "inbound" || d.SrcPrincipal != "spiffe://cluster.local/ns/shop/sa/client" ||
		d.DstPrincipal != "spiffe://cluster.local/ns/shop/sa/server" || !strings.HasPrefix(d.Src, ip(11).String()+":") || !d.Established {
		t.Fatalf("dump %+v", d)
	}
}

// TestControlPlaneLoss: in local mode the config file is the control
// plane; when it breaks or disappears the proxies keep serving with the
// last good config and certificates, and pick up the next good one.
func TestControlPlaneLoss(t *testing.T) {
	m := newTestMesh(t, nil)
	snap := m.store.Load()
	file := configfile.File{}
	for _, w := range snap.Workloads {
		file.Workloads = append(file.Workloads, w)
	}
	file.Services = []*model.Service{m.svc}
	path := filepath.Join(t.TempDir(), "mesh.json")
	write := func(v any) {
		b, _ := json.Marshal(v)
		if err := os.WriteFile(path+".tmp", b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(path+".tmp", path); err != nil {
			t.Fatal(err)
		}
	}
	write(file)
	errs := make(chan error, 64)
	w := &configfile.Watcher{Path: path, Store: m.store, Interval: 10 * time.Millisecond,
		OnError: func(err error) {
			select {
			case errs <- err:
			default: // drained while waiting; older errors are stale
			}
		}}
	_, before := m.store.LoadVersion()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "the first load", func() bool { _, v := m.store.LoadVersion(); return v > before })
	try := func() error {
		c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], m.vip.String())
		if err != nil {
			return err
		}
		_, err = exchange(c, 64<<10, 64<<10, 3)
		return err
	}
	if err := try(); err != nil {
		t.Fatal(err)
	}
	// rejected waits until the watcher has looked at the file and rejected
	// it, then checks that the store kept the config it had.
	_, version := m.store.LoadVersion()
	rejected := func(what string, match func(error) bool) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case err := <-errs:
				if !match(err) {
					continue
				}
				if _, v := m.store.LoadVersion(); v != version {
					t.Fatalf("%s changed the store (version %d, was %d)", what, v, version)
				}
				return
			case <-deadline:
				t.Fatalf("timed out waiting for the watcher to reject %s", what)
			}
		}
	}
	// The control plane goes away: garbage, then nothing.
	if err := os.WriteFile(path+".tmp", []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
	rejected("the broken config", func(err error) bool { return strings.Contains(err.Error(), "parse config") })
	if err := try(); err != nil {
		t.Fatalf("after the config broke: %v", err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	rejected("the missing config", func(err error) bool { return errors.Is(err, fs.ErrNotExist) })
	if err := try(); err != nil {
		t.Fatalf("after the config vanished: %v", err)
	}
	// It comes back with a policy: applied.
	file.Policies = []*model.Policy{{Name: "deny-all", Namespace: "shop", Action: model.ActionDeny, Rules: []model.Rule{{}}}}
	write(file)
	waitFor(t, "policy applied", func() bool { return len(m.store.Load().Policies) == 1 })
	if err := try(); err == nil {
		t.Fatal("connection allowed after a deny-all policy arrived")
	}
}

// TestNoGoroutineLeak: after traffic (good and refused) and Close, the
// proxies' goroutines are gone.
func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		tb := &cleanupTB{TB: t}
		defer tb.cleanup()
		m := newTestMesh(tb, nil)
		for i := range 20 {
			src := m.client
			if i%2 == 1 {
				src = m.intruder
			}
			if i == 10 {
				m.setConfig([]*model.Policy{{Name: "deny-intruder", Namespace: "shop", Action: model.ActionDeny,
					Rules: []model.Rule{{From: []model.Source{{Namespaces: []string{"other"}}}}}}}, nil)
			}
			c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), src.Addresses[0], m.vip.String())
			if err == nil {
				exchange(c, 1000, 1000, uint64(i))
			}
		}
		// One connection left open: Close must end it.
		socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], m.vip.String())
	}()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before+2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before+2 {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines before, %d after:\n%s", before, n, buf[:runtime.Stack(buf, true)])
	}
}

// cleanupTB runs cleanups when its owner says so, not at the end of the test.
type cleanupTB struct {
	testing.TB
	fns []func()
}

func (c *cleanupTB) Cleanup(f func()) { c.fns = append(c.fns, f) }
func (c *cleanupTB) cleanup() {
	for i := len(c.fns) - 1; i >= 0; i-- {
		c.fns[i]()
	}
}

// TestDrainInbound: the destination proxy drains too: an open tunnel
// finishes after its Run's context ends (GOAWAY on the HBONE connection),
// while new tunnels to it are refused.
func TestDrainInbound(t *testing.T) {
	m := newTestMesh(t, nil)
	ip := m.net.ip
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip(21), 7103).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	release := make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		<-release
		c.Write([]byte("still here"))
	}()
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), netip.AddrPortFrom(ip(21), 7103).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, "tunnel established at node2", func() bool { return m.n2.p.connCount() == 1 })
	m.n2.cancel()
	waitFor(t, "node2 draining", func() bool { return m.n2.p.draining.Load() })
	if c2, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), m.vip.String()); err == nil {
		c2.Close()
		t.Fatal("a new tunnel reached the draining node")
	}
	close(release)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "still here" {
		t.Fatalf("reply during drain: %q, %v", got, err)
	}
	c.Close() // the server half-closed; the client closes its side too
	select {
	case err := <-m.n2.done:
		m.n2.done <- err
	case <-time.After(2 * time.Second): // well before the 5s drain deadline
		t.Fatal("node2's Run did not return after its last tunnel closed")
	}
}

func TestAdminOnlyOnLocalhost(t *testing.T) {
	_, err := New(t.Context(), Config{Store: &model.Store{}, AdminAddr: "0.0.0.0:0"})
	if err == nil || !strings.Contains(err.Error(), "localhost") {
		t.Fatalf("New with a wildcard admin address: %v", err)
	}
}
