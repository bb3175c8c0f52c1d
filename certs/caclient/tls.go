package caclient

import (
	"crypto/tls"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/ambit-mesh/ambit/certs"
)

// DefaultNamespace is istiod-lite's namespace in a cluster.
const DefaultNamespace = "ambit-system"

// ServerID is istiod-lite's SPIFFE ID in td: that of its service account,
// DefaultNamespace/istiod-lite.
func ServerID(td spiffeid.TrustDomain) spiffeid.ID {
	id, _ := certs.WorkloadID(td, DefaultNamespace, "istiod-lite")
	return id
}

// TLSConfig verifies istiod-lite's serving certificate the SPIFFE way: it
// must chain to the bundle that roots supplies (read at each handshake, so
// bundle updates apply) and carry the ID server (ServerID of td when zero).
// It offers TLS 1.3 and ALPN h2, for the certificate service and xDS alike.
func TLSConfig(roots x509bundle.Source, td spiffeid.TrustDomain, server spiffeid.ID) *tls.Config {
	if server.IsZero() {
		server = ServerID(td)
	}
	c := tlsconfig.TLSClientConfig(roots, tlsconfig.AuthorizeID(server))
	c.MinVersion = tls.VersionTLS13
	c.NextProtos = []string{"h2"}
	return c
}
