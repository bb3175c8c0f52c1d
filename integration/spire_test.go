//go:build integration

package integration

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs/spire"
	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/mesh"
	"github.com/ambit-mesh/ambit/integration/netns"
	spireenv "github.com/ambit-mesh/ambit/integration/spire"
)

// spireTD is SPIRE's trust domain, and so the mesh's (istiod-lite's
// --trust-domain names the same one).
const spireTD = "spire.test"

// spireSVIDTTL is the workload entries' SVID lifetime: short, so that the
// scenario sees several rotations and an expiry.
const spireSVIDTTL = 20 * time.Second

// spireEnv is two nodes whose ztunnels take their identities from a SPIRE
// agent each (Delegated Identity API), istiod-lite in local mode serving
// xDS only (--identity=spire), a client pod on node-1 and a server pod on
// node-2.
type spireEnv struct {
	t        *testing.T
	m        *mesh.Mesh
	server   *spireenv.Server
	agents   map[string]*spireenv.Agent
	bundle   *x509bundle.Bundle
	client   *netns.Pod
	srv      *netns.Pod
	clientID spiffeid.ID
	serverID spiffeid.ID
	ports    atomic.Int32
	work     string // the mesh's WorkDir: logs
}

func TestSPIRE(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and eBPF")
	}
	e := setupSPIRE(t)
	target := netip.AddrPortFrom(e.srv.IP, 8080)

	t.Run("1-hbone-with-spire-svids", func(t *testing.T) {
		capFile := filepath.Join(t.TempDir(), "underlay.pcap")
		pc, err := e.m.Topo.Underlay.StartCapture("br0", capFile, "tcp")
		if err != nil {
			t.Fatal(err)
		}
		local, _, err := e.exchange(target, 64<<10)
		packets, perr := pc.Stop()
		if err != nil {
			t.Fatalf("client -> server: %v", err)
		}
		if perr != nil {
			t.Fatal(perr)
		}
		for _, p := range packets {
			if bytes.Contains(p.Payload, []byte(app.Marker)) {
				t.Errorf("plaintext payload on the underlay: %s", p)
			}
		}
		out := e.accessLog(t, "node-1", "outbound", local)
		if out.Route != "hbone" || out.SrcPrincipal != e.clientID.String() || out.DstPrincipal != e.serverID.String() || out.Outcome != "ok" {
			t.Errorf("node-1 outbound log: %+v", out)
		}
		in := e.accessLog(t, "node-2", "inbound", local)
		if in.Via != "hbone" || in.SrcPrincipal != e.clientID.String() || in.Outcome != "ok" {
			t.Errorf("node-2 inbound log: %+v", in)
		}
		// The server's certificate, as node-2's ztunnel presents it on
		// 15008, is a SPIRE SVID: it verifies against spire-server's bundle
		// and is the one node-2 holds.
		chain := e.serverChain(t, e.m.Topo.Nodes[0].NS, netip.AddrPortFrom(e.srv.IP, 15008))
		id, _, err := x509svid.Verify(chain, e.bundle)
		if err != nil || id != e.serverID {
			t.Fatalf("server's 15008 certificate against SPIRE's bundle: %s, %v", id, err)
		}
		if got := chain[0].SerialNumber.Text(16); !eventually(5*time.Second, func() bool { return e.held("node-2", e.serverID).Serial == got }) {
			t.Errorf("15008 presented serial %s, node-2 holds %+v", got, e.held("node-2", e.serverID))
		}
		// The client's SVID: what node-1's agent gives for its selectors
		// (this test is a delegate too) verifies against SPIRE's bundle and
		// is what node-1's ztunnel holds.
		p := &spire.Delegated{AdminSocket: e.agents["node-1"].AdminSocketPath()}
		defer p.Close()
		var sameSerial bool
		for range 3 { // a rotation may fall between the two reads
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			s, err := p.GetX509SVID(ctx, e.clientID)
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			if id, _, err := x509svid.Verify(s.Certificates, e.bundle); err != nil || id != e.clientID {
				t.Fatalf("client's SVID from SPIRE: %s, %v", id, err)
			}
			if sameSerial = e.held("node-1", e.clientID).Serial == s.Certificates[0].SerialNumber.Text(16); sameSerial {
				break
			}
			time.Sleep(time.Second)
		}
		if !sameSerial {
			t.Errorf("node-1 holds %+v, not the SVID its agent gives for the client", e.held("node-1", e.clientID))
		}
		if h := e.held("node-1", e.clientID); h.NotAfter.Sub(h.NotBefore) > spireSVIDTTL+time.Minute || h.Serial == "" {
			t.Errorf("node-1's client certificate is not the entry's %s SVID: %+v", spireSVIDTTL, h)
		}
	})

	t.Run("2-rotation-under-traffic", func(t *testing.T) {
		dur := 2*spireSVIDTTL + 5*time.Second
		var ok, failed atomic.Int64
		var firstErr atomic.Value
		stop := time.Now().Add(dur)
		var wg sync.WaitGroup
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(stop) {
					if _, _, err := e.exchange(target, 16<<10); err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
					} else {
						ok.Add(1)
					}
					time.Sleep(50 * time.Millisecond)
				}
			}()
		}
		serials := map[string]map[string]bool{"client": {}, "server": {}}
		for time.Now().Before(stop) {
			serials["client"][e.held("node-1", e.clientID).Serial] = true
			serials["server"][e.held("node-2", e.serverID).Serial] = true
			time.Sleep(250 * time.Millisecond)
		}
		wg.Wait()
		rot := func(k string) int { delete(serials[k], ""); return len(serials[k]) - 1 }
		t.Logf("%d connections over %s with %s SPIRE SVIDs: %d failed; rotations seen: client %d (node-1), server %d (node-2)",
			ok.Load(), dur, spireSVIDTTL, failed.Load(), rot("client"), rot("server"))
		if failed.Load() != 0 {
			t.Errorf("%d connections failed across rotations; first: %v", failed.Load(), firstErr.Load())
		}
		if rot("client") < 2 || rot("server") < 2 {
			t.Errorf("want at least 2 rotations each in %s, saw client %d, server %d", dur, rot("client"), rot("server"))
		}
		if ok.Load() < 100 {
			t.Errorf("only %d connections", ok.Load())
		}
	})

	t.Run("3-agent-gone-svid-until-expiry-then-fail-closed", func(t *testing.T) {
		pid := e.m.Ztunnel("node-1").Pid()
		// Start from a fresh rotation so the held SVID has most of its life.
		before := e.held("node-1", e.clientID).Serial
		if !eventually(spireSVIDTTL, func() bool { return e.held("node-1", e.clientID).Serial != before }) {
			t.Fatal("no rotation to start from")
		}
		e.agents["node-1"].Stop()
		stopped := time.Now()
		h := e.held("node-1", e.clientID)
		t.Logf("node-1's agent stopped; the client's SVID expires in %s", time.Until(h.NotAfter).Round(time.Millisecond))

		capFile := filepath.Join(t.TempDir(), "underlay.pcap")
		pc, err := e.m.Topo.Underlay.StartCapture("br0", capFile, "tcp")
		if err != nil {
			t.Fatal(err)
		}
		var okBefore, failedBefore, failedAfter, okAfter int
		var firstFail time.Time
		var lastErr error
		end := h.NotAfter.Add(3 * time.Second)
		for time.Now().Before(end) {
			at := time.Now()
			_, _, err := e.exchange(target, 4<<10)
			switch {
			case err == nil && at.Before(h.NotAfter):
				okBefore++
			case err == nil:
				okAfter++
			case at.Before(h.NotAfter.Add(-time.Second)):
				failedBefore++ // a second of margin: the probe may straddle NotAfter
				lastErr = err
			default:
				if firstFail.IsZero() {
					firstFail = at
				}
				if at.After(h.NotAfter) {
					failedAfter++
				}
				lastErr = err
			}
			time.Sleep(100 * time.Millisecond)
		}
		packets, err := pc.Stop()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("agent gone: %d ok before expiry (%d failed), %d refused after it (%d ok); first refusal %s after stop, %s after NotAfter; last error: %v",
			okBefore, failedBefore, failedAfter, okAfter, firstFail.Sub(stopped).Round(time.Millisecond), firstFail.Sub(h.NotAfter).Round(time.Millisecond), lastErr)
		if failedBefore != 0 || okBefore == 0 {
			t.Errorf("before expiry with the agent gone: %d ok, %d failed (want all ok)", okBefore, failedBefore)
		}
		if okAfter != 0 || failedAfter == 0 {
			t.Errorf("after expiry: %d ok, %d refused (want all refused: fail closed)", okAfter, failedAfter)
		}
		for _, p := range packets {
			if bytes.Contains(p.Payload, []byte(app.Marker)) || p.Src.Addr() == e.client.IP || p.Dst == target {
				t.Errorf("traffic left node-1 unprotected while failing closed: %s", p)
			}
		}
		st := e.held("node-1", e.clientID)
		if st.Error == "" {
			t.Errorf("node-1's admin does not report the agent loss: %+v", st)
		}

		t.Run("agent-back-recovers-without-ztunnel-restart", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			restart := time.Now()
			if err := e.agents["node-1"].Start(ctx); err != nil {
				t.Fatal(err)
			}
			started := time.Now()
			if !eventually(30*time.Second, func() bool { _, _, err := e.exchange(target, 4<<10); return err == nil }) {
				t.Fatalf("traffic did not recover after the agent returned: %+v", e.held("node-1", e.clientID))
			}
			t.Logf("traffic back %s after the agent restart began (%s after it was healthy)",
				time.Since(restart).Round(time.Millisecond), time.Since(started).Round(time.Millisecond))
			if p := e.m.Ztunnel("node-1"); p == nil || p.Pid() != pid {
				t.Error("node-1's ztunnel was restarted")
			}
			for range 20 {
				if _, _, err := e.exchange(target, 4<<10); err != nil {
					t.Fatalf("after recovery: %v", err)
				}
			}
		})
	})
}

func setupSPIRE(t *testing.T) *spireEnv {
	t.Helper()
	serverBin, agentBin, err := spireenv.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	td := spiffeid.RequireTrustDomainFromString(spireTD)
	e := &spireEnv{t: t, agents: map[string]*spireenv.Agent{},
		clientID: spiffeid.RequireFromPath(td, "/ns/shop/sa/client"),
		serverID: spiffeid.RequireFromPath(td, "/ns/shop/sa/server")}
	work := t.TempDir()
	e.work = work
	repo, _ := filepath.Abs("..")
	bin := filepath.Join(work, "bin")
	if err := mesh.Build(ctx, repo, bin); err != nil {
		t.Fatal(err)
	}
	ztunnelBin, err := filepath.EvalSymlinks(filepath.Join(bin, "ztunnel"))
	if err != nil {
		t.Fatal(err)
	}

	// SPIRE: a server, and an agent per node joined with a token that also
	// makes it spiffe://<td>/ambit/nodes (the workload entries' parent).
	e.server, err = spireenv.StartServer(ctx, spireenv.ServerOptions{Bin: serverBin, Dir: filepath.Join(work, "spire-server"), TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.server.Close)
	nodes := spiffeid.RequireFromPath(td, "/ambit/nodes")
	ztunnelID := spiffeid.RequireFromPath(td, "/ns/ambit-system/sa/ztunnel")
	for _, en := range []spireenv.Entry{
		// The delegate: the ztunnel process, by its binary's path (in a
		// cluster: k8s:ns:ambit-system, k8s:sa:ztunnel).
		{ID: ztunnelID, Parent: nodes, Selectors: []string{"unix:path:" + ztunnelBin}},
		// This test asks for a workload's SVID too (step 1).
		{ID: spiffeid.RequireFromPath(td, "/ambit/integration-test"), Parent: nodes, Selectors: []string{"unix:path:" + testBinary(t)}},
		// One entry per service account, by the selectors the ztunnel asks with.
		{ID: e.clientID, Parent: nodes, Selectors: []string{"k8s:ns:shop", "k8s:sa:client"}, X509SVIDTTL: spireSVIDTTL},
		{ID: e.serverID, Parent: nodes, Selectors: []string{"k8s:ns:shop", "k8s:sa:server"}, X509SVIDTTL: spireSVIDTTL},
	} {
		if _, err := e.server.CreateEntry(ctx, en); err != nil {
			t.Fatal(err)
		}
	}
	for _, node := range []string{"node-1", "node-2"} {
		tok, err := e.server.JoinToken(ctx, nodes)
		if err != nil {
			t.Fatal(err)
		}
		a, err := spireenv.StartAgent(ctx, spireenv.AgentOptions{Bin: agentBin, Dir: filepath.Join(work, "spire-agent-"+node), Server: e.server,
			JoinToken: tok, SyncInterval: time.Second,
			AuthorizedDelegates: []string{ztunnelID.String(), spiffeid.RequireFromPath(td, "/ambit/integration-test").String()}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Close)
		e.agents[node] = a
	}
	if e.bundle, err = e.server.Bundle(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{e.server.Log(), e.agents["node-1"].Log()} {
				t.Logf("--- %s:\n%s", f, tailFile(f, 40))
			}
			for _, node := range []string{"node-1", "node-2"} {
				if p := e.m.Ztunnel(node); p != nil {
					t.Logf("--- ztunnel %s:\n%s", node, p.Tail(40))
				}
			}
		}
	})

	// The mesh, local mode: two pods in the ambient namespace shop.
	clientIP, serverIP := netip.MustParseAddr("10.1.0.10"), netip.MustParseAddr("10.2.0.20")
	cfgDir := filepath.Join(work, "config")
	if err := os.MkdirAll(cfgDir, 0o755); err != nil {
		t.Fatal(err)
	}
	yaml := fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client-1, namespace: shop, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client, containers: [{name: client, image: client}]}
status: {phase: Running, podIP: %[1]s, podIPs: [{ip: %[1]s}], conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-2, namespace: shop, labels: {app: server}}
spec: {nodeName: node-2, serviceAccountName: server, containers: [{name: server, image: server, ports: [{containerPort: 8080}]}]}
status: {phase: Running, podIP: %[2]s, podIPs: [{ip: %[2]s}], conditions: [{type: Ready, status: "True"}]}
`, clientIP, serverIP)
	if err := os.WriteFile(filepath.Join(cfgDir, "mesh.yaml"), []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	e.m, err = mesh.Start(ctx, mesh.Options{
		BinDir: bin, WorkDir: work, Prefix: fmt.Sprintf("asp%d", os.Getpid()%10000),
		Nodes:      []netns.NodeConfig{{Name: "node-1"}, {Name: "node-2"}},
		ConfigDir:  cfgDir,
		IstiodArgs: []string{"--identity", "spire", "--trust-domain", spireTD},
		ZtunnelArgs: func(node string) []string {
			return []string{"--identity", "spire", "--spire-admin-socket", e.agents[node].AdminSocketPath(), "--trust-domain", spireTD}
		},
		Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.m.Close() })
	if e.client, err = e.m.Topo.Node("node-1").AddPodIP("shop.client-1", clientIP); err != nil {
		t.Fatal(err)
	}
	if e.srv, err = e.m.Topo.Node("node-2").AddPodIP("shop.server-2", serverIP); err != nil {
		t.Fatal(err)
	}
	for _, node := range []string{"node-1", "node-2"} {
		if err := e.m.StartZtunnel(ctx, node); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := e.srv.NS.Listen(ctx, nil, "tcp", ":8080")
	if err != nil {
		t.Fatal(err)
	}
	s := &app.Server{Name: "shop/server-2"}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	// Both ztunnels hold their workload's SPIRE SVID before traffic starts.
	for node, id := range map[string]spiffeid.ID{"node-1": e.clientID, "node-2": e.serverID} {
		if !eventually(30*time.Second, func() bool { return e.held(node, id).Serial != "" }) {
			t.Fatalf("%s's ztunnel has no SVID for %s: %+v", node, id, e.held(node, id))
		}
	}
	return e
}

// exchange runs one echo exchange from the client pod to dst.
func (e *spireEnv) exchange(dst netip.AddrPort, size int) (netip.AddrPort, app.Result, error) {
	local := netip.AddrPortFrom(e.client.IP, uint16(20000+e.ports.Add(1)%30000))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := app.Exchange(ctx, func(ctx context.Context) (net.Conn, error) {
		return e.client.NS.Dial(ctx, &net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local)}, "tcp", dst.String())
	}, size)
	return local, res, err
}

// heldCert is one line of a ztunnel's /debug/certificates.
type heldCert struct {
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
	Error     string    `json:"error"`
}

// held returns what node's ztunnel holds for id (zero if nothing).
func (e *spireEnv) held(node string, id spiffeid.ID) heldCert {
	var all []heldCert
	if err := e.m.Admin(context.Background(), node, "/debug/certificates", &all); err != nil {
		e.t.Logf("admin of %s: %v", node, err)
		return heldCert{}
	}
	for _, c := range all {
		if c.Identity == id.String() {
			return c
		}
	}
	return heldCert{}
}

// connLog is the part of a ztunnel access-log line this scenario checks.
type connLog struct {
	Direction, Via, Route, Outcome  string
	Src, SrcPrincipal, DstPrincipal string
}

// accessLog waits for node's access-log line of the connection from local.
// It reads the ztunnel's log itself and takes both shapes of the line
// ("connection" with src/src_principal, and "connection complete" with
// src.addr/src.identity).
func (e *spireEnv) accessLog(t *testing.T, node, direction string, local netip.AddrPort) connLog {
	t.Helper()
	var found *connLog
	eventually(5*time.Second, func() bool {
		b, err := os.ReadFile(filepath.Join(e.work, "ztunnel-"+node+".log"))
		if err != nil {
			return false
		}
		for _, line := range bytes.Split(b, []byte("\n")) {
			var m map[string]any
			if json.Unmarshal(line, &m) != nil || (m["msg"] != "connection" && m["msg"] != "connection complete") {
				continue
			}
			str := func(keys ...string) string {
				for _, k := range keys {
					if v, ok := m[k].(string); ok {
						return v
					}
				}
				return ""
			}
			l := connLog{
				Direction: str("direction"), Via: str("via"), Route: str("route"), Outcome: str("outcome"),
				Src: str("src", "src.addr"), SrcPrincipal: str("src_principal", "src.identity"), DstPrincipal: str("dst_principal", "dst.identity"),
			}
			if l.Direction == direction && l.Src == local.String() {
				found = &l
				return true
			}
		}
		return false
	})
	if found == nil {
		t.Fatalf("no %s access log on %s for %s", direction, node, local)
	}
	return *found
}

// serverChain handshakes with addr from ns and returns the certificate chain
// the server presented (the handshake itself then fails: no client SVID).
func (e *spireEnv) serverChain(t *testing.T, ns *netns.NS, addr netip.AddrPort) []*x509.Certificate {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := ns.Dial(ctx, nil, "tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var chain []*x509.Certificate
	tc := tls.Client(c, &tls.Config{
		InsecureSkipVerify: true, // verified below, against SPIRE's bundle
		NextProtos:         []string{"h2"},
		MinVersion:         tls.VersionTLS13,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			for _, der := range raw {
				cert, err := x509.ParseCertificate(der)
				if err != nil {
					return err
				}
				chain = append(chain, cert)
			}
			return nil
		},
	})
	_ = tc.HandshakeContext(ctx) // refused for want of a client certificate, after the server's came
	if len(chain) == 0 {
		t.Fatalf("no certificate from %s", addr)
	}
	return chain
}

func testBinary(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err == nil {
		exe, err = filepath.EvalSymlinks(exe)
	}
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

func tailFile(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
