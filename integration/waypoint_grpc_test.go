//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/mesh"
)

// TestWaypointGRPC: gRPC end to end through a waypoint, with real gRPC
// servers in the pods (integration/app) and a real gRPC client in an
// enrolled pod: a GRPCRoute splitting 80/20 between two versions, the
// second failing every other call UNAVAILABLE; the route sets no retry, so
// Istio's default applies (2 retries on connect-failure, refused-stream,
// unavailable, cancelled): every call succeeds, the split holds, the
// failures were retried and the waypoint counts grpc_response_status.
func TestWaypointGRPC(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and eBPF")
	}
	e := setup(t)
	ctx := context.Background()
	if _, err := e.cs.CoreV1().ServiceAccounts(shop).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "greeter"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.pod(ctx, shop, "client-1", "node-1", "client", nil, 0)
	e.httpPod(ctx, "greeter-v1", "node-1", "greeter", map[string]string{"app": "greeter", "version": "v1"},
		map[string]string{app.AnnotationProtocol: "http"})
	e.httpPod(ctx, "greeter-v2", "node-2", "greeter", map[string]string{"app": "greeter", "version": "v2"},
		map[string]string{app.AnnotationProtocol: "http", app.AnnotationFailRatio: "0.5"})
	vip := e.grpcService(ctx, "greeter", map[string]string{"app": "greeter"}, map[string]string{"istio.io/use-waypoint": "waypoint"})
	e.grpcService(ctx, "greeter-v1", map[string]string{"app": "greeter", "version": "v1"}, nil)
	e.grpcService(ctx, "greeter-v2", map[string]string{"app": "greeter", "version": "v2"}, nil)
	e.kubectlApply(t, fmt.Sprintf(`apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: %[1]s, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: %[1]s}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter, port: 80}]
  rules:
  - matches: [{method: {service: grpc.health.v1.Health}}]
    backendRefs: [{name: greeter-v1, port: 80, weight: 80}, {name: greeter-v2, port: 80, weight: 20}]
`, shop))
	e.runWaypoint(t, "waypoint", "node-2")
	for _, p := range []string{"shop/client-1", "shop/greeter-v1", "shop/greeter-v2"} {
		e.waitReady(ctx, p)
	}
	if !eventually(30*time.Second, func() bool {
		return e.waypointConfigLacks("outbound|80||greeter-v1.shop.svc.cluster.local", "outbound|80||greeter-v2.shop.svc.cluster.local") == ""
	}) {
		t.Fatalf("the waypoint never got the GRPCRoute's clusters\n%s", e.waypointTail())
	}

	// A real gRPC client in the enrolled pod, dialling the Service VIP (the
	// pod's connection is captured like any other).
	client := e.netns("shop/client-1")
	conn, err := grpc.NewClient("passthrough:///"+netip.AddrPortFrom(vip, 80).String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return client.NS.Dial(ctx, nil, "tcp", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	check := func() (string, error) {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		var md metadata.MD
		resp, err := hc.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.Header(&md))
		if err != nil {
			return "", err
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return "", fmt.Errorf("status %v", resp.GetStatus())
		}
		if v := md.Get(app.HeaderGRPCApp); len(v) == 1 {
			return v[0], nil
		}
		return "", fmt.Errorf("no %s header: %v", app.HeaderGRPCApp, md)
	}
	var last error
	if !eventually(30*time.Second, func() bool { _, last = check(); return last == nil }) {
		t.Fatalf("no gRPC answer through the waypoint after 30s: %v\n%s", last, e.waypointTail())
	}

	before := e.requestLogs(t)
	_, v2FailedBefore := e.appCounts(t, "shop/greeter-v2")
	const n = 1000
	by := map[string]int{}
	failed := map[codes.Code]int{}
	var firstErr error
	start := time.Now()
	for range n {
		from, err := check()
		if err != nil {
			failed[status.Code(err)]++
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		by[from]++
	}
	took := time.Since(start)
	ok := by["greeter-v1"] + by["greeter-v2"]
	v2 := 100 * float64(by["greeter-v2"]) / float64(max(ok, 1))
	v2Served, v2Failed := e.appCounts(t, "shop/greeter-v2")
	v2Failed -= v2FailedBefore
	logs := e.settledRequestLogs(t, before, n)
	retried := 0
	for _, l := range logs {
		if l.Attempts > 1 {
			retried++
		}
	}
	grpcOK, err := mesh.MetricsIn(ctx, e.netns(waypointPod).NS, "istio_requests_total",
		map[string]string{"reporter": "waypoint", "request_protocol": "grpc", "grpc_response_status": "0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("gRPC through the waypoint: %d calls in %s, %d OK (%.2f%%), failed %v; split %v (v2 %.1f%%); greeter-v2 served %d calls and failed %d UNAVAILABLE on purpose; %d requests retried in the access log; istio_requests_total{grpc_response_status=\"0\"} %v",
		n, took.Round(time.Millisecond), ok, 100*float64(ok)/n, failed, by, v2, v2Served, v2Failed, retried, grpcOK)
	if ok < n*99/100 {
		t.Errorf("%d of %d calls succeeded, want at least 99%% (first error: %v)", ok, n, firstErr)
	}
	if v2 < 17 || v2 > 23 {
		t.Errorf("greeter-v2 answered %.1f%% of the calls, want 20 ± 3", v2)
	}
	if v2Failed == 0 || retried == 0 {
		t.Errorf("no UNAVAILABLE retried: greeter-v2 failed %d calls, %d requests retried", v2Failed, retried)
	}
	if grpcOK < float64(ok) {
		t.Errorf("the waypoint counted %v calls with grpc_response_status 0, the client had %d", grpcOK, ok)
	}
}

// grpcService creates a Service in shop, port 80 (appProtocol grpc) ->
// 8080.
func (e *env) grpcService(ctx context.Context, name string, selector, labels map[string]string) netip.Addr {
	e.t.Helper()
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: shop, Labels: labels},
		Spec: corev1.ServiceSpec{Selector: selector, Ports: []corev1.ServicePort{{
			Name: "grpc", Port: 80, TargetPort: intstr.FromInt32(8080), AppProtocol: ptr("grpc"),
		}}},
	}
	s, err := e.cs.CoreV1().Services(shop).Create(ctx, s, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return netip.MustParseAddr(s.Spec.ClusterIP)
}

// appCounts reads the HTTP app's counts in pod key (from inside the pod).
func (e *env) appCounts(t *testing.T, key string) (served, failed int) {
	t.Helper()
	c := e.httpClient(key, false)
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:8080%s", app.CountsPath))
	if err != nil {
		t.Fatalf("counts of %s: %v", key, err)
	}
	defer resp.Body.Close()
	var n struct{ Served, Failed int }
	if err := json.NewDecoder(resp.Body).Decode(&n); err != nil {
		t.Fatalf("counts of %s: %v", key, err)
	}
	return n.Served, n.Failed
}
