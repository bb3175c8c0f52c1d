package caclient

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	capb "github.com/ambit-mesh/ambit/api/ca/v1"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/credential"
	"github.com/ambit-mesh/ambit/identity"
)

// Client is the gRPC client of the certificate service; it implements
// certs.Issuer for a certs.Manager. The zero value with Addr, Roots and a
// credential set is usable; it dials on first use. Close releases the
// connection.
type Client struct {
	// Addr is istiod-lite's host:port (required), e.g.
	// "istiod-lite.ambit-system.svc:15012".
	Addr string
	// TrustDomain (identity.DefaultTrustDomain if zero).
	TrustDomain spiffeid.TrustDomain
	// Roots verifies istiod-lite's serving certificate (required): in a
	// cluster, the root bundle mounted from a ConfigMap; it is consulted at
	// each handshake.
	Roots x509bundle.Source
	// ServerID is the identity the server must present (ServerID of the
	// trust domain if zero).
	ServerID spiffeid.ID
	// Credential is the bearer token sent with every call (read anew at
	// each call); share one with the xDS client. When nil, TokenFile and
	// Token are used as credential.Bearer{File: TokenFile, Token: Token}.
	Credential *credential.Bearer
	// TokenFile holds the bearer token and is read before every call, since
	// kubelet rotates projected tokens. When empty, Token is used.
	TokenFile string
	// Token is a static bearer token (local mode: the host's secret).
	Token string
	// DialOptions are appended to the client's (tests, custom dialers).
	DialOptions []grpc.DialOption

	mu     sync.Mutex // guards conn, bundle
	conn   *grpc.ClientConn
	bundle *x509bundle.Bundle // from the last CreateCertificate
}

var _ certs.Issuer = (*Client)(nil)

func (c *Client) td() spiffeid.TrustDomain {
	if c.TrustDomain.IsZero() {
		return identity.DefaultTrustDomain
	}
	return c.TrustDomain
}

func (c *Client) client() (capb.CertificateServiceClient, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		if c.Addr == "" || c.Roots == nil {
			return nil, errors.New("ca client: Addr and Roots are required")
		}
		opts := append([]grpc.DialOption{
			grpc.WithTransportCredentials(credentials.NewTLS(TLSConfig(c.Roots, c.td(), c.ServerID))),
			grpc.WithPerRPCCredentials(c.credential()),
		}, c.DialOptions...)
		conn, err := grpc.NewClient(c.Addr, opts...)
		if err != nil {
			return nil, fmt.Errorf("ca client: %w", err)
		}
		c.conn = conn
	}
	return capb.NewCertificateServiceClient(c.conn), nil
}

// Issue implements certs.Issuer.
func (c *Client) Issue(ctx context.Context, id spiffeid.ID, csrDER []byte) ([]*x509.Certificate, error) {
	cl, err := c.client()
	if err != nil {
		return nil, err
	}
	resp, err := cl.CreateCertificate(ctx, &capb.CreateCertificateRequest{
		Identity: id.String(),
		Csr:      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
	})
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	chain, err := certs.ParseCertificates([]byte(strings.Join(resp.GetCertChain(), "")))
	if err != nil {
		return nil, fmt.Errorf("create certificate: chain: %w", err)
	}
	if b, err := c.parseBundle(resp.GetTrustBundle()); err == nil {
		c.mu.Lock()
		c.bundle = b
		c.mu.Unlock()
	}
	return chain, nil
}

// TrustBundle implements certs.Issuer: the bundle that came with the last
// certificate, else (before the first) one from GetTrustBundle.
func (c *Client) TrustBundle(ctx context.Context) (*x509bundle.Bundle, error) {
	c.mu.Lock()
	b := c.bundle
	c.mu.Unlock()
	if b != nil {
		return b, nil
	}
	cl, err := c.client()
	if err != nil {
		return nil, err
	}
	resp, err := cl.GetTrustBundle(ctx, &capb.GetTrustBundleRequest{})
	if err != nil {
		return nil, fmt.Errorf("get trust bundle: %w", err)
	}
	if resp.GetTrustDomain() != c.td().Name() {
		return nil, fmt.Errorf("get trust bundle: server is in trust domain %q, want %q", resp.GetTrustDomain(), c.td().Name())
	}
	return c.parseBundle(resp.GetTrustBundle())
}

func (c *Client) parseBundle(pems []string) (*x509bundle.Bundle, error) {
	roots, err := certs.ParseCertificates([]byte(strings.Join(pems, "")))
	if err != nil {
		return nil, fmt.Errorf("trust bundle: %w", err)
	}
	return x509bundle.FromX509Authorities(c.td(), roots), nil
}

// Close closes the connection. It is idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn = nil
	return err
}

func (c *Client) credential() *credential.Bearer {
	if c.Credential != nil {
		return c.Credential
	}
	return &credential.Bearer{File: c.TokenFile, Token: c.Token}
}
