package certs

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/identity"
)

var testNow = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func fixedClock() func() time.Time { return func() time.Time { return testNow } }

func newTestCA(t testing.TB) *CA {
	t.Helper()
	ca, err := NewSelfSignedCA(identity.DefaultTrustDomain, Options{Now: fixedClock()})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func mustID(t testing.TB, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := identity.Workload(identity.DefaultTrustDomain, ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestIssuedSVIDVerifiesAgainstBundle(t *testing.T) {
	ca := newTestCA(t)
	id := mustID(t, "shop", "cart")
	svid, err := ca.IssueSVID(id, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := x509svid.Verify(svid.Certificates, ca.Bundle(), x509svid.WithTime(testNow))
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if got != id {
		t.Fatalf("verified id %s, want %s", got, id)
	}
	if ttl := svid.Certificates[0].NotAfter.Sub(testNow); ttl != DefaultLeafTTL {
		t.Fatalf("leaf ttl %s, want %s", ttl, DefaultLeafTTL)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, ca.Bundle(), x509svid.WithTime(testNow.Add(DefaultLeafTTL+time.Second))); err == nil {
		t.Fatal("expired svid verified")
	}
	ns, sa, err := identity.ParseWorkload(id)
	if err != nil || ns != "shop" || sa != "cart" {
		t.Fatalf("ParseWorkloadID = %q, %q, %v", ns, sa, err)
	}
}

func TestLeafTTLIsConfigurableAndCapped(t *testing.T) {
	ca, err := NewSelfSignedCA(identity.DefaultTrustDomain, Options{Now: fixedClock(), LeafTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, "shop", "cart")
	for _, tc := range []struct {
		ask, want time.Duration
	}{{0, time.Hour}, {10 * time.Minute, 10 * time.Minute}, {48 * time.Hour, time.Hour}} {
		csr := csrFor(t, ecKey(t), id.URL())
		chain, err := ca.SignCSR(csr, id, tc.ask)
		if err != nil {
			t.Fatal(err)
		}
		if got := chain[0].NotAfter.Sub(testNow); got != tc.want {
			t.Errorf("ttl %s: got %s, want %s", tc.ask, got, tc.want)
		}
	}
}

// An operator-provided intermediate: issued leaves carry it, and verify
// against a bundle that holds only the root.
func TestIntermediateCA(t *testing.T) {
	root := newTestCA(t)
	inter := newIntermediate(t, root)
	id := mustID(t, "shop", "cart")
	chain, err := inter.SignCSR(csrFor(t, ecKey(t), id.URL()), id, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || !chain[1].Equal(inter.SigningCertificate()) {
		t.Fatalf("chain has %d certificates, want leaf + intermediate", len(chain))
	}
	if got, _, err := x509svid.Verify(chain, root.Bundle(), x509svid.WithTime(testNow)); err != nil || got != id {
		t.Fatalf("verify = %s, %v", got, err)
	}
	// Without the intermediate the leaf does not verify: the chain matters.
	if _, _, err := x509svid.Verify(chain[:1], root.Bundle(), x509svid.WithTime(testNow)); err == nil {
		t.Fatal("leaf verified without its intermediate")
	}
}

// newIntermediate makes a CA whose signing certificate root signed.
func newIntermediate(t testing.TB, root *CA) *CA {
	t.Helper()
	key := ecKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "ambit intermediate"},
		NotBefore:             testNow.Add(-time.Hour),
		NotAfter:              testNow.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{identity.DefaultTrustDomain.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root.cert, key.Public(), root.signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := NewCA(identity.DefaultTrustDomain, cert, key, nil, root.roots, Options{Now: fixedClock()})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestSignCSRRefusals(t *testing.T) {
	ca := newTestCA(t)
	id := mustID(t, "shop", "cart")
	other := mustID(t, "shop", "admin")
	foreign := spiffeid.RequireFromString("spiffe://evil.example/ns/shop/sa/cart")
	good := csrFor(t, ecKey(t), id.URL())
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	tampered := append([]byte(nil), good...)
	tampered[len(tampered)-5] ^= 0xff // inside the signature

	for _, tc := range []struct {
		name string
		csr  []byte
		id   spiffeid.ID
		want string
	}{
		{"SAN differs from requested identity", csrFor(t, ecKey(t), other.URL()), id, "differs"},
		{"several URI SANs", csrFor(t, ecKey(t), id.URL(), other.URL()), id, "exactly one URI SAN"},
		{"no SAN", csrFor(t, ecKey(t)), id, "exactly one URI SAN"},
		{"DNS SAN besides the URI", csrWith(t, ecKey(t), &x509.CertificateRequest{URIs: []*url.URL{id.URL()}, DNSNames: []string{"evil.example"}}), id, "only a SPIFFE URI"},
		{"non-SPIFFE URI", csrFor(t, ecKey(t), &url.URL{Scheme: "https", Host: "cluster.local", Path: "/ns/shop/sa/cart"}), id, "URI SAN"},
		{"foreign trust domain", csrFor(t, ecKey(t), foreign.URL()), foreign, "not in trust domain"},
		{"empty identity", good, spiffeid.ID{}, "no identity"},
		{"malformed", []byte("not a csr at all"), id, "bad certificate signing request"},
		{"empty", nil, id, "size 0"},
		{"huge", make([]byte, MaxCSRSize+1), id, "out of range"},
		{"bad signature", tampered, id, "signature"},
		{"RSA 1024", csrFor(t, rsa1024, id.URL()), id, "RSA key of 1024 bits"},
		{"Ed25519", csrFor(t, edKey, id.URL()), id, "not allowed"},
		{"P-224", csrFor(t, p224, id.URL()), id, "P-224 not allowed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := ca.SignCSR(tc.csr, tc.id, 0)
			if err == nil {
				t.Fatalf("signed: %v", chain[0].URIs)
			}
			if !errors.Is(err, ErrBadCSR) {
				t.Errorf("error %v does not wrap ErrBadCSR", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}

func TestSignCSRAcceptsRSA2048(t *testing.T) {
	ca := newTestCA(t)
	id := mustID(t, "shop", "cart")
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := ca.SignCSR(csrFor(t, k, id.URL()), id, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := x509svid.Verify(chain, ca.Bundle(), x509svid.WithTime(testNow)); err != nil || got != id {
		t.Fatalf("verify = %s, %v", got, err)
	}
}

func TestIssueServing(t *testing.T) {
	ca := newTestCA(t)
	id := mustID(t, "ambit-system", "istiod-lite")
	svid, err := ca.IssueServing(id, 0, ServingOptions{DNSNames: []string{"istiod-lite.ambit-system.svc"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}})
	if err != nil {
		t.Fatal(err)
	}
	leaf := svid.Certificates[0]
	pool := x509.NewCertPool()
	pool.AddCert(ca.roots[0])
	for _, host := range []string{"istiod-lite.ambit-system.svc", "127.0.0.1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: host, Roots: pool, CurrentTime: testNow}); err != nil {
			t.Errorf("verify for %s: %v", host, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "other.svc", Roots: pool, CurrentTime: testNow}); err == nil {
		t.Error("serving certificate verified for another host name")
	}
}

func TestCARefusesAfterItsOwnExpiry(t *testing.T) {
	now := testNow
	ca, err := NewSelfSignedCA(identity.DefaultTrustDomain, Options{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, "shop", "cart")
	now = testNow.Add(RootTTL - time.Hour)
	chain, err := ca.IssueSVID(id, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !chain.Certificates[0].NotAfter.Equal(ca.cert.NotAfter) {
		t.Errorf("leaf outlives its CA: %s > %s", chain.Certificates[0].NotAfter, ca.cert.NotAfter)
	}
	now = testNow.Add(RootTTL + time.Hour)
	if _, err := ca.IssueSVID(id, 0); err == nil {
		t.Fatal("expired CA issued a certificate")
	}
}

func ecKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func csrFor(t testing.TB, key any, uris ...*url.URL) []byte {
	t.Helper()
	return csrWith(t, key, &x509.CertificateRequest{URIs: uris})
}

func csrWith(t testing.TB, key any, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
