package certs

import (
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func TestIssuedSVIDVerifiesAgainstBundle(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	ca, err := NewSelfSignedCA(DefaultTrustDomain, Options{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	id, err := WorkloadID(DefaultTrustDomain, "shop", "cart")
	if err != nil {
		t.Fatal(err)
	}
	svid, err := ca.IssueSVID(id, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := x509svid.Verify(svid.Certificates, ca.Bundle(), x509svid.WithTime(now))
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if got != id {
		t.Fatalf("verified id %s, want %s", got, id)
	}
	if ttl := svid.Certificates[0].NotAfter.Sub(now); ttl != DefaultLeafTTL {
		t.Fatalf("leaf ttl %s, want %s", ttl, DefaultLeafTTL)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, ca.Bundle(), x509svid.WithTime(now.Add(DefaultLeafTTL+time.Second))); err == nil {
		t.Fatal("expired svid verified")
	}
	ns, sa, err := ParseWorkloadID(id)
	if err != nil || ns != "shop" || sa != "cart" {
		t.Fatalf("ParseWorkloadID = %q, %q, %v", ns, sa, err)
	}
}
