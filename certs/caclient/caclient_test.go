package caclient

import (
	"context"
	"crypto/tls"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/credential"
	"github.com/ambit-mesh/ambit/identity"
)

// BundleFile follows the file: a rotated root reaches the next handshake.
func TestBundleFileFollowsChanges(t *testing.T) {
	dir := t.TempDir()
	a, _ := certs.NewSelfSignedCA(identity.DefaultTrustDomain, certs.Options{})
	b, _ := certs.NewSelfSignedCA(identity.DefaultTrustDomain, certs.Options{})
	path := writeFile(t, dir, "roots.pem", string(certs.EncodeCertificates(a.Bundle().X509Authorities())))
	src := &BundleFile{Path: path}
	got, err := src.GetX509BundleForTrustDomain(identity.DefaultTrustDomain)
	if err != nil || !got.HasX509Authority(a.SigningCertificate()) || got.HasX509Authority(b.SigningCertificate()) {
		t.Fatalf("first read: %v", err)
	}
	writeFile(t, dir, "roots.pem", string(certs.EncodeCertificates(append(a.Bundle().X509Authorities(), b.SigningCertificate()))))
	got, err = src.GetX509BundleForTrustDomain(identity.DefaultTrustDomain)
	if err != nil || !got.HasX509Authority(b.SigningCertificate()) {
		t.Fatalf("after the change: %v", err)
	}
	if _, err := src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.example")); err == nil {
		t.Fatal("bundle for a foreign trust domain")
	}
}

// TLSConfig accepts a server that chains to the roots and presents
// ServerID (or the ID asked for), and nothing else.
func TestTLSConfigAuthorizesServerID(t *testing.T) {
	td := identity.DefaultTrustDomain
	authority, err := certs.NewSelfSignedCA(td, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	other, err := certs.NewSelfSignedCA(td, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := identity.ControlPlane(td).String(), "spiffe://cluster.local/ns/ambit-system/sa/istiod-lite"; got != want {
		t.Fatalf("ServerID = %s, want %s", got, want)
	}
	someone := spiffeid.RequireFromString("spiffe://cluster.local/ns/x/sa/y")
	serving := certs.ServingOptions{DNSNames: []string{identity.ControlPlaneDNSName}}
	for name, tc := range map[string]struct {
		signer *certs.CA
		id     spiffeid.ID // the server's
		opts   *certs.ServingOptions
		want   spiffeid.ID // the client's expectation (zero: ServerID)
		ok     bool
	}{
		"istiod-lite":      {authority, identity.ControlPlane(td), &serving, spiffeid.ID{}, true},
		"wrong identity":   {authority, someone, &serving, spiffeid.ID{}, false},
		"explicit id":      {authority, someone, &serving, someone, true},
		"untrusted signer": {other, identity.ControlPlane(td), &serving, spiffeid.ID{}, false},
		// What a node proxy could have been issued from a CSR for
		// istiod-lite's SPIFFE ID: the right ID, but not a serving
		// certificate (the CA puts no DNS SAN on CSR-issued certificates).
		"istiod-lite's ID without the serving DNS SAN": {authority, identity.ControlPlane(td), nil, spiffeid.ID{}, false},
	} {
		t.Run(name, func(t *testing.T) {
			var svid *x509svid.SVID
			var err error
			if tc.opts != nil {
				svid, err = tc.signer.IssueServing(tc.id, 0, *tc.opts)
			} else {
				svid, err = tc.signer.IssueSVID(tc.id, 0)
			}
			if err != nil {
				t.Fatal(err)
			}
			err = handshake(t, &tls.Config{Certificates: []tls.Certificate{*certs.TLSCertificate(svid)}, NextProtos: []string{"h2"}},
				TLSConfig(authority.Bundle(), td, tc.want))
			if (err == nil) != tc.ok {
				t.Fatalf("handshake: %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

// handshake runs a TLS handshake over loopback TCP (net.Pipe would
// deadlock when both sides write, e.g. an alert against a flight).
func handshake(t *testing.T, server, client *tls.Config) error {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", server)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_ = c.(*tls.Conn).Handshake()
		c.Close()
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), client)
	if err == nil {
		if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
			t.Errorf("ALPN %q, want h2", p)
		}
		c.Close()
	}
	<-done
	return err
}

// The token file is read for every call: kubelet rotates projected tokens.
func TestTokenFileIsReadPerCall(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "token", "first\n")
	creds := (&Client{TokenFile: path, Token: "static"}).credential()
	for _, want := range []string{"first", "second"} {
		writeFile(t, dir, "token", want+"\n")
		md, err := creds.GetRequestMetadata(context.Background())
		if err != nil || md["authorization"] != "Bearer "+want {
			t.Fatalf("metadata %v, %v; want token %q", md, err, want)
		}
	}
	if md, err := (&Client{Token: "static"}).credential().GetRequestMetadata(context.Background()); err != nil || md["authorization"] != "Bearer static" {
		t.Fatalf("static token: %v, %v", md, err)
	}
	if _, err := (&Client{}).credential().GetRequestMetadata(context.Background()); err == nil {
		t.Fatal("metadata without a token")
	}
	shared := &credential.Bearer{Token: "shared"}
	if got := (&Client{Credential: shared, Token: "static"}).credential(); got != shared {
		t.Fatal("Credential is not the one used")
	}
	if _, err := (&Client{}).Issue(context.Background(), identity.ControlPlane(identity.DefaultTrustDomain), nil); err == nil {
		t.Fatal("Issue without Addr and Roots")
	}
}

// The reason this package exists: every ztunnel links it, so it must not
// pull in client-go, apimachinery or the Kubernetes API types.
func TestNoKubernetesAPIDependencies(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command:", err)
	}
	out, err := exec.Command(gobin, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		for _, banned := range []string{"k8s.io/client-go", "k8s.io/api/", "k8s.io/apimachinery"} {
			if strings.HasPrefix(p, banned) {
				t.Errorf("depends on %s", p)
			}
		}
	}
}

func writeFile(t *testing.T, dir, name, data string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
