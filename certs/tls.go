package certs

import (
	"context"
	"crypto/tls"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// SVIDGetter is the part of Provider that presents certificates.
type SVIDGetter interface {
	GetX509SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error)
}

// TLSCertificate converts an SVID for crypto/tls (chain and key; Leaf set).
func TLSCertificate(s *x509svid.SVID) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
	for _, x := range s.Certificates {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// GetCertificate returns a tls.Config.GetCertificate that presents id's
// current SVID from p, fetched under the handshake's context. Pair it with
// go-spiffe's tlsconfig.VerifyPeerCertificate(p, authorizer) so that bundle
// updates apply to the next handshake.
func GetCertificate(p SVIDGetter, id spiffeid.ID) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		return getTLS(hello.Context(), p, id)
	}
}

// GetClientCertificate is GetCertificate for the client side.
func GetClientCertificate(p SVIDGetter, id spiffeid.ID) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return func(req *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return getTLS(req.Context(), p, id)
	}
}

func getTLS(ctx context.Context, p SVIDGetter, id spiffeid.ID) (*tls.Certificate, error) {
	s, err := p.GetX509SVID(ctx, id)
	if err != nil {
		return nil, err
	}
	return TLSCertificate(s), nil
}
