package ztunnel

import (
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/model"
)

// testMesh is two ztunnels on the loopback sharing one store and one CA:
//
//	node1: client (.11, shop/client), intruder (.12, other/intruder)
//	node2: server-a (.21), server-b (.22) behind service
//	       server.shop.svc.cluster.local (VIP .100:80 -> 8080, both shop/server),
//	       legacy (.31, not enrolled, port 9000)
//	outside the mesh: .50:9000
type testMesh struct {
	net    testNet
	store  *model.Store
	certs  hbone.CertSource
	n1, n2 *node

	client, intruder, serverA, serverB, legacy *model.Workload
	svc                                        *model.Service
	vip                                        netip.AddrPort

	srvA, srvB, srvLegacy, srvOutside *server
}

func newTestMesh(t testing.TB, mod func(*Config)) *testMesh {
	t.Helper()
	return newTestMeshWith(t, newTestCerts(t, "cluster.local"), mod)
}

func newTestMeshWith(t testing.TB, cs hbone.CertSource, mod func(*Config)) *testMesh {
	t.Helper()
	m := &testMesh{net: newTestNet(), store: &model.Store{}, certs: cs}
	ip := m.net.ip
	wl := func(name, ns, sa, node string, host byte, enrolled bool) *model.Workload {
		return &model.Workload{UID: "test/Pod/" + ns + "/" + name, Name: name, Namespace: ns, ServiceAccount: sa, Node: node,
			Addresses: []netip.Addr{ip(host)}, Enrolled: enrolled, Ready: true, Labels: map[string]string{"app": sa}}
	}
	m.client = wl("client", "shop", "client", "node1", 11, true)
	m.intruder = wl("intruder", "other", "intruder", "node1", 12, true)
	m.serverA = wl("server-a", "shop", "server", "node2", 21, true)
	m.serverB = wl("server-b", "shop", "server", "node2", 22, true)
	m.legacy = wl("legacy", "old", "legacy", "node2", 31, false)
	m.svc = &model.Service{Name: "server", Namespace: "shop", Hostname: "server.shop.svc.cluster.local",
		VIPs: []netip.Addr{ip(100)}, Ports: []model.ServicePort{{Port: 80, TargetPort: 8080}},
		Endpoints: []model.Endpoint{{WorkloadUID: m.serverA.UID}, {WorkloadUID: m.serverB.UID}}}
	m.vip = netip.AddrPortFrom(ip(100), 80)
	m.setConfig(nil, nil)

	m.srvA = startServer(t, netip.AddrPortFrom(ip(21), 8080))
	m.srvB = startServer(t, netip.AddrPortFrom(ip(22), 8080))
	m.srvLegacy = startServer(t, netip.AddrPortFrom(ip(31), 9000))
	m.srvOutside = startServer(t, netip.AddrPortFrom(ip(50), 9000))

	routes := map[netip.Addr]*node{}
	withRoutes := func(c *Config) {
		c.HBONEDialAddr = hboneTo(routes)
		if mod != nil {
			mod(c)
		}
	}
	m.n1 = startNode(t, "node1", m.store, m.certs, withRoutes)
	m.n2 = startNode(t, "node2", m.store, m.certs, withRoutes)
	routes[ip(11)], routes[ip(12)] = m.n1, m.n1
	routes[ip(21)], routes[ip(22)], routes[ip(31)] = m.n2, m.n2, m.n2
	return m
}

// setConfig replaces the store's content with the mesh's workloads and
// service plus the given policies.
func (m *testMesh) setConfig(pols []*model.Policy, pas []*model.PeerAuthentication) {
	m.store.Replace(model.NewSnapshot(
		[]*model.Workload{m.client, m.intruder, m.serverA, m.serverB, m.legacy},
		[]*model.Service{m.svc}, pols, pas))
}
