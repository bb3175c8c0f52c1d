package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"net/url"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// FuzzSignCSR feeds arbitrary bytes to the CSR path. Whatever the input, the
// CA either refuses with ErrBadCSR or issues a certificate whose only SAN is
// the requested identity and which verifies against the bundle.
func FuzzSignCSR(f *testing.F) {
	ca := newTestCA(f)
	id := mustID(f, "shop", "cart")
	other := mustID(f, "shop", "admin")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaSmall, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		f.Fatal(err)
	}
	seed := func(key any, tmpl *x509.CertificateRequest) {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(der)
	}
	seed(key, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}})
	seed(key, &x509.CertificateRequest{URIs: []*url.URL{other.URL()}})
	seed(key, &x509.CertificateRequest{URIs: []*url.URL{id.URL(), other.URL()}})
	seed(key, &x509.CertificateRequest{URIs: []*url.URL{{Scheme: "https", Host: "cluster.local"}}})
	seed(key, &x509.CertificateRequest{URIs: []*url.URL{spiffeid.RequireFromString("spiffe://evil.example/ns/shop/sa/cart").URL()}})
	seed(key, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}, DNSNames: []string{"x"}})
	seed(rsaSmall, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}})
	f.Add([]byte{})
	f.Add([]byte{0x30, 0x82, 0xff, 0xff})

	f.Fuzz(func(t *testing.T, csr []byte) {
		chain, err := ca.SignCSR(csr, id, 0)
		if err != nil {
			if !errors.Is(err, ErrBadCSR) {
				t.Fatalf("refusal %v does not wrap ErrBadCSR", err)
			}
			return
		}
		leaf := chain[0]
		if len(leaf.URIs) != 1 || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
			t.Fatalf("issued SANs: %v %v %v", leaf.URIs, leaf.DNSNames, leaf.IPAddresses)
		}
		got, _, err := x509svid.Verify(chain, ca.Bundle(), x509svid.WithTime(testNow))
		if err != nil || got != id {
			t.Fatalf("issued certificate: id %s, verify %v", got, err)
		}
	})
}
