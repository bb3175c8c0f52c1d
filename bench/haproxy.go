package bench

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// The HAProxy pair's ports. On node1 the plain frontends the client pod
// dials; on node2 the mutual-TLS frontends node1's HAProxy originates to.
const (
	haFortioPort     = 18080
	haIperfPort      = 15201
	haFortioTLSPort  = 18443
	haIperfTLSPort   = 15443
	haTLSCiphersuite = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
)

// haproxyPair is what a user would pick instead of a mesh: HAProxy on the
// client's node originating mutual TLS, HAProxy on the server's node
// terminating it, with the same CA, key type (ECDSA P-256), SPIFFE
// certificates and TLS 1.3 ciphersuite order as ztunnel's HBONE.
type haproxyPair struct {
	client, server *process
}

// startHAProxy writes the certificates and configs into dir and starts both
// HAProxys, forwarding to server's fortio and iperf3 ports.
func startHAProxy(niceness int, haproxy, dir string, ca *certs.CA, n1, n2 *netns.Node, server *netns.Pod) (*haproxyPair, error) {
	roots := ca.Bundle().X509Authorities()
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), certs.EncodeCertificates(roots), 0o600); err != nil {
		return nil, fmt.Errorf("haproxy: %w", err)
	}
	for _, who := range []string{"client", "server"} {
		id := spiffeid.RequireFromPath(ca.TrustDomain(), "/ns/bench/sa/haproxy-"+who)
		svid, err := ca.IssueSVID(id, 24*time.Hour)
		if err != nil {
			return nil, fmt.Errorf("haproxy %s certificate: %w", who, err)
		}
		crt, key, err := svid.Marshal()
		if err != nil {
			return nil, fmt.Errorf("haproxy %s certificate: %w", who, err)
		}
		if err := os.WriteFile(filepath.Join(dir, who+".pem"), append(crt, key...), 0o600); err != nil {
			return nil, fmt.Errorf("haproxy: %w", err)
		}
	}
	global := fmt.Sprintf(`global
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
    ssl-default-bind-ciphersuites %[1]s
    ssl-default-server-ciphersuites %[1]s
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
`, haTLSCiphersuite)
	ca1 := filepath.Join(dir, "ca.pem")
	clientCfg := global
	serverCfg := global
	for _, p := range []struct {
		name         string
		plain, tls   int
		upstreamPort int
	}{{"http", haFortioPort, haFortioTLSPort, fortioPort}, {"iperf", haIperfPort, haIperfTLSPort, iperfPort}} {
		clientCfg += fmt.Sprintf(`frontend %[1]s
    bind %[2]s
    default_backend %[1]s
backend %[1]s
    server node2 %[3]s ssl crt %[4]s ca-file %[5]s verify required
`, p.name, netip.AddrPortFrom(n1.IP, uint16(p.plain)), netip.AddrPortFrom(n2.IP, uint16(p.tls)), filepath.Join(dir, "client.pem"), ca1)
		serverCfg += fmt.Sprintf(`frontend %[1]s
    bind %[2]s ssl crt %[3]s ca-file %[4]s verify required
    default_backend %[1]s
backend %[1]s
    server pod %[5]s
`, p.name, netip.AddrPortFrom(n2.IP, uint16(p.tls)), filepath.Join(dir, "server.pem"), ca1, netip.AddrPortFrom(server.IP, uint16(p.upstreamPort)))
	}
	hp := &haproxyPair{}
	for _, h := range []struct {
		proc **process
		name string
		ns   *netns.NS
		cfg  string
	}{{&hp.server, "haproxy-node2", n2.NS, serverCfg}, {&hp.client, "haproxy-node1", n1.NS, clientCfg}} {
		path := filepath.Join(dir, h.name+".cfg")
		if err := os.WriteFile(path, []byte(h.cfg), 0o600); err != nil {
			return nil, fmt.Errorf("haproxy: %w", err)
		}
		p, err := start(niceness, h.ns, h.name, filepath.Join(dir, h.name+".log"), haproxy, "-db", "-f", path)
		if err != nil {
			hp.stop()
			return nil, err
		}
		*h.proc = p
	}
	return hp, nil
}

func (h *haproxyPair) procs() []*process { return []*process{h.client, h.server} }

func (h *haproxyPair) stop() {
	if h == nil {
		return
	}
	h.client.stop(3 * time.Second)
	h.server.stop(3 * time.Second)
}
