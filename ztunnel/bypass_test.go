package ztunnel

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/model"
)

// bypassMesh is the test mesh plus a direct HBONE client that can present
// any identity (the CA issues whatever it is asked), to play the client, an
// intruder or the waypoint itself.
type bypassMesh struct {
	*testMesh
	d    *hbone.Dialer
	wpID spiffeid.ID // the identity of waypoint shop/wp
}

func newBypassMesh(t *testing.T) *bypassMesh {
	m := newTestMesh(t, nil)
	d := &hbone.Dialer{Certs: m.certs, HandshakeTimeout: 5 * time.Second}
	t.Cleanup(func() { d.Close() })
	return &bypassMesh{testMesh: m, d: d, wpID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/wp")}
}

// tunnel opens an HBONE tunnel as src straight to dst's ztunnel (node2) for
// <dst>:port and runs one exchange over it.
func (m *bypassMesh) tunnel(t *testing.T, src spiffeid.ID, dst *model.Workload, port uint16) error {
	t.Helper()
	st, err := m.d.Dial(t.Context(), hbone.DialRequest{Source: src, Peers: []spiffeid.ID{dst.Identity()},
		Addr:   netip.AddrPortFrom(dst.Addresses[0], m.n2.port(ListenerHBONE)),
		Target: netip.AddrPortFrom(dst.Addresses[0], port)})
	if err != nil {
		return err
	}
	_, err = exchange(st, 1000, 1000, 5)
	return err
}

// set replaces the model with the mesh's workloads (a and b for server-a
// and server-b), svc and pols.
func (m *bypassMesh) set(a, b *model.Workload, svc *model.Service, pols ...*model.Policy) {
	m.store.Replace(model.NewSnapshot([]*model.Workload{m.client, m.intruder, a, b, m.legacy},
		[]*model.Service{svc}, pols, nil))
}

func (m *bypassMesh) wp(name string, resolved bool) *model.WaypointRef {
	ref := &model.WaypointRef{Name: name, Namespace: "shop"}
	if resolved {
		ref.Address = netip.AddrPortFrom(m.net.ip(40), model.PortHBONE)
	}
	return ref
}

func is401(err error) bool {
	var se *hbone.StatusError
	return errors.As(err, &se) && se.Code == http.StatusUnauthorized
}

// TestWorkloadBoundRefusesBypass: a pod with a waypoint (waypoint-for
// workload/all) accepts a tunnel only from its waypoint's identity; the
// refusal is a policy denial (401), counted and logged with its reason; the
// waypoint's tunnel still passes L4 policy as the source principal; an
// unbound pod is unchanged.
func TestWorkloadBoundRefusesBypass(t *testing.T) {
	m := newBypassMesh(t)
	client, intruder := m.client.Identity(), m.intruder.Identity()

	// Unbound: the client's direct tunnel works.
	if err := m.tunnel(t, client, m.serverA, 8080); err != nil {
		t.Fatalf("unbound pod: %v", err)
	}

	a := *m.serverA
	a.Waypoint = m.wp("wp", true)
	m.set(&a, m.serverB, m.svc)
	for _, src := range []spiffeid.ID{client, intruder} {
		if err := m.tunnel(t, src, &a, 8080); !is401(err) {
			t.Fatalf("%s straight to a bound pod: %v, want 401", src, err)
		}
	}
	// Any port of a workload-bound pod.
	if err := m.tunnel(t, client, &a, 9999); !is401(err) {
		t.Fatalf("another port of a workload-bound pod: %v, want 401", err)
	}
	reason := fmt.Sprintf("waypoint bypass: %s is bound to waypoint shop/wp; only its identity may connect directly",
		netip.AddrPortFrom(a.Addresses[0], 8080))
	waitFor(t, "bypass refusals counted and logged", func() bool {
		return metricSum(t, m.n2.p, "ambit_ztunnel_waypoint_bypass_refused_total", map[string]string{"listener": "hbone"}) == 3 &&
			metricSum(t, m.n2.p, "ambit_ztunnel_connections_refused_total", map[string]string{"direction": "inbound", "response_flags": "DENY"}) == 3 &&
			metricSum(t, m.n2.p, "istio_tcp_connections_closed_total", map[string]string{"reporter": "destination",
				"response_flags": "DENY", "source_principal": client.String(), "destination_workload": "server-a"}) == 2 &&
			strings.Contains(m.n2.logs.String(), reason)
	})
	if logs := m.n2.logs.String(); !strings.Contains(logs, `"outcome":"denied"`) {
		t.Errorf("the refusal is not logged as a denial:\n%s", logs)
	}

	// The waypoint's own identity gets through, to the pod's real server.
	before := len(m.srvA.all())
	if err := m.tunnel(t, m.wpID, &a, 8080); err != nil {
		t.Fatalf("the waypoint's tunnel: %v", err)
	}
	waitFor(t, "delivered", func() bool { return len(m.srvA.all()) == before+1 })
	// A waypoint of the same name elsewhere is another identity.
	if err := m.tunnel(t, spiffeid.RequireFromString("spiffe://cluster.local/ns/other/sa/wp"), &a, 8080); !is401(err) {
		t.Fatalf("a namesake waypoint in another namespace: %v, want 401", err)
	}

	// An unbound pod is unchanged.
	if err := m.tunnel(t, client, m.serverB, 8080); err != nil {
		t.Fatalf("unbound pod next to a bound one: %v", err)
	}

	// The waypoint is then the source principal of the normal L4 policy.
	onlyClient := &model.Policy{Name: "only-client", Namespace: "shop", Action: model.ActionAllow,
		Selector: map[string]string{"app": "server"},
		Rules:    []model.Rule{{From: []model.Source{{Principals: []string{"cluster.local/ns/shop/sa/client"}}}}}}
	m.set(&a, m.serverB, m.svc, onlyClient)
	if err := m.tunnel(t, m.wpID, &a, 8080); !is401(err) {
		t.Fatalf("waypoint not allowed by policy: %v, want 401", err)
	}
	waitFor(t, "policy denial of the waypoint", func() bool {
		for _, l := range strings.Split(m.n2.logs.String(), "\n") {
			if strings.Contains(l, "ns/shop/sa/wp") && strings.Contains(l, "no allow policy matched") {
				return true
			}
		}
		return false
	})
	onlyWaypoint := *onlyClient
	onlyWaypoint.Rules = []model.Rule{{From: []model.Source{{Principals: []string{"cluster.local/ns/shop/sa/wp"}}}}}
	m.set(&a, m.serverB, m.svc, &onlyWaypoint)
	if err := m.tunnel(t, m.wpID, &a, 8080); err != nil {
		t.Fatalf("waypoint allowed by policy: %v", err)
	}
}

// TestServiceBoundRefusesBypass: an endpoint of a service with a waypoint
// is bound on the ports that service targets on it (per endpoint), not on
// its other ports.
func TestServiceBoundRefusesBypass(t *testing.T) {
	m := newBypassMesh(t)
	ip := m.net.ip
	startServer(t, netip.AddrPortFrom(ip(21), 9090)) // another port of server-a
	client := m.client.Identity()

	svc := *m.svc // 80 -> 8080
	svc.Waypoint = m.wp("wp", true)
	svc.Endpoints = []model.Endpoint{{WorkloadUID: m.serverA.UID}, {WorkloadUID: m.serverB.UID, Ports: map[uint16]uint16{80: 8081}}}
	m.set(m.serverA, m.serverB, &svc)

	if err := m.tunnel(t, client, m.serverA, 8080); !is401(err) {
		t.Fatalf("service target port: %v, want 401", err)
	}
	if err := m.tunnel(t, client, m.serverB, 8081); !is401(err) {
		t.Fatalf("the endpoint's own target port: %v, want 401", err)
	}
	if err := m.tunnel(t, client, m.serverA, 9090); err != nil {
		t.Fatalf("a port the service does not target: %v", err)
	}
	if err := m.tunnel(t, client, m.serverB, 8080); err != nil {
		t.Fatalf("server-b's 8080 (the service targets 8081 there): %v", err)
	}
	if err := m.tunnel(t, m.wpID, m.serverA, 8080); err != nil {
		t.Fatalf("the waypoint's tunnel: %v", err)
	}
	waitFor(t, "bypass refusals logged", func() bool {
		logs := m.n2.logs.String()
		return metricSum(t, m.n2.p, "ambit_ztunnel_waypoint_bypass_refused_total", nil) == 2 &&
			strings.Contains(logs, fmt.Sprintf("waypoint bypass: %s is bound to waypoint shop/wp", netip.AddrPortFrom(ip(21), 8080))) &&
			strings.Contains(logs, fmt.Sprintf("waypoint bypass: %s is bound to waypoint shop/wp", netip.AddrPortFrom(ip(22), 8081)))
	})

	// Two waypoints bind server-a:8080 (its own and the service's): either
	// is accepted, nobody else.
	a := *m.serverA
	a.Waypoint = m.wp("wp-pod", true)
	m.set(&a, m.serverB, &svc)
	for _, id := range []spiffeid.ID{m.wpID, spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/wp-pod")} {
		if err := m.tunnel(t, id, &a, 8080); err != nil {
			t.Fatalf("binding waypoint %s: %v", id, err)
		}
	}
	if err := m.tunnel(t, client, &a, 8080); !is401(err) {
		t.Fatalf("client to a doubly bound target: %v, want 401", err)
	}
	waitFor(t, "both waypoints named", func() bool {
		return strings.Contains(m.n2.logs.String(), "is bound to waypoints shop/wp-pod, shop/wp; only their identities may connect directly")
	})
}

// TestWaypointBypassOptOut: a pod labelled ambit.dev/waypoint-bypass=allow
// (Workload.WaypointBypass) accepts a direct tunnel to a port its Service's
// waypoint binds, as Istio does; without the label the same tunnel is
// refused; L4 policy still applies to the direct tunnel; the pod's own
// waypoint (waypoint-for workload/all) is still enforced.
func TestWaypointBypassOptOut(t *testing.T) {
	m := newBypassMesh(t)
	client, intruder := m.client.Identity(), m.intruder.Identity()
	svc := *m.svc // 80 -> 8080
	svc.Waypoint = m.wp("wp", true)

	// The default: refused.
	m.set(m.serverA, m.serverB, &svc)
	if err := m.tunnel(t, client, m.serverA, 8080); !is401(err) {
		t.Fatalf("default, straight to a service-bound pod: %v, want 401", err)
	}

	// Opted out: the client's direct tunnel reaches the pod's server.
	a := *m.serverA
	a.WaypointBypass = true
	m.set(&a, m.serverB, &svc)
	before := len(m.srvA.all())
	if err := m.tunnel(t, client, &a, 8080); err != nil {
		t.Fatalf("opted out, straight to the pod: %v", err)
	}
	waitFor(t, "delivered", func() bool { return len(m.srvA.all()) == before+1 })
	// Only that pod: server-b, an endpoint of the same service, still refuses.
	if err := m.tunnel(t, client, m.serverB, 8080); !is401(err) {
		t.Fatalf("server-b without the label: %v, want 401", err)
	}
	// The waypoint still gets through.
	if err := m.tunnel(t, m.wpID, &a, 8080); err != nil {
		t.Fatalf("the waypoint's tunnel: %v", err)
	}

	// L4 policy still applies to a direct tunnel.
	onlyClient := &model.Policy{Name: "only-client", Namespace: "shop", Action: model.ActionAllow,
		Selector: map[string]string{"app": "server"},
		Rules:    []model.Rule{{From: []model.Source{{Principals: []string{"cluster.local/ns/shop/sa/client"}}}}}}
	m.set(&a, m.serverB, &svc, onlyClient)
	if err := m.tunnel(t, intruder, &a, 8080); !is401(err) {
		t.Fatalf("opted out, a peer the policy refuses: %v, want 401", err)
	}
	if err := m.tunnel(t, client, &a, 8080); err != nil {
		t.Fatalf("opted out, a peer the policy allows: %v", err)
	}
	waitFor(t, "the policy's refusal logged", func() bool {
		for _, l := range strings.Split(m.n2.logs.String(), "\n") {
			if strings.Contains(l, "ns/other/sa/intruder") && strings.Contains(l, "no allow policy matched") {
				return true
			}
		}
		return false
	})

	// The pod's own waypoint is still enforced.
	own := a
	own.Waypoint = m.wp("wp-pod", true)
	m.set(&own, m.serverB, &svc)
	if err := m.tunnel(t, client, &own, 8080); !is401(err) {
		t.Fatalf("opted out but workload-bound: %v, want 401", err)
	}
	if err := m.tunnel(t, spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/wp-pod"), &own, 8080); err != nil {
		t.Fatalf("the pod's own waypoint: %v", err)
	}
	waitFor(t, "refusals counted", func() bool {
		return metricSum(t, m.n2.p, "ambit_ztunnel_waypoint_bypass_refused_total", map[string]string{"listener": "hbone"}) == 3 &&
			strings.Contains(m.n2.logs.String(), fmt.Sprintf("waypoint bypass: %s is bound to waypoint shop/wp-pod;", netip.AddrPortFrom(a.Addresses[0], 8080)))
	})
}

// TestUnresolvedWaypointFailsClosed: a target bound to a waypoint that has
// no address (missing or not ready) refuses every tunnel but the waypoint's
// own, and says why.
func TestUnresolvedWaypointFailsClosed(t *testing.T) {
	m := newBypassMesh(t)
	svc := *m.svc
	svc.Waypoint = m.wp("gone", false)
	m.set(m.serverA, m.serverB, &svc)
	for _, src := range []*model.Workload{m.client, m.intruder} {
		if err := m.tunnel(t, src.Identity(), m.serverA, 8080); !is401(err) {
			t.Fatalf("%s to a target whose waypoint is missing: %v, want 401", src.Name, err)
		}
	}
	waitFor(t, "fail-closed reason", func() bool {
		return strings.Contains(m.n2.logs.String(), "is bound to waypoint shop/gone; only its identity may connect directly (waypoint shop/gone has no address: failing closed)")
	})
	// Other ports of the pod are not bound.
	startServer(t, netip.AddrPortFrom(m.net.ip(21), 9090))
	if err := m.tunnel(t, m.client.Identity(), m.serverA, 9090); err != nil {
		t.Fatalf("unbound port: %v", err)
	}
}

// TestPlaintextToBoundPodRefused: plaintext captured on 15006 has no
// identity, so it is never the waypoint: a waypoint-bound pod resets it,
// even under PERMISSIVE (the default).
func TestPlaintextToBoundPodRefused(t *testing.T) {
	m := newBypassMesh(t)
	ip := m.net.ip
	a := *m.serverA
	a.Waypoint = m.wp("wp", true)
	m.set(&a, m.serverB, m.svc)

	dst := netip.AddrPortFrom(ip(21), m.n2.port(ListenerInbound))
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip(31), 0)), Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", dst.String())
	if err == nil {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Write(make([]byte, 8))
		if err == nil {
			_, err = c.Read(make([]byte, 1))
		}
		c.Close()
	}
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("plaintext to a bound pod: %v, want a reset", err)
	}
	waitFor(t, "plaintext bypass counted and logged", func() bool {
		return metricSum(t, m.n2.p, "ambit_ztunnel_waypoint_bypass_refused_total", map[string]string{"listener": "inbound"}) == 1 &&
			metricSum(t, m.n2.p, "istio_tcp_connections_closed_total", map[string]string{"reporter": "destination",
				"response_flags": "DENY", "connection_security_policy": "none", "source_workload": "legacy"}) == 1 &&
			strings.Contains(m.n2.logs.String(), fmt.Sprintf("waypoint bypass: %s is bound to waypoint shop/wp", dst))
	})
}

// TestBindingsIndex covers the index's rules without sockets: per-endpoint
// target ports, a target port defaulting to the port, one entry per
// waypoint, workloads not kept (other nodes) left out, and the workload's
// own waypoint added to its services'.
func TestBindingsIndex(t *testing.T) {
	addr := netip.MustParseAddr
	a := &model.Workload{UID: "a", Name: "a", Namespace: "ns", Node: "n1", Addresses: []netip.Addr{addr("10.0.0.1"), addr("fd00::1")}}
	b := &model.Workload{UID: "b", Name: "b", Namespace: "ns", Node: "n2", Addresses: []netip.Addr{addr("10.0.0.2")}}
	wp1 := &model.WaypointRef{Name: "wp1", Namespace: "ns"}
	wp2 := &model.WaypointRef{Name: "wp2", Namespace: "ns"}
	svcs := []*model.Service{
		{Name: "s1", Namespace: "ns", Hostname: "s1", Waypoint: wp1,
			Ports:     []model.ServicePort{{Port: 80, TargetPort: 8080}, {Port: 90}},
			Endpoints: []model.Endpoint{{WorkloadUID: "a", Ports: map[uint16]uint16{90: 9191}}, {WorkloadUID: "b"}, {WorkloadUID: "gone"}}},
		{Name: "s2", Namespace: "ns", Hostname: "s2", Waypoint: wp1, // same waypoint again
			Ports: []model.ServicePort{{Port: 8080}}, Endpoints: []model.Endpoint{{WorkloadUID: "a"}}},
		{Name: "s3", Namespace: "ns", Hostname: "s3", Waypoint: wp2,
			Ports: []model.ServicePort{{Port: 80, TargetPort: 8080}}, Endpoints: []model.Endpoint{{WorkloadUID: "a"}}},
		{Name: "plain", Namespace: "ns", Hostname: "plain",
			Ports: []model.ServicePort{{Port: 7070}}, Endpoints: []model.Endpoint{{WorkloadUID: "a"}}},
	}
	snap := model.NewSnapshot([]*model.Workload{a, b}, svcs, nil, nil)
	bi := buildBindings(snap, func(w *model.Workload) bool { return w.Node == "n1" })
	names := func(wps []*model.WaypointRef) []string {
		var out []string
		for _, wp := range wps {
			out = append(out, wp.Name)
		}
		slices.Sort(out)
		return out
	}
	ap := func(ip string, port uint16) netip.AddrPort { return netip.AddrPortFrom(addr(ip), port) }
	for _, tc := range []struct {
		w      *model.Workload
		target netip.AddrPort
		want   []string
	}{
		{a, ap("10.0.0.1", 8080), []string{"wp1", "wp2"}},
		{a, ap("fd00::1", 8080), []string{"wp1", "wp2"}},
		{a, ap("10.0.0.1", 9191), []string{"wp1"}},
		{a, ap("10.0.0.1", 90), nil}, // the endpoint maps 90 to 9191
		{a, ap("10.0.0.1", 7070), nil},
		{b, ap("10.0.0.2", 8080), nil}, // not on this node
	} {
		if got := names(bi.waypointsFor(tc.w, tc.target)); !slices.Equal(got, tc.want) {
			t.Errorf("waypointsFor(%s) = %v, want %v", tc.target, got, tc.want)
		}
	}
	if bi.byHost["s3"] != svcs[2] {
		t.Error("services are not indexed by hostname")
	}

	own := *a
	own.Waypoint = &model.WaypointRef{Name: "wp1", Namespace: "ns"}
	if got := names(bi.waypointsFor(&own, ap("10.0.0.1", 8080))); !slices.Equal(got, []string{"wp1", "wp2"}) {
		t.Errorf("own waypoint plus services': %v", got)
	}
	if got := names(bi.waypointsFor(&own, ap("10.0.0.1", 1))); !slices.Equal(got, []string{"wp1"}) {
		t.Errorf("workload-bound on any port: %v", got)
	}
	// Opted out of the services' waypoints (ambit.dev/waypoint-bypass=allow):
	// only its own waypoint binds it.
	optOut := *a
	optOut.WaypointBypass = true
	if got := names(bi.waypointsFor(&optOut, ap("10.0.0.1", 8080))); got != nil {
		t.Errorf("opted out: %v, want none", got)
	}
	optOut.Waypoint = &model.WaypointRef{Name: "wp3", Namespace: "ns"}
	if got := names(bi.waypointsFor(&optOut, ap("10.0.0.1", 8080))); !slices.Equal(got, []string{"wp3"}) {
		t.Errorf("opted out with its own waypoint: %v, want [wp3]", got)
	}

	// Identities: the waypoint's name and namespace in the pod's trust domain.
	own.TrustDomain = "example.org"
	if why := bi.checkBypass(&own, ap("10.0.0.1", 1), spiffeid.RequireFromString("spiffe://example.org/ns/ns/sa/wp1")); why != "" {
		t.Errorf("waypoint in the pod's trust domain refused: %s", why)
	}
	if why := bi.checkBypass(&own, ap("10.0.0.1", 1), spiffeid.RequireFromString("spiffe://cluster.local/ns/ns/sa/wp1")); why == "" {
		t.Error("waypoint name in another trust domain accepted")
	}
	if why := bi.checkBypass(&own, ap("10.0.0.1", 1), spiffeid.ID{}); why == "" {
		t.Error("plaintext (no identity) accepted")
	}
	nameless := *a
	nameless.Waypoint = &model.WaypointRef{}
	if why := bi.checkBypass(&nameless, ap("10.0.0.1", 1), spiffeid.ID{}); why == "" {
		t.Error("a nameless waypoint let plaintext through")
	}
}

// TestBindingsFollowSnapshots: the index is built once per snapshot and
// rebuilt when the store changes.
func TestBindingsFollowSnapshots(t *testing.T) {
	st := &model.Store{}
	p := &Proxy{cfg: Config{Store: st}}
	s1, b1 := p.snapshot()
	if s2, b2 := p.snapshot(); s2 != s1 || b2 != b1 {
		t.Fatal("index rebuilt without a change")
	}
	w := &model.Workload{UID: "a", Name: "a", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}
	svc := &model.Service{Name: "s", Namespace: "ns", Hostname: "s", Waypoint: &model.WaypointRef{Name: "wp", Namespace: "ns"},
		Ports: []model.ServicePort{{Port: 80}}, Endpoints: []model.Endpoint{{WorkloadUID: "a"}}}
	st.Apply(&model.Delta{Workloads: []*model.Workload{w}, Services: []*model.Service{svc}})
	s3, b3 := p.snapshot()
	if s3 == s1 || b3.snap != s3 {
		t.Fatal("index not rebuilt for the new snapshot")
	}
	if len(b3.waypointsFor(w, netip.MustParseAddrPort("10.0.0.1:80"))) != 1 {
		t.Fatal("the new binding is not indexed")
	}
	// A policy change leaves services and workloads as they were: the
	// index is carried over to the new snapshot, not rebuilt.
	st.Apply(&model.Delta{Policies: []*model.Policy{{Name: "p", Namespace: "ns", Action: model.ActionAllow}}})
	s4, b4 := p.snapshot()
	if s4 == s3 || b4.snap != s4 || !sameMap(b4.byTarget, b3.byTarget) {
		t.Fatal("index not carried over a policy change")
	}
	// A workload change rebuilds it.
	w2 := *w
	w2.Addresses = []netip.Addr{netip.MustParseAddr("10.0.0.2")}
	st.Apply(&model.Delta{Workloads: []*model.Workload{&w2}})
	_, b5 := p.snapshot()
	if sameMap(b5.byTarget, b4.byTarget) || len(b5.waypointsFor(&w2, netip.MustParseAddrPort("10.0.0.2:80"))) != 1 ||
		len(b5.waypointsFor(&w2, netip.MustParseAddrPort("10.0.0.1:80"))) != 0 {
		t.Fatal("index not rebuilt for a moved workload")
	}
}

// bigModel is a model of n services, each with two ports and three
// endpoints of its own (3n workloads), every one bound to one of 100
// waypoints: the worst case for the index.
func bigModel(n int) *model.Snapshot {
	ws := make([]*model.Workload, 0, 3*n)
	svcs := make([]*model.Service, 0, n)
	for i := range n {
		svc := &model.Service{Name: fmt.Sprintf("s%d", i), Namespace: "ns", Hostname: fmt.Sprintf("s%d.ns.svc.cluster.local", i),
			Ports:    []model.ServicePort{{Port: 80, TargetPort: 8080}, {Port: 443, TargetPort: 8443}},
			Waypoint: &model.WaypointRef{Name: fmt.Sprintf("wp%d", i%100), Namespace: "ns", Address: netip.MustParseAddrPort("10.255.0.1:15008")}}
		for j := range 3 {
			k := 3*i + j
			w := &model.Workload{UID: fmt.Sprintf("w%d", k), Name: fmt.Sprintf("w%d", k), Namespace: "ns", Node: fmt.Sprintf("n%d", k%100),
				Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(k >> 16), byte(k >> 8), byte(k)})}, Enrolled: true}
			ws = append(ws, w)
			svc.Endpoints = append(svc.Endpoints, model.Endpoint{WorkloadUID: w.UID})
		}
		svcs = append(svcs, svc)
	}
	return model.NewSnapshot(ws, svcs, nil, nil)
}

// BenchmarkBindingsBuild measures the per-snapshot index build on a 10k
// service model: for a node holding every workload (single-node and local
// mode, the worst case) and for one node of 100.
func BenchmarkBindingsBuild(b *testing.B) {
	snap := bigModel(10_000)
	for _, bc := range []struct {
		name string
		keep func(*model.Workload) bool
	}{
		{"all-local", nil},
		{"one-node-of-100", func(w *model.Workload) bool { return w.Node == "n7" }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			var bi *bindings
			cpu := cpuTime(b)
			for b.Loop() {
				bi = buildBindings(snap, bc.keep)
			}
			b.ReportMetric(float64((cpuTime(b)-cpu).Nanoseconds())/float64(b.N), "cpu-ns/op")
			b.ReportMetric(float64(len(bi.byTarget)), "targets")
		})
	}
	// For scale: what every config change already costs a node (the scan
	// for its workloads' identities and capture).
	b.Run("localWorkloads-one-node-of-100", func(b *testing.B) {
		p := &Proxy{cfg: Config{Node: "n7"}}
		cpu := cpuTime(b)
		for b.Loop() {
			p.localWorkloads(snap)
		}
		b.ReportMetric(float64((cpuTime(b)-cpu).Nanoseconds())/float64(b.N), "cpu-ns/op")
	})
}

// cpuTime is the process's CPU time (user and system, GC included): on a
// shared machine it measures the cost better than wall time.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkBypassCheck measures the per-connection lookup on that model.
func BenchmarkBypassCheck(b *testing.B) {
	snap := bigModel(10_000)
	bi := buildBindings(snap, nil)
	w := snap.Workloads["w12345"]
	target := netip.AddrPortFrom(w.Addresses[0], 8080)
	peer := spiffeid.RequireFromString("spiffe://cluster.local/ns/ns/sa/wp15")
	b.ReportAllocs()
	for b.Loop() {
		if why := bi.checkBypass(w, target, peer); why != "" {
			b.Fatal(why)
		}
	}
}
