package ztunnel

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/model"
)

// recordingCapture records Reconcile calls and, at each, how many
// connections the proxy still held.
type recordingCapture struct {
	p *Proxy

	mu    sync.Mutex // guards calls
	calls []reconcileCall
}

type reconcileCall struct {
	pods  []string
	conns int
}

func (r *recordingCapture) Reconcile(_ context.Context, pods []*model.Workload) error {
	var names []string
	for _, w := range pods {
		names = append(names, w.Name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	held := -1
	if r.p != nil {
		held = r.p.connCount()
	}
	r.calls = append(r.calls, reconcileCall{pods: names, conns: held})
	return nil
}

func (r *recordingCapture) last() reconcileCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.calls) == 0 {
		return reconcileCall{conns: -1}
	}
	return r.calls[len(r.calls)-1]
}

// TestCaptureFollowsTheNode: the capture gets the node's enrolled pods;
// when a pod leaves, its connections are closed before it is released.
func TestCaptureFollowsTheNode(t *testing.T) {
	var caps sync.Map // node name -> *recordingCapture
	m := newTestMesh(t, func(c *Config) {
		rc := &recordingCapture{}
		caps.Store(c.Node, rc)
		c.Capture = rc
	})
	v, _ := caps.Load("node2")
	rc := v.(*recordingCapture)
	rc.mu.Lock()
	rc.p = m.n2.p
	rc.mu.Unlock()
	waitFor(t, "first reconcile", func() bool {
		return slices.Equal(rc.last().pods, []string{"server-a", "server-b"}) // legacy is not enrolled
	})
	if !m.n2.p.Ready() {
		t.Error("not ready after the capture reconciled")
	}

	ip := m.net.ip
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip(21), 7200).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			defer c.Close()
			io.Copy(io.Discard, c)
		}
	}()
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), ip(11), netip.AddrPortFrom(ip(21), 7200).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, "connection established at node2", func() bool {
		d := m.n2.p.dumpConnections()
		return len(d) == 1 && d[0].Established
	})

	// server-a leaves the node.
	m.store.Apply(&model.Delta{RemovedWorkloads: []string{m.serverA.UID}})
	waitFor(t, "reconcile without server-a", func() bool { return slices.Equal(rc.last().pods, []string{"server-b"}) })
	if got := rc.last().conns; got != 0 {
		t.Fatalf("node2 still held %d connections when server-a was released", got)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("the client's connection to the departed pod is still open")
	}
}

// TestWithCertificateManager runs the mesh on certs.Manager (the real
// CertSource): the proxies tell it their node's identities, tunnels work,
// and the admin API reports its certificates with renewal times.
func TestWithCertificateManager(t *testing.T) {
	ca, err := certs.NewSelfSignedCA(identity.DefaultTrustDomain, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	newManager := func() *certs.Manager {
		mgr := &certs.Manager{Issuer: ca}
		t.Cleanup(func() { mgr.Close() })
		return mgr
	}
	// One manager per node, as in production.
	m := newTestMeshWith(t, newManager(), func(c *Config) { c.Certs = newManager() })
	c, err := socksDial(m.n1.p.Addr(ListenerSOCKS5), m.client.Addresses[0], m.vip.String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exchange(c, 100<<10, 100<<10, 8); err != nil {
		t.Fatal(err)
	}
	var dump []certDump
	waitFor(t, "certificates in the admin dump", func() bool {
		_, body := httpGet(t, m.n2.p.Addr(ListenerAdmin), "/debug/certificates")
		dump = nil
		json.Unmarshal([]byte(body), &dump)
		return len(dump) > 0 && dump[len(dump)-1].Serial != ""
	})
	var ids []string
	for _, d := range dump {
		ids = append(ids, d.Identity)
		if d.Expired || d.RenewAt.IsZero() || time.Until(d.NotAfter) < time.Hour {
			t.Errorf("certificate %+v", d)
		}
	}
	if !slices.Equal(ids, []string{"spiffe://cluster.local/ns/shop/sa/server"}) {
		t.Errorf("node2's manager holds %v, want only its workloads' identity", ids)
	}
}

// TestCaptureWaitsForFirstConfig: a proxy that starts (or restarts, with
// capture inherited from the pins) before its config source has synced must
// not reconcile capture against the empty store: that would release every
// pod and let their new connections out uncaptured.
func TestCaptureWaitsForFirstConfig(t *testing.T) {
	var synced atomic.Bool
	store := &model.Store{}
	rc := &recordingCapture{}
	p, err := New(context.Background(), Config{Store: store, Node: "node1", Capture: rc, Synced: synced.Load})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		p.Close()
	}()

	// The source writes its first config before it reports synced (as the
	// xDS client does): still nothing may be reconciled against emptiness.
	calls := func() int {
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return len(rc.calls)
	}
	time.Sleep(200 * time.Millisecond)
	if n := calls(); n != 0 {
		t.Fatalf("capture reconciled %d times before the first config: %+v", n, rc.last())
	}
	w := &model.Workload{UID: "c/Pod/ns/a", Name: "a", Namespace: "ns", Node: "node1", Enrolled: true,
		Addresses: []netip.Addr{netip.MustParseAddr("10.1.0.2")}}
	store.Replace(model.NewSnapshot([]*model.Workload{w}, nil, nil, nil))
	time.Sleep(100 * time.Millisecond)
	if n := calls(); n != 0 {
		t.Fatalf("capture reconciled %d times before the source reported synced: %+v", n, rc.last())
	}
	synced.Store(true)
	waitFor(t, "reconcile after sync", func() bool { return slices.Equal(rc.last().pods, []string{"a"}) })
	rc.mu.Lock()
	defer rc.mu.Unlock()
	for _, c := range rc.calls {
		if len(c.pods) == 0 {
			t.Fatalf("capture was reconciled to no pods: %+v", rc.calls)
		}
	}
}
