package xdsclient

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
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

func TestTokenNeedsTLS(t *testing.T) {
	c := &Client{Addr: "127.0.0.1:1", Store: &model.Store{}, Token: "secret"}
	if err := c.Start(t.Context()); err == nil {
		t.Fatal("a token was accepted without TLS")
	}
}

// The token file is read for each stream: kubelet rotates projected tokens.
func TestTokenFileReadForEachStream(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	c := &Client{Addr: "127.0.0.1:1", TLS: &tls.Config{}, Store: &model.Store{}, TokenFile: path, Token: "ignored"}
	creds := tokenCreds{c}
	if !creds.RequireTransportSecurity() {
		t.Fatal("the token may go out in clear")
	}
	if _, err := creds.GetRequestMetadata(t.Context()); err == nil {
		t.Fatal("no error for a missing token file")
	}
	for _, tok := range []string{"first-token", "rotated-token"} {
		if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		md, err := creds.GetRequestMetadata(t.Context())
		if err != nil || md["authorization"] != "Bearer "+tok {
			t.Fatalf("metadata %v, %v; want Bearer %s", md, err, tok)
		}
	}
	if err := os.WriteFile(path, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := creds.GetRequestMetadata(t.Context()); err == nil {
		t.Fatal("an empty token file was sent")
	}
}
