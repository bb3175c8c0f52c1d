package ambitctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/server"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// TestProxyStatus runs istiod-lite in local mode on testdata/mesh with a
// node proxy (the real xDS client) in sync and a waypoint stream that
// NACKs its listeners, and reads proxy-status with --istiod-address.
func TestProxyStatus(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "mesh")
	if err := os.Mkdir(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("testdata/mesh/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(conf, "mesh.yaml"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	creds := filepath.Join(dir, "hosts")
	if err := os.WriteFile(creds, []byte("node-1 node-one-secret-0123456789\nwaypoint shop/waypoint waypoint-shop-secret-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	addrs := make(chan [2]string, 1)
	done := make(chan error, 1)
	go func() {
		done <- server.Run(ctx, server.Config{
			Listen: "127.0.0.1:0", Admin: "127.0.0.1:0", ConfigDir: conf, CADir: filepath.Join(dir, "ca"), HostCredentials: creds,
			Listening: func(g, a string) { addrs <- [2]string{g, a} },
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("istiod-lite: %v", err)
		}
	})
	var a [2]string
	select {
	case a = <-addrs:
	case err := <-done:
		t.Fatalf("istiod-lite: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("istiod-lite did not start")
	}
	m, err := certs.FileStore{Dir: filepath.Join(dir, "ca")}.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	authority, err := m.CA(identity.DefaultTrustDomain, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := caclient.TLSConfig(authority.Bundle(), identity.DefaultTrustDomain, identity.ControlPlane(identity.DefaultTrustDomain))

	// the node proxy, in sync
	c := &xdsclient.Client{Addr: a[0], TLS: tlsConf, Node: "node-1", Token: "node-one-secret-0123456789", Store: &model.Store{}}
	go func() { _ = c.Start(ctx) }()
	select {
	case <-c.SyncedCh():
	case <-time.After(30 * time.Second):
		t.Fatal("xds client did not sync")
	}

	// the waypoint: takes its listeners and rejects them
	conn, err := grpc.NewClient(a[0], grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer waypoint-shop-secret-0123456789")
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(sctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &core.Node{Id: "waypoint-7d9f-x2", Cluster: "shop/waypoint"}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.ListenerType, ResourceNamesSubscribe: []string{"*"}}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.ListenerType, ResponseNonce: resp.GetNonce(),
		ErrorDetail: &status.Status{Code: 3, Message: "listener main_internal: filter chain 1:\nunsupported field"}}); err != nil {
		t.Fatal(err)
	}
	admin := a[1]
	waitAdmin(t, "http://"+admin+"/debug/proxy-status", func(b []byte) bool {
		return bytes.Contains(b, []byte(`"nackError"`)) && bytes.Count(b, []byte(`"SYNCED"`)) >= 1
	})

	out := mustCLI(t, "proxy-status", "--istiod-address", admin)
	golden(t, "proxy-status", maskVersions(t, mask(out)))
	for _, want := range []string{
		"waypoint shop/waypoint waypoint waypoint-7d9f-x2 Listener NACKED",
		"listener main_internal: filter chain 1: unsupported field",
		"host node-1 node-proxy node-1",
		"SYNCED",
	} {
		if !strings.Contains(mask(out), want) {
			t.Errorf("proxy-status lacks %q:\n%s", want, out)
		}
	}
	var doc struct {
		Streams []map[string]any `json:"streams"`
	}
	if err := json.Unmarshal([]byte(mustCLI(t, "proxy-status", "--istiod-address", admin, "-o", "json")), &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Streams) != 2 {
		t.Errorf("json: %d streams, want 2", len(doc.Streams))
	}
	if _, errs, code := runCLI(t, "proxy-status", "--istiod-address", a[0]); code == 0 || !strings.Contains(errs, "istiod-lite "+a[0]) {
		t.Errorf("the xDS port as admin: exit %d, %q", code, errs)
	}
}

// maskVersions masks the versions (model revisions, which depend on how
// many times the directory was read) of a masked proxy-status table, after
// checking that a SYNCED row ACKed what was sent.
func maskVersions(t *testing.T, s string) string {
	t.Helper()
	row := regexp.MustCompile(`(?m) (SYNCED|NACKED|STALE) (\S+) \((\d+)\) (\S+) `)
	for _, m := range row.FindAllStringSubmatch(s, -1) {
		if m[1] == "SYNCED" && m[2] != m[4] {
			t.Errorf("SYNCED row sent %s, ACKed %s", m[2], m[4])
		}
	}
	s = row.ReplaceAllString(s, " $1 <v> ($3) <v> ")
	return regexp.MustCompile(`(?m)^(\S+/\S+) \S+ `).ReplaceAllString(s, "$1 <v> ")
}
