package ca

import (
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/ambit-mesh/ambit/certs"
)

// DefaultDNSName is the DNS SAN of istiod-lite's serving certificate.
const DefaultDNSName = "istiod-lite." + DefaultNamespace + ".svc"

// ServerID is istiod-lite's SPIFFE ID in td: its service account's.
func ServerID(td spiffeid.TrustDomain) spiffeid.ID {
	id, _ := certs.WorkloadID(td, DefaultNamespace, "istiod-lite")
	return id
}

// ServingCert is istiod-lite's TLS identity on 15012: a certificate signed by
// CA with the URI SAN ID and the DNS SANs DefaultDNSName + DNSNames, renewed
// at half of its lifetime on the next handshake. The zero value with CA set
// is usable.
type ServingCert struct {
	// CA issues the certificate (required).
	CA *certs.CA
	// ID is the URI SAN (ServerID of the CA's trust domain if zero).
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
		id = ServerID(s.CA.TrustDomain())
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

// ClientTLSConfig verifies istiod-lite's serving certificate the SPIFFE way:
// it must chain to the bundle that roots supplies (read at each handshake, so
// bundle updates apply) and carry the ID server (ServerID of the trust domain
// when zero).
func ClientTLSConfig(roots x509bundle.Source, td spiffeid.TrustDomain, server spiffeid.ID) *tls.Config {
	if server.IsZero() {
		server = ServerID(td)
	}
	c := tlsconfig.TLSClientConfig(roots, tlsconfig.AuthorizeID(server))
	c.MinVersion = tls.VersionTLS13
	c.NextProtos = []string{"h2"}
	return c
}
