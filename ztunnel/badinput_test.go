package ztunnel

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/model"
)

// pastCA returns a CA for cluster.local that shares the mesh's trust bundle
// form but whose clock is two days behind, so that what it issues is
// already expired; and the same root as a current CA.
func pastAndPresentCA(t *testing.T) (past, present *certs.CA) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: now.Add(-72 * time.Hour), NotAfter: now.Add(72 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		URIs: []*url.URL{identity.DefaultTrustDomain.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(der)
	past, err = certs.NewCA(identity.DefaultTrustDomain, root, key, nil, []*x509.Certificate{root},
		certs.Options{LeafTTL: time.Hour, Now: func() time.Time { return now.Add(-48 * time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	present, err = certs.NewCA(identity.DefaultTrustDomain, root, key, nil, []*x509.Certificate{root}, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return past, present
}

// TestBadPeers: tunnels from a foreign trust domain, with an expired
// certificate, to a workload that is not local, or for the wrong identity
// fail; the proxy logs, keeps serving, and leaks nothing.
func TestBadPeers(t *testing.T) {
	past, present := pastAndPresentCA(t)
	cs := &testCerts{ca: present, svids: map[spiffeid.ID]*x509svid.SVID{}}
	m := newTestMeshWith(t, cs, nil)
	ip := m.net.ip
	hboneAddr := func(a netip.Addr) netip.AddrPort { return netip.AddrPortFrom(a, m.n2.port(ListenerHBONE)) }
	clientID := m.client.Identity()
	serverID := m.serverA.Identity()
	good := hbone.DialRequest{Source: clientID, Peers: []spiffeid.ID{serverID}, Addr: hboneAddr(ip(21)),
		Target: netip.AddrPortFrom(ip(21), 8080), ForwardedFor: netip.AddrPortFrom(ip(11), 1234)}

	foreign := newTestCerts(t, "evil.example")
	// The foreign dialer trusts the mesh (so that only the server's check
	// of the client is tested).
	foreignSrc := &mixedCerts{svids: foreign, bundles: cs}
	expired := &mixedCerts{svids: &testCerts{ca: past, svids: map[spiffeid.ID]*x509svid.SVID{}}, bundles: cs}

	for _, tc := range []struct {
		name   string
		certs  hbone.CertSource
		req    func(r hbone.DialRequest) hbone.DialRequest
		status int // 0: the dial fails before any status
	}{
		{"foreign trust domain", foreignSrc, func(r hbone.DialRequest) hbone.DialRequest {
			r.Source = spiffeid.RequireFromString("spiffe://evil.example/ns/shop/sa/client")
			return r
		}, 0},
		{"expired client certificate", expired, nil, 0},
		{"wrong server identity", cs, func(r hbone.DialRequest) hbone.DialRequest {
			r.Peers = []spiffeid.ID{spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/someone-else")}
			return r
		}, 0},
		{"not a local workload", cs, func(r hbone.DialRequest) hbone.DialRequest {
			r.Addr, r.Target = hboneAddr(ip(31)), netip.AddrPortFrom(ip(31), 9000) // legacy: not enrolled
			return r
		}, 0},
		{"authority differs from destination", cs, func(r hbone.DialRequest) hbone.DialRequest {
			r.Target = netip.AddrPortFrom(ip(22), 8080)
			return r
		}, http.StatusBadRequest},
		{"nothing listening on the target port", cs, func(r hbone.DialRequest) hbone.DialRequest {
			r.Target = netip.AddrPortFrom(ip(21), 1)
			return r
		}, http.StatusServiceUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &hbone.Dialer{Certs: tc.certs, HandshakeTimeout: 5 * time.Second}
			defer d.Close()
			req := good
			if tc.req != nil {
				req = tc.req(req)
			}
			st, err := d.Dial(t.Context(), req)
			if err == nil {
				st.Close()
				t.Fatal("dial succeeded")
			}
			var se *hbone.StatusError
			if tc.status != 0 && (!errors.As(err, &se) || se.Code != tc.status) {
				t.Fatalf("err %v, want status %d", err, tc.status)
			}
			if tc.status == 0 && errors.As(err, &se) {
				t.Fatalf("err %v, want a failed handshake", err)
			}
		})
	}
	waitFor(t, "refused handshakes logged and counted", func() bool {
		l := m.n2.logs.String()
		return strings.Contains(l, "handshake failed: peer refused") && strings.Count(l, `"level":"WARN"`) >= 3 &&
			metricSum(t, m.n2.p, "ambit_ztunnel_hbone_refused_total", map[string]string{"reason": "handshake"}) >= 3
	})

	// The hbone Dialer refuses to present an expired certificate at all;
	// present one anyway, with plain TLS, to check that the server refuses it.
	old, err := past.IssueSVID(clientID, 0)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := tls.Dial("tcp", hboneAddr(ip(21)).String(), &tls.Config{
		InsecureSkipVerify: true, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{old.Certificates[0].Raw}, PrivateKey: old.PrivateKey}},
	})
	if err == nil {
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = tc.Read(make([]byte, 1)) // TLS 1.3: the server's verdict arrives after the client's Finished
		tc.Close()
	}
	if err == nil {
		t.Fatal("the server accepted an expired client certificate")
	}
	waitFor(t, "expired certificate logged", func() bool {
		return strings.Contains(m.n2.logs.String(), "expired")
	})
	waitFor(t, "log line for the failed delivery", func() bool {
		return strings.Contains(m.n2.logs.String(), "local workload refused the connection")
	})

	// Still serving.
	d := &hbone.Dialer{Certs: cs}
	defer d.Close()
	st, err := d.Dial(t.Context(), good)
	if err != nil {
		t.Fatalf("good dial after bad ones: %v", err)
	}
	if _, err := exchange(st, 1000, 1000, 5); err != nil {
		t.Fatal(err)
	}
}

// mixedCerts presents svids' certificates and trusts bundles' bundles.
type mixedCerts struct {
	svids, bundles *testCerts
}

func (m *mixedCerts) GetX509SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	return m.svids.GetX509SVID(ctx, id)
}

func (m *mixedCerts) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return m.bundles.GetX509BundleForTrustDomain(td)
}

// TestBadClients: an unknown source, malformed or unsupported SOCKS5, a
// missing service port and an unresolvable name get refusals, not crashes.
func TestBadClients(t *testing.T) {
	m := newTestMesh(t, nil)
	ip := m.net.ip
	socks := m.n1.p.Addr(ListenerSOCKS5)
	replyCode := func(err error) int {
		var se *socksReplyError
		if errors.As(err, &se) {
			return int(se.code)
		}
		return -1
	}
	for _, tc := range []struct {
		name string
		src  netip.Addr
		dst  string
		code int
	}{
		{"unknown source", ip(99), m.vip.String(), socksNotAllowed},
		{"source on another node", ip(21), m.vip.String(), socksNotAllowed},
		{"service port not exposed", ip(11), netip.AddrPortFrom(m.vip.Addr(), 81).String(), socksHostUnreachable},
		{"unknown name", ip(11), "nowhere.shop.svc.cluster.local:80", socksHostUnreachable},
		{"connect refused", ip(11), netip.AddrPortFrom(ip(50), 1).String(), socksConnRefused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := socksDial(socks, tc.src, tc.dst)
			if err == nil {
				c.Close()
			}
			if got := replyCode(err); got != tc.code {
				t.Fatalf("reply %d (%v), want %d", got, err, tc.code)
			}
		})
	}
	raw := func(b []byte) []byte {
		c, err := net.Dial("tcp", socks.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(b)
		c.(*net.TCPConn).CloseWrite()
		out, _ := io.ReadAll(c)
		return out
	}
	if got := raw([]byte{4, 1, 0, 80}); len(got) != 0 {
		t.Errorf("SOCKS4 got %v", got)
	}
	if got := raw([]byte{5, 1, 2}); string(got) != "\x05\xff" {
		t.Errorf("no acceptable method: %v", got)
	}
	if got := raw([]byte{5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80}); len(got) < 4 || got[3] != socksCmdNotSupported {
		t.Errorf("BIND: %v", got)
	}
	if got := raw([]byte{5, 1, 0, 5, 1, 0, 9}); len(got) < 4 || got[3] != socksAddrTypeNotSupport {
		t.Errorf("bad address type: %v", got)
	}
	if got := raw([]byte{5, 1, 0, 5, 1, 0, 1, 1}); len(got) != 2 {
		t.Errorf("truncated request: %v", got)
	}
	// Still serving.
	c, err := socksDial(socks, ip(11), m.vip.String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exchange(c, 10, 10, 1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "unknown sources counted", func() bool {
		return metricSum(t, m.n1.p, "ambit_ztunnel_connections_refused_total", map[string]string{"response_flags": "UNKNOWN_SOURCE"}) == 2
	})
}

// TestForwardedClaimIsVerified: the forwarded header is the peer's claim. An
// identity that claims another workload's address gets neither that address's
// ipBlocks grant nor that address as its source; a ztunnel speaking for its
// own pod (the address holds the peer's identity) keeps it.
func TestForwardedClaimIsVerified(t *testing.T) {
	cs := newTestCerts(t, "cluster.local")
	m := newTestMeshWith(t, cs, nil)
	ip := m.net.ip
	// Only the client's address may reach the shop namespace's servers.
	m.setConfig([]*model.Policy{{Name: "from-client-ip", Namespace: "shop", Action: model.ActionAllow,
		Rules: []model.Rule{{From: []model.Source{{IPBlocks: []netip.Prefix{netip.PrefixFrom(ip(11), 32)}}}}}}}, nil)
	d := &hbone.Dialer{Certs: cs, HandshakeTimeout: 5 * time.Second}
	defer d.Close()
	req := func(src spiffeid.ID) hbone.DialRequest {
		return hbone.DialRequest{Source: src, Peers: []spiffeid.ID{m.serverA.Identity()},
			Addr: netip.AddrPortFrom(ip(21), m.n2.port(ListenerHBONE)), Target: netip.AddrPortFrom(ip(21), 8080),
			ForwardedFor: netip.AddrPortFrom(ip(11), 4242)} // the client's address
	}

	// The intruder (another identity) claims the client's address.
	_, err := d.Dial(t.Context(), req(m.intruder.Identity()))
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusUnauthorized {
		t.Fatalf("intruder claiming the client's address: %v, want 401", err)
	}
	waitFor(t, "denied with the real source", func() bool {
		for _, l := range strings.Split(m.n2.logs.String(), "\n") {
			if strings.Contains(l, `"outcome":"denied"`) && strings.Contains(l, "ns/other/sa/intruder") {
				return !strings.Contains(l, netip.AddrPortFrom(ip(11), 4242).String())
			}
		}
		return false
	})

	// The client's own ztunnel speaking for it keeps its address.
	st, err := d.Dial(t.Context(), req(m.client.Identity()))
	if err != nil {
		t.Fatalf("the client's own tunnel: %v", err)
	}
	st.Close()
}

// TestNoDeliveryToOwnListeners: where a workload's address is the host's own
// (plain hosts), a tunnel to <workload>:<a ztunnel port> would be delivered to
// the proxy itself, again and again; it is refused instead.
func TestNoDeliveryToOwnListeners(t *testing.T) {
	cs := newTestCerts(t, "cluster.local")
	m := newTestMeshWith(t, cs, nil)
	ip := m.net.ip
	d := &hbone.Dialer{Certs: cs, HandshakeTimeout: 5 * time.Second}
	defer d.Close()
	for _, l := range []string{ListenerInbound, ListenerHBONE} {
		_, err := d.Dial(t.Context(), hbone.DialRequest{Source: m.client.Identity(), Peers: []spiffeid.ID{m.serverA.Identity()},
			Addr: netip.AddrPortFrom(ip(21), m.n2.port(ListenerHBONE)), Target: netip.AddrPortFrom(ip(21), m.n2.port(l)),
			ForwardedFor: netip.AddrPortFrom(ip(11), 4242)})
		var se *hbone.StatusError
		if !errors.As(err, &se) || se.Code != http.StatusServiceUnavailable {
			t.Fatalf("tunnel to the %s listener: %v, want 503", l, err)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(m.n2.p.dumpConnections()); n != 0 {
		t.Fatalf("%d connections still open: the proxy delivered to itself", n)
	}
}
