package auth_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
)

func incoming(vals ...string) context.Context {
	md := metadata.MD{}
	for _, v := range vals {
		md.Append("authorization", v)
	}
	return metadata.NewIncomingContext(context.Background(), md)
}

func TestBearerToken(t *testing.T) {
	if tok, err := auth.BearerToken(incoming("bearer  abc ")); err != nil || tok != "abc" {
		t.Fatalf("got %q, %v", tok, err)
	}
	for name, ctx := range map[string]context.Context{
		"none":      context.Background(),
		"two":       incoming("Bearer a", "Bearer b"),
		"basic":     incoming("Basic abc"),
		"no scheme": incoming("abc"),
		"empty":     incoming("Bearer   "),
	} {
		if _, err := auth.BearerToken(ctx); !errors.Is(err, auth.ErrUnauthenticated) {
			t.Errorf("%s: %v, want ErrUnauthenticated", name, err)
		}
	}
}

func writeFile(t *testing.T, data string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// A file of hosts only (the format before waypoints) still loads; waypoint
// lines give Waypoint callers with their identity in the trust domain.
func TestHostCredentials(t *testing.T) {
	ctx := t.Context()
	old, err := auth.LoadHostCredentials(writeFile(t, "# hosts\nhost-a aaaaaaaaaaaaaaaa\n\n waypoint bbbbbbbbbbbbbbbb\n"), spiffeid.TrustDomain{})
	if err != nil {
		t.Fatal(err)
	}
	for tok, want := range map[string]string{"aaaaaaaaaaaaaaaa": "host-a", "bbbbbbbbbbbbbbbb": "waypoint"} {
		c, err := old.Authenticate(ctx, tok)
		if err != nil || c.Kind != auth.NodeProxy || c.Node != want || c.Name != "host "+want {
			t.Fatalf("%s: %+v, %v", want, c, err)
		}
	}

	td := spiffeid.RequireTrustDomainFromString("example.org")
	a, err := auth.LoadHostCredentials(writeFile(t, "host-a aaaaaaaaaaaaaaaa\nwaypoint shop/wp wwwwwwwwwwwwwwww\n"), td)
	if err != nil {
		t.Fatal(err)
	}
	c, err := a.Authenticate(ctx, "wwwwwwwwwwwwwwww")
	if err != nil {
		t.Fatal(err)
	}
	if c.Kind != auth.Waypoint || c.Waypoint != (auth.WaypointRef{Namespace: "shop", Name: "wp"}) ||
		c.Identity.String() != "spiffe://example.org/ns/shop/sa/wp" || c.Name != "waypoint shop/wp" || c.Node != "" {
		t.Fatalf("waypoint caller: %+v", c)
	}
	c.Kind = auth.NodeProxy // a caller's copy: the next one is unchanged
	if c, _ := a.Authenticate(ctx, "wwwwwwwwwwwwwwww"); c.Kind != auth.Waypoint {
		t.Fatal("a caller's change leaked into the authenticator")
	}
	for _, tok := range []string{"", "wwwwwwwwwwwwwww", "wwwwwwwwwwwwwwwww", "aaaaaaaaaaaaaaaa "} {
		if _, err := a.Authenticate(ctx, tok); !errors.Is(err, auth.ErrUnauthenticated) {
			t.Errorf("token %q: %v", tok, err)
		}
	}

	for name, content := range map[string]string{
		"short secret":             "host-a short\n",
		"shared secret":            "host-a aaaaaaaaaaaaaaaaaaaa\nhost-b aaaaaaaaaaaaaaaaaaaa\n",
		"host and waypoint share":  "host-a aaaaaaaaaaaaaaaaaaaa\nwaypoint shop/wp aaaaaaaaaaaaaaaaaaaa\n",
		"duplicate":                "host-a aaaaaaaaaaaaaaaaaaaa\nhost-a bbbbbbbbbbbbbbbbbbbbbb\n",
		"duplicate waypoint":       "waypoint shop/wp aaaaaaaaaaaaaaaaaaaa\nwaypoint shop/wp bbbbbbbbbbbbbbbbbbbbbb\n",
		"three fields":             "host-a aaaaaaaaaaaaaaaaaaaa extra\n",
		"waypoint without name":    "waypoint shop aaaaaaaaaaaaaaaaaaaa\n",
		"waypoint empty namespace": "waypoint /wp aaaaaaaaaaaaaaaaaaaa\n",
		"waypoint two slashes":     "waypoint shop/wp/x aaaaaaaaaaaaaaaaaaaa\n",
		"waypoint short secret":    "waypoint shop/wp short\n",
		"waypoint invalid name":    "waypoint shop/WP! aaaaaaaaaaaaaaaaaaaa\n",
		"four fields":              "waypoint shop/wp aaaaaaaaaaaaaaaaaaaa extra\n",
		"waypoint missing secret":  "waypoint istio-system/my-waypoint-long-name\n",
		"host name with a slash":   "shop/host aaaaaaaaaaaaaaaaaaaa\n",
	} {
		if _, err := auth.LoadHostCredentials(writeFile(t, content), spiffeid.TrustDomain{}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := auth.LoadHostCredentials(filepath.Join(t.TempDir(), "missing"), spiffeid.TrustDomain{}); err == nil {
		t.Error("a missing file was accepted")
	}
}

func TestCallerKindString(t *testing.T) {
	for k, want := range map[auth.CallerKind]string{auth.NodeProxy: "node-proxy", auth.Workload: "workload", auth.Waypoint: "waypoint", auth.Operator: "operator", 0: "CallerKind(0)"} {
		if k.String() != want {
			t.Errorf("%d: %s", int(k), k)
		}
	}
}
