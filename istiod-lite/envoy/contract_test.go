package envoy_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/istiod-lite/envoy"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/waypoint"
)

// noCerts satisfies hbone.CertSource for a proxy that only applies config
// (it never handshakes here).
type noCerts struct{}

func (noCerts) GetX509SVID(context.Context, spiffeid.ID) (*x509svid.SVID, error) {
	return nil, errors.New("no certificates in this test")
}

func (noCerts) GetX509BundleForTrustDomain(spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return nil, errors.New("no bundles in this test")
}

// TestWaypointAcceptsEveryGolden is the contract of waypoint/ENVOY.md
// checked end to end: the real waypoint proxy applies what ForWaypoint
// builds for every golden case (it NACKs fields it does not implement).
func TestWaypointAcceptsEveryGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/[^_]*.yaml")
	for _, in := range files {
		t.Run(strings.TrimSuffix(filepath.Base(in), ".yaml"), func(t *testing.T) {
			o := translate.NewObjects()
			for _, p := range []string{"testdata/_base.yaml", in} {
				objs := decodeFile(t, p)
				for _, obj := range objs {
					o.Set(obj)
				}
			}
			snap := translate.Build(o, translate.Options{}).Snapshot
			r, err := envoy.ForWaypoint(snap, envoy.Waypoint{Namespace: "shop", Name: "waypoint"})
			if err != nil {
				t.Fatal(err)
			}
			id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/waypoint")
			p, err := waypoint.New(waypoint.Config{Identity: id, Certs: noCerts{}})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			var rs []waypoint.Resource
			add := func(m proto.Message) { rs = append(rs, waypoint.Resource{Version: "1", Resource: m}) }
			for _, x := range r.Listeners {
				add(x)
			}
			for _, x := range r.Routes {
				add(x)
			}
			for _, x := range r.Clusters {
				add(x)
			}
			for _, x := range r.Endpoints {
				add(x)
			}
			if err := p.Apply(rs); err != nil {
				t.Errorf("the waypoint refuses the resources: %v", err)
			}
		})
	}
}

func decodeFile(t *testing.T, path string) []any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	objs, _, err := translate.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}
