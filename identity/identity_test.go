package identity

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestWorkloadRoundTrip(t *testing.T) {
	id, err := Workload(DefaultTrustDomain, "shop", "reviews")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := id.String(), "spiffe://cluster.local/ns/shop/sa/reviews"; got != want {
		t.Fatalf("Workload = %s, want %s", got, want)
	}
	ns, sa, err := ParseWorkload(id)
	if err != nil || ns != "shop" || sa != "reviews" {
		t.Fatalf("ParseWorkload = %q %q %v", ns, sa, err)
	}
}

func TestWorkloadRejects(t *testing.T) {
	for _, c := range [][2]string{{"", "sa"}, {"ns", ""}, {"a/b", "sa"}, {"ns", "s a"}} {
		if id, err := Workload(DefaultTrustDomain, c[0], c[1]); err == nil {
			t.Errorf("Workload(%q, %q) = %s, want an error", c[0], c[1], id)
		}
	}
	for _, s := range []string{"spiffe://cluster.local/ns/x", "spiffe://cluster.local/ns/x/sa/y/z", "spiffe://cluster.local/foo/x/sa/y"} {
		id := spiffeid.RequireFromString(s)
		if _, _, err := ParseWorkload(id); err == nil {
			t.Errorf("ParseWorkload(%s) succeeded, want an error", s)
		}
	}
}

func TestControlPlane(t *testing.T) {
	if got, want := ControlPlane(DefaultTrustDomain).String(), "spiffe://cluster.local/ns/ambit-system/sa/istiod-lite"; got != want {
		t.Fatalf("ControlPlane = %s, want %s", got, want)
	}
}
