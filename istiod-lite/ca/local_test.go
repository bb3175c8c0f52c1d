package ca_test

import (
	"context"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"

	capb "github.com/ambit-mesh/ambit/api/ca/v1"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
	"github.com/ambit-mesh/ambit/model"
)

// Local mode: no cluster; hosts authenticate with per-host secrets from a
// file and may obtain the identities of the model's workloads on that host.
func TestLocalModeHostAuthorization(t *testing.T) {
	dir := t.TempDir()
	authority, err := certs.LoadOrCreateCA(t.Context(), certs.FileStore{Dir: filepath.Join(dir, "ca")}, identity.DefaultTrustDomain, certs.Options{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	credFile := writeFile(t, dir, "hosts", "# host secret\nhost-a aaaaaaaaaaaaaaaaaaaaaaaa\nhost-b bbbbbbbbbbbbbbbbbbbbbbbb\nwaypoint shop/wp wwwwwwwwwwwwwwwwwwwwwwww\n")
	hosts, err := auth.LoadHostCredentials(credFile, spiffeid.TrustDomain{})
	if err != nil {
		t.Fatal(err)
	}
	var store model.Store
	store.Replace(model.NewSnapshot([]*model.Workload{
		{UID: "local/host/shop/cart", Name: "cart", Namespace: "shop", ServiceAccount: "cart", Node: "host-a", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
		{UID: "local/host/shop/pay", Name: "pay", Namespace: "shop", ServiceAccount: "pay", Node: "host-b", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
		// istiod-lite itself runs on host-a: its identity is still not host-a's.
		{UID: "local/host/ambit-system/istiod-lite", Name: "istiod-lite", Namespace: "ambit-system", ServiceAccount: "istiod-lite", Node: "host-a", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.3")}},
	}, nil, nil, nil))
	var logs logBuffer
	addr := serve(t, &ca.Server{CA: authority, Authenticator: hosts, Workloads: ca.StoreWorkloads{Store: &store}, Logger: newLogger(&logs)})

	client := &caclient.Client{Addr: addr, Roots: authority.Bundle(), Token: "aaaaaaaaaaaaaaaaaaaaaaaa"}
	t.Cleanup(func() { client.Close() })
	m := &certs.Manager{Issuer: client}
	t.Cleanup(func() { m.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	cart := wid(t, "shop", "cart")
	svid, err := m.GetX509SVID(ctx, cart)
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := x509svid.Verify(svid.Certificates, authority.Bundle()); err != nil || got != cart {
		t.Fatalf("verify: %s, %v", got, err)
	}
	_, err = client.Issue(ctx, wid(t, "shop", "pay"), mustCSRDER(t, wid(t, "shop", "pay")))
	wantCode(t, "host-a asks for host-b's workload", err, codes.PermissionDenied)
	if !logs.hasLine("certificate refused", `caller="host host-a"`, "node=host-a", "identity=spiffe://cluster.local/ns/shop/sa/pay") {
		t.Errorf("no refusal log line naming caller, node and identity:\n%s", logs.String())
	}
	_, err = client.Issue(ctx, identity.ControlPlane(identity.DefaultTrustDomain), mustCSRDER(t, identity.ControlPlane(identity.DefaultTrustDomain)))
	wantCode(t, "host-a asks for istiod-lite's identity", err, codes.PermissionDenied)
	// A workload that moves to host-a becomes obtainable by host-a.
	snap := store.Load()
	pay := *snap.Workloads["local/host/shop/pay"]
	pay.Node = "host-a"
	store.Apply(&model.Delta{Workloads: []*model.Workload{&pay}})
	if _, err := client.Issue(ctx, pay.Identity(), mustCSRDER(t, pay.Identity())); err != nil {
		t.Fatalf("after the move: %v", err)
	}

	// A waypoint declared in the file obtains its own identity and nothing
	// else, not even a workload of a host.
	wp := &caclient.Client{Addr: addr, Roots: authority.Bundle(), Token: "wwwwwwwwwwwwwwwwwwwwwwww"}
	t.Cleanup(func() { wp.Close() })
	if _, err := wp.Issue(ctx, wid(t, "shop", "wp"), mustCSRDER(t, wid(t, "shop", "wp"))); err != nil {
		t.Fatalf("waypoint asks for its own identity: %v", err)
	}
	_, err = wp.Issue(ctx, cart, mustCSRDER(t, cart))
	wantCode(t, "waypoint asks for cart", err, codes.PermissionDenied)
	if !logs.hasLine("certificate refused", `caller="waypoint shop/wp"`, "callerKind=waypoint", "identity=spiffe://cluster.local/ns/shop/sa/cart") {
		t.Errorf("no refusal log line for the waypoint:\n%s", logs.String())
	}

	bad := &caclient.Client{Addr: addr, Roots: authority.Bundle(), Token: "cccccccccccccccccccccccc"}
	t.Cleanup(func() { bad.Close() })
	_, err = bad.Issue(ctx, cart, mustCSRDER(t, cart))
	wantCode(t, "unknown secret", err, codes.Unauthenticated)
	_, err = rawClient(t, addr, authority, "").GetTrustBundle(ctx, &capb.GetTrustBundleRequest{})
	wantCode(t, "no token", err, codes.Unauthenticated)

	// The client refuses a server that is not istiod-lite.
	wrong := &caclient.Client{Addr: addr, Roots: authority.Bundle(), Token: "aaaaaaaaaaaaaaaaaaaaaaaa", ServerID: spiffeid.RequireFromString("spiffe://cluster.local/ns/x/sa/y")}
	t.Cleanup(func() { wrong.Close() })
	if _, err := wrong.TrustBundle(ctx); err == nil {
		t.Fatal("client accepted a server with another identity")
	}
}

func TestHostCredentialsValidation(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"short secret":  "host-a short\n",
		"shared secret": "host-a aaaaaaaaaaaaaaaaaaaa\nhost-b aaaaaaaaaaaaaaaaaaaa\n",
		"duplicate":     "host-a aaaaaaaaaaaaaaaaaaaa\nhost-a bbbbbbbbbbbbbbbbbbbbbb\n",
		"three fields":  "host-a aaaaaaaaaaaaaaaaaaaa extra\n",
	} {
		if _, err := auth.LoadHostCredentials(writeFile(t, dir, "f", content), spiffeid.TrustDomain{}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func mustCSRDER(t *testing.T, id spiffeid.ID) []byte {
	t.Helper()
	der, err := certs.NewCSR(ecKey(t), id)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// The serving certificate carries istiod-lite's ID and DNS name, and is
// replaced at half of its lifetime.
func TestServingCertRenewsAtHalfLife(t *testing.T) {
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	authority, err := certs.NewSelfSignedCA(identity.DefaultTrustDomain, certs.Options{Now: clock, LeafTTL: 2 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	s := &ca.ServingCert{CA: authority, Now: clock, DNSNames: []string{"istiod-lite.example"}}
	first, err := s.GetCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	leaf := first.Leaf
	if got, err := x509svid.IDFromCert(leaf); err != nil || got != identity.ControlPlane(identity.DefaultTrustDomain) {
		t.Fatalf("serving id %s, %v", got, err)
	}
	if err := leaf.VerifyHostname(ca.DefaultDNSName); err != nil {
		t.Fatal(err)
	}
	if err := leaf.VerifyHostname("istiod-lite.example"); err != nil {
		t.Fatal(err)
	}
	now = now.Add(59 * time.Minute)
	if c, _ := s.GetCertificate(nil); c != first {
		t.Fatal("renewed before half-life")
	}
	now = now.Add(2 * time.Minute)
	c, err := s.GetCertificate(nil)
	if err != nil || c == first || !c.Leaf.NotAfter.After(leaf.NotAfter) {
		t.Fatalf("not renewed after half-life (%v)", err)
	}
}
