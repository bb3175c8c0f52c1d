package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	capb "github.com/ambit-mesh/ambit/api/ca/v1"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
)

type anyWorkload struct{}

func (anyWorkload) OnNode(context.Context, string, string, string) (bool, error) { return true, nil }

type nodeCaller struct{}

func (nodeCaller) Authenticate(context.Context, string) (*auth.Caller, error) {
	return &auth.Caller{Kind: auth.NodeProxy, Name: "host fuzz", Node: "fuzz"}, nil
}

// FuzzCreateCertificate drives the service's request path (identity string,
// PEM, validity) behind authentication: a request either gets
// InvalidArgument or a certificate for exactly the identity it named.
func FuzzCreateCertificate(f *testing.F) {
	authority, err := certs.NewSelfSignedCA(identity.DefaultTrustDomain, certs.Options{})
	if err != nil {
		f.Fatal(err)
	}
	s := &Server{CA: authority, Authenticator: nodeCaller{}, Workloads: anyWorkload{}}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	der, err := certs.NewCSR(key, id)
	if err != nil {
		f.Fatal(err)
	}
	good := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	f.Add(id.String(), good, int64(0))
	f.Add("spiffe://cluster.local/ns/shop/sa/other", good, int64(3600))
	f.Add("spiffe://evil.example/ns/shop/sa/cart", good, int64(0))
	f.Add(id.String(), good+good, int64(0))
	f.Add(id.String(), strings.Replace(good, "REQUEST", "REQUES", 1), int64(-5))
	f.Add("cart", "", int64(1<<62))
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer x"))

	f.Fuzz(func(t *testing.T, identity, csr string, validity int64) {
		resp, err := s.createCertificate(ctx, &capb.CreateCertificateRequest{Identity: identity, Csr: csr, ValidityDuration: validity})
		if err != nil {
			if c := status.Code(err); c != codes.InvalidArgument {
				t.Fatalf("code %s (%v), want InvalidArgument", c, err)
			}
			return
		}
		chain, err := certs.ParseCertificates([]byte(strings.Join(resp.CertChain, "")))
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := x509svid.Verify(chain, authority.Bundle())
		if err != nil || got.String() != identity {
			t.Fatalf("issued for %q: %s, %v", identity, got, err)
		}
	})
}
