// Package xdsclient is the ztunnel side of istiod-lite's Delta xDS: it keeps
// a *model.Store in step with the control plane's model (api/workload
// resources), reconnects with jittered exponential backoff, ACKs the updates
// it applies and NACKs the ones it cannot decode, and keeps serving the last
// good state while the control plane is away.
package xdsclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
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
	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/model"
)

// MaxMessageSize bounds one xDS response the client accepts.
const MaxMessageSize = 1 << 30

// Client subscribes to every workload, service and policy and applies them to
// Store. Set the fields and call Start; the zero values of the optional
// fields are usable.
type Client struct {
	Addr  string      // istiod-lite's address, e.g. "istiod-lite.ambit-system:15012"
	TLS   *tls.Config // nil: plaintext (tests only)
	Node  string      // this ztunnel's node name, sent as the xDS Node id
	Store *model.Store
	// TokenFile holds the bearer token the client authenticates with (the
	// ztunnel's projected service-account token, or the host's secret in
	// local mode). It is read at every (re)connection, since kubelet rotates
	// projected tokens. When empty, Token is used; when both are empty no
	// token is sent, which only a server without authentication accepts
	// (tests). A token needs TLS.
	TokenFile string
	Token     string
	// Logger may be nil.
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the wait between reconnections
	// (defaults 200ms and 30s); each wait is drawn from [d/2, d].
	MinBackoff, MaxBackoff time.Duration
	// DialOptions are added to the gRPC dial (e.g. per-RPC credentials).
	DialOptions []grpc.DialOption

	synced     atomic.Bool
	syncedOnce sync.Once
	syncedCh   chan struct{} // closed on first sync; guarded by syncedOnce

	mu       sync.Mutex                   // guards versions
	versions map[string]map[string]string // type -> name -> version held
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

// Synced reports whether the client has received the full state once. It
// stays true across reconnections: the store keeps the last good state.
func (c *Client) Synced() bool { return c.synced.Load() }

// SyncedCh is closed when the client has synced once.
func (c *Client) SyncedCh() <-chan struct{} {
	c.init()
	return c.syncedCh
}

// Start runs the client until ctx ends; it reconnects whenever the stream
// ends. It returns nil when ctx ends, or an error for a bad configuration.
func (c *Client) Start(ctx context.Context) error {
	c.init()
	if c.Store == nil || c.Addr == "" {
		return errors.New("xdsclient: Addr and Store are required")
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
	if c.TokenFile != "" || c.Token != "" {
		if c.TLS == nil {
			return errors.New("xdsclient: a token needs TLS")
		}
		opts = append(opts, grpc.WithPerRPCCredentials(tokenCreds{c}))
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
	for {
		start := time.Now()
		err := c.stream(ctx, discovery.NewAggregatedDiscoveryServiceClient(conn))
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > maxB {
			backoff = minB // the stream was healthy for a while
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		c.log().Warn("xds stream ended; reconnecting", "addr", c.Addr, "error", err, "in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
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
	node := &core.Node{Id: c.Node}
	c.mu.Lock()
	for _, t := range workload.TypeURLs {
		req := &discovery.DeltaDiscoveryRequest{
			Node:                    node,
			TypeUrl:                 t,
			ResourceNamesSubscribe:  []string{"*"},
			InitialResourceVersions: c.versions[t],
		}
		node = nil // sent once per stream
		if err := st.Send(req); err != nil {
			c.mu.Unlock()
			return fmt.Errorf("subscribe %s: %w", t, err)
		}
	}
	c.mu.Unlock()
	c.log().Info("xds stream open", "addr", c.Addr, "node", c.Node)
	seen := map[string]bool{}
	for {
		resp, err := st.Recv()
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		ack := &discovery.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}
		if err := c.apply(resp); err != nil {
			c.log().Error("xds update rejected; keeping the last good state", "type", resp.GetTypeUrl(), "nonce", resp.GetNonce(), "error", err)
			ack.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
		} else {
			seen[resp.GetTypeUrl()] = true
			if len(seen) == len(workload.TypeURLs) && !c.synced.Load() {
				c.synced.Store(true)
				close(c.syncedCh)
				c.log().Info("xds synced", "workloads", len(c.Store.Load().Workloads), "services", len(c.Store.Load().Services))
			}
		}
		if err := st.Send(ack); err != nil {
			return fmt.Errorf("ack: %w", err)
		}
	}
}

// tokenCreds sends the bearer token with each stream, reading TokenFile
// anew each time.
type tokenCreds struct{ c *Client }

func (t tokenCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok := t.c.Token
	if t.c.TokenFile != "" {
		b, err := os.ReadFile(t.c.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("read token: %w", err)
		}
		tok = string(b)
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return nil, errors.New("empty token")
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

func (tokenCreds) RequireTransportSecurity() bool { return true }

// apply decodes a whole response and applies it, or nothing of it.
func (c *Client) apply(resp *discovery.DeltaDiscoveryResponse) error {
	typ := resp.GetTypeUrl()
	d := &model.Delta{}
	for _, r := range resp.GetResources() {
		a := r.GetResource()
		if a.GetTypeUrl() != typ {
			return fmt.Errorf("resource %s: type %s in a %s response", r.GetName(), a.GetTypeUrl(), typ)
		}
		if err := decodeInto(d, typ, r.GetName(), a.GetValue()); err != nil {
			return fmt.Errorf("resource %s: %w", r.GetName(), err)
		}
	}
	switch typ {
	case workload.WorkloadType:
		d.RemovedWorkloads = resp.GetRemovedResources()
	case workload.ServiceType:
		d.RemovedServices = resp.GetRemovedResources()
	case workload.AuthorizationType:
		d.RemovedPolicies = resp.GetRemovedResources()
	case workload.PeerAuthenticationType:
		d.RemovedPeerAuthn = resp.GetRemovedResources()
	default:
		return fmt.Errorf("unknown type %s", typ)
	}
	c.Store.Apply(d)
	c.mu.Lock()
	if c.versions == nil {
		c.versions = map[string]map[string]string{}
	}
	v := c.versions[typ]
	if v == nil {
		v = map[string]string{}
		c.versions[typ] = v
	}
	for _, r := range resp.GetResources() {
		v[r.GetName()] = r.GetVersion()
	}
	for _, n := range resp.GetRemovedResources() {
		delete(v, n)
	}
	c.mu.Unlock()
	return nil
}

func decodeInto(d *model.Delta, typ, name string, b []byte) error {
	switch typ {
	case workload.WorkloadType:
		var m workload.Workload
		if err := proto.Unmarshal(b, &m); err != nil {
			return err
		}
		w, err := workload.ToWorkload(&m)
		if err != nil {
			return err
		}
		if w.UID != name {
			return fmt.Errorf("name %s != uid %s", name, w.UID)
		}
		d.Workloads = append(d.Workloads, w)
	case workload.ServiceType:
		var m workload.Service
		if err := proto.Unmarshal(b, &m); err != nil {
			return err
		}
		s, err := workload.ToService(&m)
		if err != nil {
			return err
		}
		if s.Key() != name {
			return fmt.Errorf("name %s != key %s", name, s.Key())
		}
		d.Services = append(d.Services, s)
	case workload.AuthorizationType:
		var m workload.Authorization
		if err := proto.Unmarshal(b, &m); err != nil {
			return err
		}
		p, err := workload.ToPolicy(&m)
		if err != nil {
			return err
		}
		if p.Key() != name {
			return fmt.Errorf("name %s != key %s", name, p.Key())
		}
		d.Policies = append(d.Policies, p)
	case workload.PeerAuthenticationType:
		var m workload.PeerAuthentication
		if err := proto.Unmarshal(b, &m); err != nil {
			return err
		}
		p, err := workload.ToPeerAuthn(&m)
		if err != nil {
			return err
		}
		if p.Key() != name {
			return fmt.Errorf("name %s != key %s", name, p.Key())
		}
		d.PeerAuthn = append(d.PeerAuthn, p)
	default:
		return fmt.Errorf("unknown type %s", typ)
	}
	return nil
}
