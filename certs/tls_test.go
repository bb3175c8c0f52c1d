package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/ambit-mesh/ambit/identity"
)

// Two managers, one per side of a mutual-TLS connection, through a root
// rotation: the server's listener and tls.Config stay the same, and whether
// a handshake succeeds follows the server manager's bundle.
func TestManagerMTLSFollowsBundleWithoutRestart(t *testing.T) {
	old, err := NewSelfSignedCA(identity.DefaultTrustDomain, Options{})
	if err != nil {
		t.Fatal(err)
	}
	srvID, cliID := mustID(t, "shop", "server"), mustID(t, "shop", "client")
	srvIss, cliIss := &testIssuer{ca: old}, &testIssuer{ca: old}
	srv, cli := &Manager{Issuer: srvIss}, &Manager{Issuer: cliIss}
	t.Cleanup(func() { srv.Close(); cli.Close() })
	srv.SetIdentities([]spiffeid.ID{srvID})
	cli.SetIdentities([]spiffeid.ID{cliID})

	serverConf := &tls.Config{
		MinVersion:            tls.VersionTLS13,
		ClientAuth:            tls.RequireAnyClientCert,
		GetCertificate:        GetCertificate(srv, srvID),
		InsecureSkipVerify:    true, // verification is VerifyPeerCertificate's, against the live bundle
		VerifyPeerCertificate: tlsconfig.VerifyPeerCertificate(srv, tlsconfig.AuthorizeMemberOf(identity.DefaultTrustDomain)),
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", serverConf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.(*tls.Conn).Handshake()
				c.Write([]byte("ok"))
			}()
		}
	}()
	dial := func() error {
		conf := &tls.Config{
			MinVersion:            tls.VersionTLS13,
			GetClientCertificate:  GetClientCertificate(cli, cliID),
			InsecureSkipVerify:    true,
			VerifyPeerCertificate: tlsconfig.VerifyPeerCertificate(cli, tlsconfig.AuthorizeID(srvID)),
		}
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		c, err := (&tls.Dialer{Config: conf}).DialContext(ctx, "tcp", l.Addr().String())
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 2)
		_, err = c.Read(buf) // the server's verdict on our certificate arrives with its first data (TLS 1.3)
		return err
	}
	refresh := func(m *Manager, id spiffeid.ID) {
		m.SetIdentities(nil)
		m.SetIdentities([]spiffeid.ID{id})
		if _, err := m.GetX509SVID(t.Context(), id); err != nil {
			t.Fatal(err)
		}
	}
	refresh(srv, srvID)
	refresh(cli, cliID)
	if err := dial(); err != nil {
		t.Fatalf("handshake under the old root: %v", err)
	}

	next, err := NewSelfSignedCA(identity.DefaultTrustDomain, Options{ExtraRoots: []*x509.Certificate{old.SigningCertificate()}})
	if err != nil {
		t.Fatal(err)
	}
	cliIss.set(next, nil)
	refresh(cli, cliID) // the client now holds a new-root certificate
	if err := dial(); err == nil {
		t.Fatal("server accepted a certificate from a root not yet in its bundle")
	}
	srvIss.set(next, nil)
	refresh(srv, srvID) // the server's bundle gains the new root; same listener
	if err := dial(); err != nil {
		t.Fatalf("handshake after the server's bundle update: %v", err)
	}
}
