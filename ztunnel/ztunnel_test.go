package ztunnel

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/model"
)

// metricSum adds up the samples of counter or gauge name whose labels
// include match.
func metricSum(t testing.TB, p *Proxy, name string, match map[string]string) float64 {
	t.Helper()
	mfs, err := p.m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range match {
				if labels[k] != v {
					continue next
				}
			}
			if c := m.GetCounter(); c != nil {
				sum += c.GetValue()
			}
			if g := m.GetGauge(); g != nil {
				sum += g.GetValue()
			}
		}
	}
	return sum
}

func TestTunnelIsByteExactBothWays(t *testing.T) {
	m := newTestMesh(t, nil)
	const up, down = 8 << 20, 6 << 20
	for _, tc := range []struct{ name, dst string }{
		{"service hostname", "server.shop.svc.cluster.local:80"},
		{"service VIP", m.vip.String()},
		{"pod IP", netip.AddrPortFrom(m.serverA.Addresses[0], 8080).String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(m.srvA.all()) + len(m.srvB.all())
			c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], tc.dst)
			if err != nil {
				t.Fatal(err)
			}
			sum, err := exchange(c, up, down, 42)
			if err != nil {
				t.Fatal(err)
			}
			var got []serverResult
			waitFor(t, "server result", func() bool {
				got = append(m.srvA.all(), m.srvB.all()...)
				return len(got) == before+1
			})
			r := got[len(got)-1]
			if len(m.srvB.all()) > 0 && m.srvB.all()[len(m.srvB.all())-1].sum == sum {
				r = m.srvB.all()[len(m.srvB.all())-1]
			}
			if r.err != nil || r.n != up || r.sum != sum {
				t.Fatalf("server got %d bytes (err %v), hash match %v; want %d", r.n, r.err, r.sum == sum, up)
			}
			if r.peer.Addr() != m.client.Addresses[0] {
				t.Fatalf("server saw peer %s, want the client's own address %s", r.peer, m.client.Addresses[0])
			}
		})
	}
	// Istio metrics on both sides: bytes each way, with identities.
	src := map[string]string{"reporter": "source", "source_principal": "spiffe://cluster.local/ns/shop/sa/client",
		"destination_principal": "spiffe://cluster.local/ns/shop/sa/server", "connection_security_policy": "mutual_tls", "response_flags": "-"}
	dst := map[string]string{"reporter": "destination", "source_principal": "spiffe://cluster.local/ns/shop/sa/client",
		"source_workload": "client", "destination_workload_namespace": "shop", "connection_security_policy": "mutual_tls"}
	waitFor(t, "closed metrics", func() bool {
		return metricSum(t, m.n2.p, "istio_tcp_connections_closed_total", dst) == 3 &&
			metricSum(t, m.n1.p, "istio_tcp_connections_closed_total", src) == 3
	})
	for _, side := range []struct {
		p      *Proxy
		labels map[string]string
	}{{m.n1.p, src}, {m.n2.p, dst}} {
		if got := metricSum(t, side.p, "istio_tcp_received_bytes_total", side.labels); got != 3*(up+8) {
			t.Errorf("%s received bytes %v, want %d", side.labels["reporter"], got, 3*(up+8))
		}
		if got := metricSum(t, side.p, "istio_tcp_sent_bytes_total", side.labels); got != 3*down {
			t.Errorf("%s sent bytes %v, want %d", side.labels["reporter"], got, 3*down)
		}
		if got := metricSum(t, side.p, "istio_tcp_connections_opened_total", side.labels); got != 3 {
			t.Errorf("%s opened %v, want 3", side.labels["reporter"], got)
		}
	}
	if got := metricSum(t, m.n1.p, "istio_tcp_connections_closed_total", map[string]string{"destination_service": "server.shop.svc.cluster.local"}); got != 2 {
		t.Errorf("connections to the service: %v, want 2", got)
	}
	// One access-log line per connection, with bytes each way.
	logs := m.n2.logs.String()
	if n := strings.Count(logs, `"msg":"connection complete"`); n != 3 {
		t.Errorf("node2 wrote %d access-log lines, want 3:\n%s", n, logs)
	}
	if !strings.Contains(logs, fmt.Sprintf(`"bytes_sent":%d,"bytes_recv":%d`, down, up+8)) {
		t.Errorf("access log lacks the byte counts:\n%s", logs)
	}
}

// TestHalfClose checks that a FIN in either direction crosses the tunnel
// while the other direction keeps flowing.
func TestHalfClose(t *testing.T) {
	m := newTestMesh(t, nil)
	ip := m.net.ip

	// Server speaks first, closes its write half, then reads the client's
	// answer, which the client sends only after it saw EOF.
	speakFirst, err := net.Listen("tcp", netip.AddrPortFrom(ip(21), 7001).String())
	if err != nil {
		t.Fatal(err)
	}
	defer speakFirst.Close()
	gotAnswer := make(chan string, 1)
	go func() {
		c, err := speakFirst.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("hello"))
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		gotAnswer <- string(b)
	}()
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), netip.AddrPortFrom(ip(21), 7001).String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	greeting, err := io.ReadAll(c) // ends at the server's FIN
	if err != nil || string(greeting) != "hello" {
		t.Fatalf("greeting %q, %v", greeting, err)
	}
	if _, err := c.Write([]byte("bye after your FIN")); err != nil {
		t.Fatalf("write after the server's half-close: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	select {
	case a := <-gotAnswer:
		if a != "bye after your FIN" {
			t.Fatalf("server got %q", a)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server did not get the answer")
	}
	c.Close()

	// Client sends a request and half-closes; the server replies only after
	// EOF (the exchange helper's server would reply concurrently).
	afterEOF, err := net.Listen("tcp", netip.AddrPortFrom(ip(21), 7002).String())
	if err != nil {
		t.Fatal(err)
	}
	defer afterEOF.Close()
	go func() {
		c, err := afterEOF.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		sum := sha256.Sum256(b)
		c.Write(sum[:])
	}()
	c, err = socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), netip.AddrPortFrom(ip(21), 7002).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	req := make([]byte, 1<<20)
	patternReader(3).Read(req)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	reply, err := io.ReadAll(c)
	want := sha256.Sum256(req)
	if err != nil || string(reply) != string(want[:]) {
		t.Fatalf("reply after half-close: %x, %v; want %x", reply, err, want)
	}
}

func TestThousandConcurrentTunnels(t *testing.T) {
	m := newTestMesh(t, nil)
	const n, up, down = 1000, 16 << 10, 8 << 10
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := make(chan struct{})
	conns := make(chan net.Conn, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], m.vip.String())
			if err != nil {
				errs <- fmt.Errorf("conn %d: %w", i, err)
				return
			}
			conns <- c
			<-start // every connection is open (tunnelled) at once
			if _, err := exchange(c, up, down, uint64(i)); err != nil {
				errs <- fmt.Errorf("conn %d: %w", i, err)
			}
		}()
	}
	waitFor(t, "all connections open", func() bool { return len(conns)+len(errs) == n })
	if active := metricSum(t, m.n2.p, "ambit_ztunnel_active_connections", map[string]string{"direction": "inbound"}); active != n {
		t.Errorf("node2 has %v active inbound connections, want %d", active, n)
	}
	tunnels := m.n1.p.dialer.Conns()
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	results := append(m.srvA.all(), m.srvB.all()...)
	if len(results) != n {
		t.Fatalf("servers saw %d connections, want %d", len(results), n)
	}
	for _, r := range results {
		if r.err != nil || r.n != up {
			t.Fatalf("server result %+v", r)
		}
	}
	if len(m.srvA.all()) == 0 || len(m.srvB.all()) == 0 {
		t.Errorf("not balanced: %d / %d", len(m.srvA.all()), len(m.srvB.all()))
	}
	// Two destinations (a and b) with about 100 streams per HBONE
	// connection: about 10 connections, not 1000.
	if tunnels < 2 || tunnels > 24 {
		t.Errorf("%d HBONE connections carried %d streams: want pooling (2..24)", tunnels, n)
	}
	t.Logf("%d tunnelled connections over %d HBONE connections", n, tunnels)
}

func TestPolicyAllowAndDeny(t *testing.T) {
	m := newTestMesh(t, nil)
	socks := m.n1.p.Addr(ListenerSOCKS5)
	try := func(src *model.Workload) error {
		c, err := socksDial(socks, src.Addresses[0], m.vip.String())
		if err != nil {
			return err
		}
		_, err = exchange(c, 1000, 1000, 1)
		return err
	}
	isDenied := func(err error) bool {
		var se *socksReplyError
		return errors.As(err, &se) && se.code == socksNotAllowed
	}

	// No policy: both allowed.
	if err := try(m.client); err != nil {
		t.Fatal(err)
	}
	if err := try(m.intruder); err != nil {
		t.Fatal(err)
	}

	// An ALLOW policy selecting the servers admits only the client.
	allow := &model.Policy{Name: "only-client", Namespace: "shop", Action: model.ActionAllow,
		Selector: map[string]string{"app": "server"},
		Rules:    []model.Rule{{From: []model.Source{{Principals: []string{"cluster.local/ns/shop/sa/client"}}}}}}
	m.setConfig([]*model.Policy{allow}, nil)
	if err := try(m.client); err != nil {
		t.Fatalf("allowed principal: %v", err)
	}
	if err := try(m.intruder); !isDenied(err) {
		t.Fatalf("other principal: %v, want SOCKS5 'not allowed'", err)
	}
	denied := map[string]string{"response_flags": "DENY", "source_principal": "spiffe://cluster.local/ns/other/sa/intruder"}
	waitFor(t, "DENY counted at both ends", func() bool {
		return metricSum(t, m.n2.p, "istio_tcp_connections_closed_total", with(denied, "reporter", "destination")) == 1 &&
			metricSum(t, m.n1.p, "istio_tcp_connections_closed_total", with(denied, "reporter", "source")) == 1
	})
	waitFor(t, "denial in the access log", func() bool {
		logs := m.n2.logs.String()
		return strings.Contains(logs, `"outcome":"denied"`) && strings.Contains(logs, "no allow policy matched")
	})

	// A DENY policy on the target port beats the ALLOW.
	deny := &model.Policy{Name: "no-8080", Namespace: "shop", Action: model.ActionDeny,
		Rules: []model.Rule{{To: []model.Target{{Ports: []uint16{8080}}}}}}
	m.setConfig([]*model.Policy{allow, deny}, nil)
	if err := try(m.client); !isDenied(err) {
		t.Fatalf("client under DENY: %v", err)
	}
	waitFor(t, "DENY policy in the access log", func() bool {
		return strings.Contains(m.n2.logs.String(), "denied by policy shop/no-8080")
	})
	waitFor(t, "refusals counted", func() bool {
		return metricSum(t, m.n2.p, "ambit_ztunnel_connections_refused_total", map[string]string{"response_flags": "DENY"}) == 2
	})
}

func with(m map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for a, b := range m {
		out[a] = b
	}
	return out
}

// TestPlaintextInboundRefusals covers what 15006 refuses; delivery of
// allowed plaintext needs real capture and is in the netns test.
func TestPlaintextInboundRefusals(t *testing.T) {
	m := newTestMesh(t, nil)
	ip := m.net.ip
	port := m.n2.port(ListenerInbound)
	refused := func(dst netip.AddrPort) bool {
		t.Helper()
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip(31), 0)), Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", dst.String())
		if errors.Is(err, syscall.ECONNRESET) {
			return true // reset before connect returned
		}
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(make([]byte, 8)); errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
			return true // the reset arrived first (a later read would see EOF)
		}
		_, err = c.Read(make([]byte, 1))
		return errors.Is(err, syscall.ECONNRESET) // a reset, not a FIN
	}

	// STRICT (mesh-wide) refuses plaintext with a reset.
	strict := &model.PeerAuthentication{Name: "default", Namespace: "ambit-system", Mode: model.MTLSStrict}
	m.setConfig(nil, []*model.PeerAuthentication{strict})
	if !refused(netip.AddrPortFrom(ip(21), port)) {
		t.Fatal("plaintext under STRICT was not reset")
	}
	waitFor(t, "denial counted", func() bool {
		return metricSum(t, m.n2.p, "istio_tcp_connections_closed_total", map[string]string{
			"reporter": "destination", "response_flags": "DENY", "connection_security_policy": "none",
			"destination_workload": "server-a", "source_workload": "legacy"}) == 1
	})
	// The metric is counted just before the log line is written.
	waitFor(t, "STRICT refusal in the log", func() bool { return strings.Contains(m.n2.logs.String(), "PeerAuthentication STRICT") })

	// PERMISSIVE, but an ALLOW policy on principals: plaintext never matches.
	allow := &model.Policy{Name: "principals", Namespace: "shop", Action: model.ActionAllow,
		Rules: []model.Rule{{From: []model.Source{{Principals: []string{"*"}}}}}}
	m.setConfig([]*model.Policy{allow}, nil)
	if !refused(netip.AddrPortFrom(ip(22), port)) {
		t.Fatal("plaintext under a principals-only ALLOW was not reset")
	}
	// Not a local workload at all.
	if !refused(netip.AddrPortFrom(ip(50), port)) {
		t.Fatal("plaintext to an unknown destination was not reset")
	}
	waitFor(t, "refusals counted", func() bool {
		return metricSum(t, m.n2.p, "ambit_ztunnel_connections_refused_total", map[string]string{"direction": "inbound", "response_flags": "DENY"}) == 2 &&
			metricSum(t, m.n2.p, "ambit_ztunnel_connections_refused_total", map[string]string{"response_flags": "UNKNOWN_DESTINATION"}) == 1
	})
}
