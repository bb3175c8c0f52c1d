package server

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// F4: 15012's connections are renewed after MaxConnectionAge (GOAWAY, then
// the grace, then the xDS stream is cut): a ztunnel's xdsclient reconnects
// over a new connection, authenticating again, and keeps its config in
// sync throughout. Without MaxConnectionAge one connection (and one
// authentication) lasts forever.
func TestConnectionAgeRenewsConnections(t *testing.T) {
	ls := startLocal(t, func(c *Config) { c.MaxConnectionAge, c.connAgeGrace = 500*time.Millisecond, 200*time.Millisecond })
	ctx := t.Context()
	var dials atomic.Int64
	d := &net.Dialer{}
	tlsConf := caclient.TLSConfig(ls.roots, identity.DefaultTrustDomain, identity.ControlPlane(identity.DefaultTrustDomain))
	c := &xdsclient.Client{Addr: ls.addr, TLS: tlsConf, Token: node1Secret, Node: "node-1", Store: &model.Store{},
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			dials.Add(1)
			return d.DialContext(ctx, "tcp", a)
		})}}
	go func() { _ = c.Start(ctx) }()
	select {
	case <-c.SyncedCh():
	case <-time.After(10 * time.Second):
		t.Fatal("client did not sync")
	}
	synced := c.Store.Load()
	deadline := time.Now().Add(15 * time.Second)
	for dials.Load() < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections in 15 s with a connection age of 500ms, want 4", dials.Load())
		}
		if len(c.Store.Load().Workloads) != len(synced.Workloads) {
			t.Fatal("the client lost its config while reconnecting")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(c.Store.Load().Workloads) == 0 {
		t.Fatal("no workloads after reconnecting")
	}
}
