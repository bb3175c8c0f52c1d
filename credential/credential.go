// Package credential holds the bearer token a node proxy or a waypoint
// presents to istiod-lite, on xDS (xdsclient) and on the certificate service
// (certs/caclient) alike. Bearer implements gRPC's per-RPC credentials: it
// reads the token file at every call, since kubelet rotates projected
// service-account tokens, and it refuses to send the token without TLS.
//
//	tok := &credential.Bearer{File: "/var/run/secrets/tokens/istio-token"}
//	ca := &caclient.Client{Addr: addr, Roots: roots, Credential: tok}
//	xds := &xdsclient.Client{Addr: addr, TLS: tlsConf, Credential: tok, ...}
package credential

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc/credentials"
)

// Bearer is a bearer token for gRPC calls. Set File or Token; a zero
// Bearer fails every call. It is safe for concurrent use.
type Bearer struct {
	// File holds the token; it is read at every call (projected tokens
	// rotate). Surrounding white space is ignored. It wins over Token.
	File string
	// Token is a static token (local mode: the host's secret; tests).
	Token string
}

var _ credentials.PerRPCCredentials = (*Bearer)(nil)

// Value returns the current token: File's content, else Token.
func (b *Bearer) Value() (string, error) {
	tok := b.Token
	if b.File != "" {
		raw, err := os.ReadFile(b.File)
		if err != nil {
			return "", fmt.Errorf("read token: %w", err)
		}
		tok = string(raw)
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return "", errors.New("credential: empty bearer token")
	}
	return tok, nil
}

// IsZero reports whether no token is configured.
func (b *Bearer) IsZero() bool { return b == nil || b.File == "" && b.Token == "" }

// GetRequestMetadata implements credentials.PerRPCCredentials: the
// authorization header, read anew.
func (b *Bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := b.Value()
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: a
// bearer token never goes out in clear.
func (*Bearer) RequireTransportSecurity() bool { return true }
