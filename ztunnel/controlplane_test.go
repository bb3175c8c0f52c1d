package ztunnel

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
)

// TestCertificateServiceLoss: the proxies get their certificates from
// istiod-lite's certificate service (gRPC, per-host secrets, as in local
// mode). When the service goes away they keep serving, including new
// tunnels to destinations they never talked to, with the certificates they
// hold.
func TestCertificateServiceLoss(t *testing.T) {
	authority, err := certs.NewSelfSignedCA(identity.DefaultTrustDomain, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	hosts, err := auth.NewHostAuthenticator(map[string]string{"node1": "node1-secret-0123456789abcdef", "node2": "node2-secret-0123456789abcdef"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	managerFor := func(node string) *certs.Manager {
		c := &caclient.Client{Addr: ln.Addr().String(), Roots: authority.Bundle(), Token: node + "-secret-0123456789abcdef"}
		mgr := &certs.Manager{Issuer: c, MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
		t.Cleanup(func() { mgr.Close(); c.Close() })
		return mgr
	}
	m := newTestMeshWith(t, managerFor("node1"), func(c *Config) { c.Certs = managerFor(c.Node) })

	// The certificate service authorizes against the same model; the
	// managers retry until it serves.
	srv := &ca.Server{CA: authority, Authenticator: hosts, Workloads: ca.StoreWorkloads{Store: m.store}}
	serving := &ca.ServingCert{CA: authority, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(serving.TLSConfig())))
	srv.Register(g)
	served := make(chan struct{})
	go func() { defer close(served); g.Serve(ln) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			g.Stop()
			<-served
		}
	}
	defer stop()

	try := func(dst netip.AddrPort) error {
		c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], dst.String())
		if err != nil {
			return err
		}
		_, err = exchange(c, 256<<10, 256<<10, 4)
		return err
	}
	podA := netip.AddrPortFrom(m.serverA.Addresses[0], 8080)
	podB := netip.AddrPortFrom(m.serverB.Addresses[0], 8080)
	if err := try(podA); err != nil {
		t.Fatal(err)
	}
	// The managers prefetch their nodes' identities (SetIdentities).
	waitFor(t, "node2 holds its certificates", func() bool {
		sts := m.n2.p.cfg.Certs.(*certs.Manager).Certificates()
		return len(sts) == 1 && sts[0].Serial != ""
	})

	stop() // the control plane goes away
	if err := try(podA); err != nil {
		t.Fatalf("existing destination after the CA went away: %v", err)
	}
	if err := try(podB); err != nil {
		t.Fatalf("new tunnel after the CA went away: %v", err)
	}
}
