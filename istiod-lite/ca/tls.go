package ca

import (
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
)

// DefaultDNSName is the DNS SAN of istiod-lite's serving certificate.
const DefaultDNSName = identity.ControlPlaneDNSName

// ServingCert is istiod-lite's TLS identity on 15012: a certificate signed by
// CA with the URI SAN ID and the DNS SANs DefaultDNSName + DNSNames, renewed
// at half of its lifetime on the next handshake. The zero value with CA set
// is usable.
type ServingCert struct {
	// CA issues the certificate (required).
	CA *certs.CA
	// ID is the URI SAN (caclient.ServerID of the CA's trust domain if zero).
	ID spiffeid.ID
	// DNSNames and IPAddresses are extra SANs (e.g. istiod-lite.ambit-system.svc.cluster.local, 127.0.0.1).
	DNSNames    []string
	IPAddresses []net.IP
	// TTL of the certificate (the CA's leaf TTL if zero).
	TTL time.Duration
	// Now is the clock (time.Now if nil).
	Now func() time.Time

	mu      sync.Mutex // guards cur and renewAt
	cur     *tls.Certificate
	renewAt time.Time
}

// GetCertificate returns the current certificate, issuing a new one when
// there is none or it is past half of its lifetime. It fits
// tls.Config.GetCertificate.
func (s *ServingCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	now := time.Now
	if s.Now != nil {
		now = s.Now
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil && now().Before(s.renewAt) {
		return s.cur, nil
	}
	id := s.ID
	if id.IsZero() {
		id = identity.ControlPlane(s.CA.TrustDomain())
	}
	svid, err := s.CA.IssueServing(id, s.TTL, certs.ServingOptions{
		DNSNames:    append([]string{DefaultDNSName}, s.DNSNames...),
		IPAddresses: s.IPAddresses,
	})
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	c := certs.TLSCertificate(svid)
	leaf := svid.Certificates[0]
	s.cur, s.renewAt = c, leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore)/2)
	return c, nil
}

// TLSConfig returns the server side TLS configuration for 15012 (TLS 1.3,
// ALPN h2). Clients authenticate with tokens, not certificates.
func (s *ServingCert) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: s.GetCertificate,
		NextProtos:     []string{"h2"},
	}
}
