package waypoint

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
)

// countingClient is env.client that counts its tunnelled connections.
func (e *env) countingClient(h2 bool, dials *atomic.Int32) *http.Client {
	d := &hbone.Dialer{Certs: e.certs}
	e.t.Cleanup(func() { d.Close() })
	tgt := netip.MustParseAddrPort(target)
	rt := &http.Transport{Protocols: new(http.Protocols), MaxIdleConnsPerHost: 4,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			dials.Add(1)
			return d.Dial(ctx, hbone.DialRequest{Source: e.cliID, Peers: []spiffeid.ID{e.wpID}, Addr: e.hbone, Target: tgt})
		}}
	if h2 {
		rt.Protocols.SetUnencryptedHTTP2(true)
	} else {
		rt.Protocols.SetHTTP1(true)
	}
	c := &http.Client{Transport: rt, Timeout: 5 * time.Second}
	e.t.Cleanup(c.CloseIdleConnections)
	return c
}

// TestDrainDuration: once its context ends, the waypoint fails readiness at
// once but keeps serving, new connections included, for DrainDuration;
// every answer in that time makes its client reconnect (HTTP/1.1
// Connection: close, HTTP/2 GOAWAY); then it stops accepting and Serve
// returns.
func TestDrainDuration(t *testing.T) {
	const drainFor = 1500 * time.Millisecond
	e := newEnv(t, func(c *Config) { c.DrainDuration = drainFor })
	b := newBackend(t, whoami("b"))
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: b.addr}}})...)
	ready := func() int {
		resp, err := http.Get(e.ready + "/healthz/ready")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	eventually(t, 2*time.Second, func() bool { return ready() == 200 }, "never ready")

	var h1Dials, h2Dials atomic.Int32
	h1, h2 := e.countingClient(false, &h1Dials), e.countingClient(true, &h2Dials)
	do := func(c *http.Client) (*http.Response, error) {
		resp, err := c.Get("http://" + svc + "/")
		if err != nil {
			return nil, err
		}
		io.Copy(io.Discard, resp.Body) // read to the end: the connection is reused
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return resp, fmt.Errorf("status %d", resp.StatusCode)
		}
		return resp, nil
	}
	// Before: connections are kept.
	for _, c := range []*http.Client{h1, h2, h1, h2} {
		resp, err := do(c)
		if err != nil {
			t.Fatal(err)
		}
		if resp.Close {
			t.Fatal("Connection: close before the drain")
		}
	}
	if h1Dials.Load() != 1 || h2Dials.Load() != 1 {
		t.Fatalf("dials before the drain: h1 %d, h2 %d; want one each", h1Dials.Load(), h2Dials.Load())
	}

	start := time.Now()
	e.cancel() // SIGTERM
	eventually(t, time.Second, func() bool { return ready() == 503 }, "still ready while draining")

	// Draining: each client's next answer comes on its old connection and
	// ends it; the one after comes on a new connection, still accepted.
	resp, err := do(h1)
	if err != nil {
		t.Fatalf("HTTP/1.1 on the old connection while draining: %v", err)
	}
	if !resp.Close {
		t.Error("HTTP/1.1 answer while draining lacks Connection: close")
	}
	if _, err := do(h2); err != nil {
		t.Fatalf("HTTP/2 on the old connection while draining: %v", err)
	}
	for _, c := range []*http.Client{h1, h2} {
		if _, err := do(c); err != nil {
			t.Fatalf("a new connection while draining: %v", err)
		}
	}
	elapsed := time.Since(start)
	if h1Dials.Load() != 2 || h2Dials.Load() != 2 {
		t.Errorf("dials after the drain began: h1 %d, h2 %d; want 2 each (one reconnect)", h1Dials.Load(), h2Dials.Load())
	}
	if elapsed >= drainFor {
		t.Fatalf("the draining requests took %s, more than the drain duration: nothing was shown", elapsed)
	}
	select {
	case err := <-e.done:
		t.Fatalf("Serve returned %v after %s, before the drain duration %s", err, time.Since(start), drainFor)
	case <-time.After(drainFor - elapsed - 200*time.Millisecond):
	}
	select {
	case err := <-e.done:
		if err != nil {
			t.Error(err)
		}
		e.done <- nil // for the cleanup
		if d := time.Since(start); d < drainFor {
			t.Errorf("Serve returned after %s, before the drain duration %s", d, drainFor)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after the drain duration")
	}
	if _, err := net.DialTimeout("tcp", e.hbone.String(), time.Second); err == nil {
		t.Error("the HBONE listener still accepts after the drain")
	}
}
