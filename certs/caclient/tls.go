package caclient

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"slices"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/ambit-mesh/ambit/identity"
)

// TLSConfig verifies istiod-lite's serving certificate the SPIFFE way: it
// must chain to the bundle that roots supplies (read at each handshake, so
// bundle updates apply), carry the ID server (ServerID of td when zero) and
// be a serving certificate (identity.ControlPlaneDNSName).
// It offers TLS 1.3 and ALPN h2, for the certificate service and xDS alike.
func TLSConfig(roots x509bundle.Source, td spiffeid.TrustDomain, server spiffeid.ID) *tls.Config {
	if server.IsZero() {
		server = identity.ControlPlane(td)
	}
	c := tlsconfig.TLSClientConfig(roots, tlsconfig.AuthorizeID(server))
	verifySPIFFE := c.VerifyPeerCertificate
	c.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
		if err := verifySPIFFE(raw, chains); err != nil {
			return err
		}
		leaf, err := x509.ParseCertificate(raw[0]) // verifySPIFFE has checked there is one
		if err != nil {
			return err
		}
		if !slices.Contains(leaf.DNSNames, identity.ControlPlaneDNSName) {
			return errors.New("caclient: the peer's certificate is not a serving certificate of istiod-lite (no DNS SAN " + identity.ControlPlaneDNSName + ")")
		}
		return nil
	}
	c.MinVersion = tls.VersionTLS13
	c.NextProtos = []string{"h2"}
	return c
}
