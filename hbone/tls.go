package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// alpn is the only protocol HBONE speaks.
const alpn = "h2"

// currentSVID gets id's SVID from src and refuses one that is not valid now.
func currentSVID(ctx context.Context, src CertSource, id spiffeid.ID) (*x509svid.SVID, error) {
	svid, err := src.GetX509SVID(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("svid for %s: %w", id, err)
	}
	if svid == nil || len(svid.Certificates) == 0 {
		return nil, fmt.Errorf("svid for %s: empty", id)
	}
	if svid.ID != id {
		return nil, fmt.Errorf("svid for %s: source returned %s", id, svid.ID)
	}
	leaf := svid.Certificates[0]
	if now := time.Now(); now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("svid for %s (valid %s to %s): %w", id,
			leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339), ErrExpiredCertificate)
	}
	return svid, nil
}

// clientTLSConfig presents svid and accepts only servers whose SVID
// verifies against src's bundles with an ID in peers. No SNI is sent.
func clientTLSConfig(svid *x509svid.SVID, src CertSource, peers []spiffeid.ID) *tls.Config {
	cfg := tlsconfig.MTLSClientConfig(svid, src, tlsconfig.AuthorizeOneOf(peers...))
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{alpn}
	cfg.ServerName = ""
	return cfg
}

// serverTLSConfig presents svid and requires a client SVID from svid's
// trust domain.
func serverTLSConfig(svid *x509svid.SVID, src CertSource) *tls.Config {
	cfg := tlsconfig.MTLSServerConfig(svid, src, tlsconfig.AuthorizeMemberOf(svid.ID.TrustDomain()))
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{alpn}
	cfg.SessionTicketsDisabled = true // resumption would skip peer verification
	return cfg
}

// peerID returns the verified peer identity of a completed handshake.
func peerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if cs.NegotiatedProtocol != alpn {
		return spiffeid.ID{}, fmt.Errorf("alpn %q, want %q", cs.NegotiatedProtocol, alpn)
	}
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("no peer certificate")
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}
