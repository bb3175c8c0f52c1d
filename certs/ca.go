package certs

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// DefaultLeafTTL is the lifetime of an issued workload certificate.
const DefaultLeafTTL = 24 * time.Hour

// MaxCSRSize bounds the DER size of a certificate signing request.
const MaxCSRSize = 16 << 10

// RSA key sizes a CSR may carry.
const (
	MinRSABits = 2048
	MaxRSABits = 8192
)

// ErrBadCSR is returned (wrapped) for any certificate signing request that the
// CA refuses to sign.
var ErrBadCSR = errors.New("bad certificate signing request")

// CA signs X.509-SVIDs for workload identities in one trust domain.
// Create it with NewSelfSignedCA, NewCA, LoadCAFiles, LoadOrCreateCA or
// Material.CA; it is safe for concurrent use (its fields are not changed
// after creation). It is also an Issuer, for local, in-process use.
type CA struct {
	td     spiffeid.TrustDomain
	signer crypto.Signer
	cert   *x509.Certificate   // signing certificate (root or intermediate)
	chain  []*x509.Certificate // intermediates from cert up to, not including, a root
	roots  []*x509.Certificate // trust bundle: may hold more than one root during rotation
	ttl    time.Duration
	now    func() time.Time
}

// Options tune a CA. The zero value is usable.
type Options struct {
	// LeafTTL is the default and maximum lifetime of issued certificates
	// (DefaultLeafTTL if zero).
	LeafTTL time.Duration
	// Now is the clock (time.Now if nil); tests set it.
	Now func() time.Time
	// ExtraRoots are further trusted roots (e.g. the previous root while a
	// root rotates, or the next one before it signs); they go into the bundle
	// but sign nothing.
	ExtraRoots []*x509.Certificate
}

func (o Options) clock() func() time.Time {
	if o.Now != nil {
		return o.Now
	}
	return time.Now
}

// RootTTL is the lifetime of a root that NewSelfSignedCA generates.
const RootTTL = 10 * 365 * 24 * time.Hour

// NewSelfSignedCA generates a new ECDSA P-256 root for td, valid for RootTTL.
func NewSelfSignedCA(td spiffeid.TrustDomain, opts Options) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate root key: %w", err)
	}
	now := opts.clock()()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{Organization: []string{td.Name()}, CommonName: "ambit root CA " + now.UTC().Format("2006-01-02T15:04:05Z")},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(RootTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create root certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse root certificate: %w", err)
	}
	return NewCA(td, cert, key, nil, []*x509.Certificate{cert}, opts)
}

// NewCA makes a CA that signs with cert and key. chain holds the
// intermediates between cert and a root (sent with every issued certificate);
// roots is the trust bundle and must contain the root that anchors cert.
func NewCA(td spiffeid.TrustDomain, cert *x509.Certificate, key crypto.Signer, chain, roots []*x509.Certificate, opts Options) (*CA, error) {
	if td.IsZero() {
		return nil, errors.New("new ca: empty trust domain")
	}
	if cert == nil || key == nil {
		return nil, errors.New("new ca: certificate and key are required")
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errors.New("new ca: signing certificate is not a CA certificate with certSign usage")
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return nil, errors.New("new ca: key does not match the signing certificate")
	}
	if len(roots) == 0 {
		return nil, errors.New("new ca: empty trust bundle")
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain {
		inter.AddCert(c)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: opts.clock()(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("new ca: signing certificate does not chain to the bundle: %w", err)
	}
	ttl := opts.LeafTTL
	if ttl <= 0 {
		ttl = DefaultLeafTTL
	}
	all := append(append([]*x509.Certificate(nil), roots...), opts.ExtraRoots...)
	return &CA{td: td, signer: key, cert: cert, chain: chain, roots: dedupe(all), ttl: ttl, now: opts.clock()}, nil
}

// TrustDomain returns the CA's trust domain.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.td }

// Bundle returns a fresh copy of the trust bundle.
func (ca *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, ca.roots)
}

// SigningCertificate returns the certificate the CA signs with.
func (ca *CA) SigningCertificate() *x509.Certificate { return ca.cert }

// Issue implements Issuer: it signs csrDER for id with the default TTL.
func (ca *CA) Issue(_ context.Context, id spiffeid.ID, csrDER []byte) ([]*x509.Certificate, error) {
	return ca.SignCSR(csrDER, id, 0)
}

// TrustBundle implements Issuer.
func (ca *CA) TrustBundle(context.Context) (*x509bundle.Bundle, error) {
	return ca.Bundle(), nil
}

// SignCSR checks a DER-encoded PKCS#10 request for id and returns the issued
// chain: the leaf first, then any intermediates. ttl <= 0 or above the CA's
// LeafTTL means LeafTTL; it is capped at the signing certificate's own expiry.
// Every refusal wraps ErrBadCSR.
func (ca *CA) SignCSR(csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if len(csrDER) == 0 || len(csrDER) > MaxCSRSize {
		return nil, fmt.Errorf("%w: size %d out of range (1..%d bytes)", ErrBadCSR, len(csrDER), MaxCSRSize)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	// Check names and key before the (possibly expensive) signature.
	if err := ca.checkRequest(csr, id); err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %v", ErrBadCSR, err)
	}
	return ca.sign(csr.PublicKey, id, ttl, nil)
}

// IssueSVID generates a P-256 key for id and signs it: for local mode and
// tests, where the caller is trusted to hold the key.
func (ca *CA) IssueSVID(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	return ca.issue(id, ttl, nil)
}

// ServingOptions add names to a serving certificate (IssueServing).
type ServingOptions struct {
	DNSNames    []string
	IPAddresses []net.IP
}

// IssueServing generates a key and a certificate for a server: its SPIFFE ID
// id plus DNS and IP SANs, for clients that verify a host name (istiod-lite on
// 15012).
func (ca *CA) IssueServing(id spiffeid.ID, ttl time.Duration, names ServingOptions) (*x509svid.SVID, error) {
	return ca.issue(id, ttl, func(t *x509.Certificate) {
		t.DNSNames = names.DNSNames
		t.IPAddresses = names.IPAddresses
		if len(names.DNSNames) > 0 {
			t.Subject.CommonName = names.DNSNames[0]
		}
	})
}

func (ca *CA) issue(id spiffeid.ID, ttl time.Duration, tweak func(*x509.Certificate)) (*x509svid.SVID, error) {
	if !id.MemberOf(ca.td) {
		return nil, fmt.Errorf("issue svid: %s is not in trust domain %s", id, ca.td)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("issue svid: %w", err)
	}
	chain, err := ca.sign(key.Public(), id, ttl, tweak)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

func (ca *CA) checkRequest(csr *x509.CertificateRequest, id spiffeid.ID) error {
	if id.IsZero() {
		return fmt.Errorf("%w: no identity requested", ErrBadCSR)
	}
	if !id.MemberOf(ca.td) {
		return fmt.Errorf("%w: %s is not in trust domain %s", ErrBadCSR, id, ca.td)
	}
	if len(csr.URIs) != 1 {
		return fmt.Errorf("%w: want exactly one URI SAN, got %d", ErrBadCSR, len(csr.URIs))
	}
	if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		return fmt.Errorf("%w: only a SPIFFE URI SAN is allowed", ErrBadCSR)
	}
	got, err := spiffeid.FromURI(csr.URIs[0])
	if err != nil {
		return fmt.Errorf("%w: URI SAN: %v", ErrBadCSR, err)
	}
	if got != id {
		return fmt.Errorf("%w: URI SAN %s differs from requested identity %s", ErrBadCSR, got, id)
	}
	switch pub := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if pub.Curve != elliptic.P256() && pub.Curve != elliptic.P384() {
			return fmt.Errorf("%w: ECDSA curve %s not allowed (P-256 or P-384)", ErrBadCSR, pub.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if n := pub.N.BitLen(); n < MinRSABits || n > MaxRSABits {
			return fmt.Errorf("%w: RSA key of %d bits (want %d..%d)", ErrBadCSR, n, MinRSABits, MaxRSABits)
		}
	default:
		return fmt.Errorf("%w: key type %T not allowed", ErrBadCSR, pub)
	}
	return nil
}

func (ca *CA) sign(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration, tweak func(*x509.Certificate)) ([]*x509.Certificate, error) {
	if ttl <= 0 || ttl > ca.ttl {
		ttl = ca.ttl
	}
	now := ca.now()
	if !now.Before(ca.cert.NotAfter) {
		return nil, fmt.Errorf("sign %s: signing certificate expired at %s", id, ca.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(ttl)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	usage := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		NotBefore:             now.Add(-time.Minute), // tolerate small clock skew
		NotAfter:              notAfter,
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	if tweak != nil {
		tweak(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.signer)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	out := []*x509.Certificate{leaf}
	if !isSelfSigned(ca.cert) {
		out = append(out, ca.cert)
	}
	return append(out, ca.chain...), nil
}

func isSelfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}

func dedupe(certs []*x509.Certificate) []*x509.Certificate {
	var out []*x509.Certificate
next:
	for _, c := range certs {
		for _, o := range out {
			if o.Equal(c) {
				continue next
			}
		}
		out = append(out, c)
	}
	return out
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err)) // crypto/rand never fails on Linux
	}
	return n
}
