package xdsclient

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/model"
)

// The end-to-end behaviour (sync, ACK/NACK, reconnection with the last good
// state) is tested against the real server in istiod-lite/xds and
// istiod-lite/server. These are the client's own edges.

func TestStartNeedsAddrAndStore(t *testing.T) {
	if err := (&Client{}).Start(t.Context()); err == nil {
		t.Fatal("no error without Addr and Store")
	}
}

func TestRetriesUntilCanceledAndNeverSyncs(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close() // nothing listens: every attempt fails
	c := &Client{Addr: addr, Store: &model.Store{}, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond}
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	if err := c.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if c.Synced() {
		t.Fatal("synced without a server")
	}
	select {
	case <-c.SyncedCh():
		t.Fatal("SyncedCh closed")
	default:
	}
}
