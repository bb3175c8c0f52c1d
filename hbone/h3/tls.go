package h3

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/hbone"
)

// alpn is HTTP/3's protocol name (RFC 9114), the only one spoken.
const alpn = "h3"

// currentSVID gets id's SVID from src and refuses one that is not valid now
// (hbone.ErrExpiredCertificate, wrapped).
func currentSVID(ctx context.Context, src hbone.CertSource, id spiffeid.ID) (*x509svid.SVID, error) {
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
			leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339), hbone.ErrExpiredCertificate)
	}
	return svid, nil
}

// verifyPeer checks the peer of a completed handshake, full or resumed:
// ALPN, the certificate chain against bundles (now: an expired one fails),
// and authorize on its SPIFFE ID. crypto/tls skips VerifyPeerCertificate
// on a resumed session and hands the certificates stored in the ticket to
// VerifyConnection, so this runs there, on every handshake.
func verifyPeer(cs tls.ConnectionState, bundles x509bundle.Source, authorize tlsconfig.Authorizer) (spiffeid.ID, error) {
	if cs.NegotiatedProtocol != alpn {
		return spiffeid.ID{}, fmt.Errorf("alpn %q, want %q", cs.NegotiatedProtocol, alpn)
	}
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("no peer certificate")
	}
	id, chains, err := x509svid.Verify(cs.PeerCertificates, bundles)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("peer certificate: %w", err)
	}
	if err := authorize(id, chains); err != nil {
		return spiffeid.ID{}, fmt.Errorf("peer %s: %w", id, err)
	}
	return id, nil
}

// clientTLSConfig presents svid and accepts only servers whose SVID
// verifies against bundles with an ID in peers, on full and resumed
// handshakes. cache (per pool key, never shared between keys) holds the
// sessions to resume; serverIP is their key in it. No SNI is sent: an IP
// literal as ServerName is not (RFC 6066), but crypto/tls keys a QUIC
// client's sessions by ServerName alone, and resumes nothing without one.
func clientTLSConfig(svid *x509svid.SVID, bundles x509bundle.Source, peers []spiffeid.ID, cache tls.ClientSessionCache, serverIP netip.Addr) *tls.Config {
	cfg := tlsconfig.MTLSClientConfig(svid, bundles, tlsconfig.AuthorizeOneOf(peers...))
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{alpn}
	cfg.ServerName = ""
	if serverIP.IsValid() {
		cfg.ServerName = serverIP.String()
	}
	cfg.VerifyPeerCertificate = nil // not called on resumption: VerifyConnection is
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		_, err := verifyPeer(cs, bundles, tlsconfig.AuthorizeOneOf(peers...))
		return err
	}
	cfg.ClientSessionCache = cache
	return cfg
}

// serverTLSConfig presents svid and requires a client SVID from svid's
// trust domain, on full and resumed handshakes (session tickets are on:
// VerifyConnection re-verifies the client certificate they carry). onFail
// is told of a refused peer.
func serverTLSConfig(svid *x509svid.SVID, bundles x509bundle.Source, onFail func(error)) *tls.Config {
	authorize := tlsconfig.AuthorizeMemberOf(svid.ID.TrustDomain())
	cfg := tlsconfig.MTLSServerConfig(svid, bundles, authorize)
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{alpn}
	cfg.VerifyPeerCertificate = nil
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		_, err := verifyPeer(cs, bundles, authorize)
		if err != nil && onFail != nil {
			onFail(err)
		}
		return err
	}
	return cfg
}

// x509svidID returns the peer's SPIFFE ID of a verified handshake.
func x509svidID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("no peer certificate")
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}
