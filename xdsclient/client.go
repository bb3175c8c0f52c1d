package xdsclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ambit-mesh/ambit/credential"
	"github.com/ambit-mesh/ambit/model"
)

// MaxMessageSize bounds one xDS response the client accepts.
const MaxMessageSize = 1 << 30

// Client is one delta-ADS subscription to istiod-lite. Set the fields and
// call Start; the zero values of the optional fields are usable.
type Client struct {
	// Addr is istiod-lite's address, e.g.
	// "istiod-lite.ambit-system.svc:15012". Required.
	Addr string
	// TLS verifies the server (caclient.TLSConfig); nil: plaintext (tests
	// only: a bearer token needs TLS).
	TLS *tls.Config
	// Node is this client's node id (the ztunnel's node name).
	Node string
	// NodeInfo, if set, is sent as the xDS Node instead of {Id: Node}.
	NodeInfo *core.Node

	// Credential is the bearer token sent with each stream (read anew at
	// each reconnection); share one with the certificate client. When nil,
	// TokenFile and Token are used as credential.Bearer{File: TokenFile,
	// Token: Token}; when all are empty no token is sent, which only a
	// server without authentication accepts (tests).
	Credential *credential.Bearer
	TokenFile  string
	Token      string

	// Types are the subscribed resource types, in subscription order.
	Types []Type
	// OnUpdate, if set, receives the whole accepted state after each
	// response (see the package doc); an error NACKs the response. It runs
	// after the type's Apply, if any (which it cannot undo): a consumer
	// uses one or the other.
	OnUpdate func(*Snapshot) error
	// Store is a shorthand for the ztunnel: when Types is empty, the client
	// subscribes to WorkloadTypes(Store).
	Store *model.Store

	// Logger may be nil.
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the wait between reconnections
	// (defaults 200ms and 30s); each wait is drawn from [d/2, d].
	MinBackoff, MaxBackoff time.Duration
	// DialOptions are added to the gRPC dial (e.g. a custom dialer).
	DialOptions []grpc.DialOption

	synced     atomic.Bool
	syncedOnce sync.Once
	syncedCh   chan struct{} // closed on first sync; made once by syncedOnce

	// The fields below are used by Start's goroutine only.
	types    map[string]*Type
	order    []string                     // type URLs, subscription order
	versions map[string]map[string]string // type URL -> name -> version held
	received map[string]bool              // type URL -> a response was accepted
	snap     *Snapshot                    // last accepted state (with OnUpdate only)
}

func (c *Client) log() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

func (c *Client) init() {
	c.syncedOnce.Do(func() { c.syncedCh = make(chan struct{}) })
}

// Synced reports whether every subscribed type has had an accepted
// response. It stays true across reconnections: the last good config stays.
func (c *Client) Synced() bool { return c.synced.Load() }

// SyncedCh is closed when the client has synced.
func (c *Client) SyncedCh() <-chan struct{} {
	c.init()
	return c.syncedCh
}

func (c *Client) credential() *credential.Bearer {
	if c.Credential != nil {
		return c.Credential
	}
	if c.TokenFile == "" && c.Token == "" {
		return nil
	}
	return &credential.Bearer{File: c.TokenFile, Token: c.Token}
}

// setup checks the configuration and builds the type table.
func (c *Client) setup() error {
	types := c.Types
	if len(types) == 0 && c.Store != nil {
		types = WorkloadTypes(c.Store)
	}
	if c.Addr == "" || len(types) == 0 {
		return errors.New("xdsclient: Addr and Types (or Store) are required")
	}
	c.types = make(map[string]*Type, len(types))
	c.order = c.order[:0]
	for i := range types {
		t := &types[i]
		if t.URL == "" {
			return errors.New("xdsclient: a Type without URL")
		}
		if c.types[t.URL] != nil {
			return fmt.Errorf("xdsclient: type %s registered twice", t.URL)
		}
		c.types[t.URL] = t
		c.order = append(c.order, t.URL)
	}
	c.versions = map[string]map[string]string{}
	c.received = map[string]bool{}
	if c.OnUpdate != nil {
		c.snap = &Snapshot{types: c.order, sets: map[string]map[string]Resource{}, received: map[string]bool{}}
	}
	return nil
}

// Start runs the client until ctx ends, reconnecting whenever the stream
// ends. It returns nil when ctx ends, or an error for a bad configuration.
// Call it once.
func (c *Client) Start(ctx context.Context) error {
	c.init()
	if err := c.setup(); err != nil {
		return err
	}
	creds := insecure.NewCredentials()
	if c.TLS != nil {
		creds = credentials.NewTLS(c.TLS)
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		// A full push of a large mesh is one response (100k workloads are
		// about 20 MB), well past gRPC's 4 MB default.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize)),
		grpc.WithInitialWindowSize(4 << 20), grpc.WithInitialConnWindowSize(16 << 20),
	}
	if cred := c.credential(); cred != nil {
		if c.TLS == nil {
			return errors.New("xdsclient: a token needs TLS")
		}
		opts = append(opts, grpc.WithPerRPCCredentials(cred))
	}
	conn, err := grpc.NewClient(c.Addr, append(opts, c.DialOptions...)...)
	if err != nil {
		return fmt.Errorf("xdsclient: dial %s: %w", c.Addr, err)
	}
	defer conn.Close()
	minB, maxB := c.MinBackoff, c.MaxBackoff
	if minB <= 0 {
		minB = 200 * time.Millisecond
	}
	if maxB < minB {
		maxB = max(30*time.Second, minB)
	}
	backoff := minB
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	for {
		start := time.Now()
		err := c.stream(ctx, ads)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > maxB {
			backoff = minB // the stream was healthy for a while
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		c.log().Warn("xds stream ended; reconnecting", "addr", c.Addr, "error", err, "in", wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(backoff*2, maxB)
	}
}

// stream runs one ADS stream until it fails.
func (c *Client) stream(ctx context.Context, ads discovery.AggregatedDiscoveryServiceClient) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := ads.DeltaAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		return fmt.Errorf("open stream: %w", err)
	}
	node := c.NodeInfo
	if node == nil {
		node = &core.Node{Id: c.Node}
	}
	for _, url := range c.order {
		names := c.types[url].Names
		if len(names) == 0 {
			names = []string{"*"}
		}
		req := &discovery.DeltaDiscoveryRequest{
			Node:                    node,
			TypeUrl:                 url,
			ResourceNamesSubscribe:  names,
			InitialResourceVersions: c.versions[url],
		}
		node = nil // sent once per stream
		if err := st.Send(req); err != nil {
			return fmt.Errorf("subscribe %s: %w", url, err)
		}
	}
	c.log().Info("xds stream open", "addr", c.Addr, "node", c.Node)
	for {
		resp, err := st.Recv()
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		ack := &discovery.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}
		if err := c.apply(resp); err != nil {
			c.log().Error("xds update rejected; keeping the last good state", "type", resp.GetTypeUrl(), "nonce", resp.GetNonce(), "error", err)
			ack.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
		} else if !c.synced.Load() && c.allReceived() {
			c.synced.Store(true)
			close(c.syncedCh)
			c.log().Info("xds synced", "types", len(c.order))
		}
		if err := st.Send(ack); err != nil {
			return fmt.Errorf("ack: %w", err)
		}
	}
}

func (c *Client) allReceived() bool {
	for _, url := range c.order {
		if !c.received[url] {
			return false
		}
	}
	return true
}

// apply decodes a whole response and applies it, or nothing of it.
func (c *Client) apply(resp *discovery.DeltaDiscoveryResponse) error {
	url := resp.GetTypeUrl()
	t := c.types[url]
	if t == nil {
		return fmt.Errorf("unsubscribed type %s", url)
	}
	d := Delta{TypeURL: url, Updated: make([]Resource, 0, len(resp.GetResources())), Removed: resp.GetRemovedResources()}
	for _, r := range resp.GetResources() {
		a := r.GetResource()
		if a.GetTypeUrl() != url {
			return fmt.Errorf("resource %s: type %s in a %s response", r.GetName(), a.GetTypeUrl(), url)
		}
		var v any = a
		if t.Decode != nil {
			var err error
			if v, err = t.Decode(r.GetName(), a); err != nil {
				return fmt.Errorf("resource %s: %w", r.GetName(), err)
			}
		}
		d.Updated = append(d.Updated, Resource{Name: r.GetName(), Version: r.GetVersion(), Value: v})
	}
	if t.Apply != nil {
		if err := t.Apply(d); err != nil {
			return err
		}
	}
	if c.OnUpdate != nil {
		next := c.snap.next(d)
		if err := c.OnUpdate(next); err != nil {
			return err
		}
		c.snap = next
	}
	c.received[url] = true
	v := c.versions[url]
	if v == nil {
		v = make(map[string]string, len(d.Updated))
		c.versions[url] = v
	}
	for _, r := range d.Updated {
		v[r.Name] = r.Version
	}
	for _, n := range d.Removed {
		delete(v, n)
	}
	return nil
}
