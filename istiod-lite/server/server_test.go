package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
)

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(from, "*.yaml"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, filepath.Base(f)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// Local mode end to end: istiod-lite reads examples/local, serves xDS over
// TLS with the CA's serving certificate, a ztunnel-side client verifies it
// by SPIFFE ID and syncs, and a file edit reaches the client.
func TestLocalModeEndToEnd(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "mesh")
	if err := os.Mkdir(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	copyDir(t, "../../examples/local", conf)
	creds := filepath.Join(dir, "hosts")
	if err := os.WriteFile(creds, []byte("node-1 node-one-secret-0123456789\nwaypoint demo/waypoint waypoint-demo-secret-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	addrs := make(chan [2]string, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Config{
			Listen: "127.0.0.1:0", Admin: "127.0.0.1:0", ConfigDir: conf, CADir: filepath.Join(dir, "ca"), HostCredentials: creds,
			Listening: func(g, a string) { addrs <- [2]string{g, a} },
		})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	var a [2]string
	select {
	case a = <-addrs:
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(20 * time.Second):
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

	// xDS serves only authenticated hosts, each as its own node.
	for _, tc := range []struct {
		what, token, node string
		want              codes.Code
	}{
		{"no token", "", "node-1", codes.Unauthenticated},
		{"wrong token", "not-a-host-secret-0123456789", "node-1", codes.Unauthenticated},
		{"node-1's token claiming node-2", "node-one-secret-0123456789", "node-2", codes.PermissionDenied},
	} {
		if _, err := firstResponse(ctx, a[0], tlsConf, tc.token, tc.node, workload.WorkloadType); status.Code(err) != tc.want {
			t.Fatalf("xds with %s: got %v, want %s", tc.what, err, tc.want)
		}
	}

	c := &xdsclient.Client{Addr: a[0], TLS: tlsConf, Node: "node-1", Token: "node-one-secret-0123456789", Store: &model.Store{}}
	go func() { _ = c.Start(ctx) }()
	select {
	case <-c.SyncedCh():
	case <-time.After(20 * time.Second):
		t.Fatal("xds client did not sync over TLS")
	}
	s := c.Store.Load()
	if len(s.Workloads) < 4 || len(s.Services) < 1 || len(s.Policies) < 1 || len(s.PeerAuthn) < 1 {
		t.Fatalf("client model: %d workloads, %d services, %d policies, %d peer authentications", len(s.Workloads), len(s.Services), len(s.Policies), len(s.PeerAuthn))
	}
	client := s.Workloads[translate.WorkloadUID("", "demo", "client")]
	legacy := s.Workloads[translate.WorkloadUID("", "legacy", "legacy-client")]
	if client == nil || !client.Enrolled || client.Node != "node-1" || legacy == nil || legacy.Enrolled {
		t.Fatalf("enrollment: client %+v legacy %+v", client, legacy)
	}

	// Edit a file: server-1 is no longer ready.
	p := filepath.Join(conf, "pods.yaml")
	b, _ := os.ReadFile(p)
	i := strings.Index(string(b), "name: server-1")
	edited := string(b[:i]) + strings.Replace(string(b[i:]), `status: "True"`, `status: "False"`, 1)
	if err := os.WriteFile(p, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	uid := translate.WorkloadUID("", "demo", "server-1")
	deadline := time.Now().Add(20 * time.Second)
	for c.Store.Load().Workloads[uid].Ready {
		if time.Now().After(deadline) {
			t.Fatal("the edit did not reach the client")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// The certificate service shares the port: node-1 gets demo/client's
	// identity (a workload on node-1), and not one no workload there has.
	cac := &caclient.Client{Addr: a[0], Roots: authority.Bundle(), Token: "node-one-secret-0123456789"}
	defer cac.Close()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr := func(id spiffeid.ID) []byte {
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	clientID := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/client")
	chain, err := cac.Issue(ctx, clientID, csr(clientID))
	if err != nil || len(chain) == 0 || chain[0].URIs[0].String() != clientID.String() {
		t.Fatalf("issue %s on 15012: %v", clientID, err)
	}
	nobody := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/nobody")
	if _, err := cac.Issue(ctx, nobody, csr(nobody)); err == nil {
		t.Fatal("node-1 got an identity no workload on node-1 has")
	}

	// The waypoint declared in the credentials file: its own identity only,
	// Envoy types only.
	wpc := &caclient.Client{Addr: a[0], Roots: authority.Bundle(), Token: "waypoint-demo-secret-0123456789"}
	defer wpc.Close()
	wpID := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/waypoint")
	if _, err := wpc.Issue(ctx, wpID, csr(wpID)); err != nil {
		t.Fatalf("the waypoint asks for its identity: %v", err)
	}
	if _, err := wpc.Issue(ctx, clientID, csr(clientID)); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the waypoint asks for demo/client's identity: %v", err)
	}
	if _, err := firstResponse(ctx, a[0], tlsConf, "waypoint-demo-secret-0123456789", "waypoint-0", workload.WorkloadType); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the waypoint subscribes to workloads: %v", err)
	}
	if _, err := firstResponse(ctx, a[0], tlsConf, "node-one-secret-0123456789", "node-1", resource.ClusterType); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("node-1 subscribes to clusters: %v", err)
	}
	// A waypoint stream is served (what it gets is envoy.ForWaypoint's) and
	// shows in proxy-status with its kind, and its snapshot's state.
	wp, closeWP, err := openADS(ctx, a[0], tlsConf, "waypoint-demo-secret-0123456789")
	if err != nil {
		t.Fatal(err)
	}
	defer closeWP()
	if err := wp.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: "waypoint-0", Cluster: "demo/waypoint"}, TypeUrl: resource.ClusterType, ResourceNamesSubscribe: []string{"*"}}); err != nil {
		t.Fatal(err)
	}
	proxyStatus := func() string {
		resp, err := http.Get("http://" + a[1] + "/debug/proxy-status")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return string(body)
	}
	deadline = time.Now().Add(20 * time.Second)
	for {
		body := proxyStatus()
		if strings.Contains(body, `"node": "node-1"`) && strings.Contains(body, `"caller": "host node-1"`) &&
			strings.Contains(body, `"kind": "waypoint"`) && strings.Contains(body, `"waypoint": "demo/waypoint"`) &&
			strings.Contains(body, `"demo/waypoint": {`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("proxy-status: %s", body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// firstResponse opens a Delta ADS stream to addr with the bearer token (none
// if empty), subscribes to typeURL as node and returns the first response.
func firstResponse(ctx context.Context, addr string, tlsConf *tls.Config, token, node, typeURL string) (*discovery.DeltaDiscoveryResponse, error) {
	st, closeStream, err := openADS(ctx, addr, tlsConf, token)
	if err != nil {
		return nil, err
	}
	defer closeStream()
	// A refused stream may end before the request is out; Recv has the status.
	_ = st.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: node}, TypeUrl: typeURL, ResourceNamesSubscribe: []string{"*"}})
	return st.Recv()
}

// openADS opens a Delta ADS stream to addr with the bearer token (none if
// empty); closeStream ends it.
func openADS(ctx context.Context, addr string, tlsConf *tls.Config, token string) (_ discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient, closeStream func(), _ error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)))
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		cancel()
		conn.Close()
		return nil, nil, err
	}
	return st, func() { cancel(); conn.Close() }, nil
}
