package waypoint

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/ambit-mesh/ambit/hbone"
)

// grpcBackend is a real gRPC server (health service) that names itself in
// a response header and fails every failEvery-th call with UNAVAILABLE.
func grpcBackend(t *testing.T, name string, failEvery int64) (netip.AddrPort, *atomic.Int64) {
	var calls atomic.Int64
	gs := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		n := calls.Add(1)
		if failEvery > 0 && n%failEvery == 0 {
			// Trailers-only: grpc-status in the response headers, where
			// Envoy (and the waypoint) look for retry_on's gRPC codes.
			return nil, status.Error(codes.Unavailable, "flaky")
		}
		grpc.SetHeader(ctx, metadata.Pairs("x-backend", name))
		return h(ctx, req)
	}))
	healthpb.RegisterHealthServer(gs, health.NewServer())
	ln := listen(t)
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	return ln.Addr().(*net.TCPAddr).AddrPort(), &calls
}

// TestGRPC: gRPC through the waypoint (HTTP/2 in, HTTP/2 out): an 80/20
// weighted split, retries on "unavailable" (a replica failing every other
// call: all succeed), grpc_response_status in the metrics.
func TestGRPC(t *testing.T) {
	e := newEnv(t, nil)
	a, aCalls := grpcBackend(t, "a", 2)
	b, _ := grpcBackend(t, "b", 0)
	ca, cb := clusterName("a."+svc), clusterName("b."+svc)
	m := prefixMatch("/")
	m.Grpc = &routev3.RouteMatch_GrpcRouteMatchOptions{}
	rs := []Resource{res(listener(httpFC(testVIP, 80, svc))),
		res(routeConfig(chainName(80, svc), weighted(m, map[string]uint32{ca: 80, cb: 20}, retries("unavailable", 2, 0)))),
		res(edsCluster(ca, protocolOptions(true, 0))), res(cla(ca, ep{addr: a})),
		res(edsCluster(cb, protocolOptions(true, 0))), res(cla(cb, ep{addr: b}))}
	e.apply(rs...)
	d := &hbone.Dialer{Certs: e.certs}
	t.Cleanup(func() { d.Close() })
	conn, err := grpc.NewClient("passthrough:///"+svc,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return d.Dial(ctx, hbone.DialRequest{Source: e.cliID, Peers: []spiffeid.ID{e.wpID}, Addr: e.hbone,
				Target: netip.MustParseAddrPort(target)})
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	counts := map[string]int{}
	const n = 500
	for range n {
		var md metadata.MD
		resp, err := hc.Check(t.Context(), &healthpb.HealthCheckRequest{}, grpc.Header(&md))
		if err != nil {
			t.Fatalf("Check: %v", err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("status %v", resp.GetStatus())
		}
		counts[md.Get("x-backend")[0]]++
	}
	pa := float64(counts["a"]) / n * 100
	t.Logf("gRPC: %v over %d calls (%.1f%% to a), a saw %d calls (half failing UNAVAILABLE, retried)", counts, n, pa, aCalls.Load())
	if pa < 77 || pa > 83 {
		t.Errorf("split %.1f%% to a, want 80±3", pa)
	}
	if aCalls.Load() < int64(counts["a"])*3/2 {
		t.Errorf("a saw %d calls for %d successes: retries not happening", aCalls.Load(), counts["a"])
	}
	if v := scrape(t, e.metric, "istio_requests_total", `request_protocol="grpc"`, `grpc_response_status="0"`); v != n {
		t.Errorf("grpc status 0 counted %v, want %d", v, n)
	}
}
