package spire

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/utils/clock"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
)

// Delegated is the ztunnel's provider: an authorized delegate of the node's
// SPIRE agent (Delegated Identity API on the agent's admin socket). Each
// identity SetIdentities (or GetX509SVID) names gets its own
// SubscribeToX509SVIDs stream, by Selectors; one SubscribeToX509Bundles
// stream keeps the bundles. A lost stream is re-established with backoff.
//
// The zero value with AdminSocket set is ready to use; it must not be copied
// after first use. Close stops it.
type Delegated struct {
	// AdminSocket is the path of the agent's admin socket (its
	// admin_socket_path). Required.
	AdminSocket string
	// Selectors returns the selectors SPIRE registers id under
	// (K8sSelectors if nil).
	Selectors func(spiffeid.ID) ([]*types.Selector, error)
	// Clock drives expiry checks and retries (real time if nil).
	Clock clock.Clock
	// Logger (discard if nil).
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the delay before a failed stream is
	// retried (DefaultMinBackoff, DefaultMaxBackoff if zero).
	MinBackoff, MaxBackoff time.Duration

	initOnce sync.Once
	h        *holder
	conn     *grpc.ClientConn
	connErr  error
	client   delegatedv1.DelegatedIdentityClient
	ctx      context.Context // canceled by Close; the parent of every stream
	cancel   context.CancelFunc
	wg       sync.WaitGroup // the streams' goroutines
	// retryBundles cuts the bundle stream's backoff short: an SVID stream
	// got through, so the agent answers now (at start-up it refuses
	// everyone until it has synced the delegate's own entry).
	retryBundles chan struct{}
}

var _ certs.Provider = (*Delegated)(nil)

// K8sSelectors are the selectors of spiffe://<td>/ns/<ns>/sa/<sa>:
// k8s:ns:<ns> and k8s:sa:<sa>, what SPIRE's k8s workload attestor reports
// for a pod of that service account.
func K8sSelectors(id spiffeid.ID) ([]*types.Selector, error) {
	ns, sa, err := identity.ParseWorkload(id)
	if err != nil {
		return nil, err
	}
	return []*types.Selector{{Type: "k8s", Value: "ns:" + ns}, {Type: "k8s", Value: "sa:" + sa}}, nil
}

func (d *Delegated) init() {
	d.initOnce.Do(func() {
		// The provider's own lifetime is the root of its streams' contexts;
		// Close cancels it. Callers' contexts bound only their waits.
		d.ctx, d.cancel = context.WithCancel(context.Background())
		d.h = newHolder(d.Clock, d.Logger)
		d.h.start = d.startLocked
		if d.AdminSocket == "" {
			d.connErr = errors.New("spire: no agent admin socket")
		} else {
			d.conn, d.connErr = grpc.NewClient("unix:"+d.AdminSocket,
				grpc.WithTransportCredentials(insecure.NewCredentials()),
				// A restarted agent is found within a second, not after
				// gRPC's default backoff of up to two minutes.
				grpc.WithConnectParams(grpc.ConnectParams{
					Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
					MinConnectTimeout: 2 * time.Second,
				}))
		}
		if d.connErr != nil {
			d.connErr = fmt.Errorf("spire agent admin socket %q: %w", d.AdminSocket, d.connErr)
			return
		}
		d.client = delegatedv1.NewDelegatedIdentityClient(d.conn)
		d.retryBundles = make(chan struct{}, 1)
		d.wg.Add(1)
		go d.watchBundles()
	})
}

// GetX509SVID implements certs.Provider: the SVID SPIRE last pushed for id
// while it is valid; after it expires (agent gone, entry deleted) an error,
// so the handshake that asked fails. The first SVID of an identity is waited
// for, bounded by ctx. The returned SVID must not be modified.
func (d *Delegated) GetX509SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	d.init()
	return d.h.get(ctx, id)
}

// GetX509BundleForTrustDomain implements x509bundle.Source with the bundles
// SPIRE pushed (federated trust domains included).
func (d *Delegated) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	d.init()
	return d.h.bundle(td)
}

// SetIdentities implements certs.Provider: a stream per new identity, the
// streams of those not listed closed and their SVIDs dropped.
func (d *Delegated) SetIdentities(ids []spiffeid.ID) {
	d.init()
	d.h.setIdentities(ids)
}

// Certificates implements certs.Provider, sorted by identity.
func (d *Delegated) Certificates() []certs.CertStatus {
	d.init()
	return d.h.status()
}

// Rotations returns how many SVIDs SPIRE pushed for id after its first
// (since id was last added).
func (d *Delegated) Rotations(id spiffeid.ID) int {
	d.init()
	return d.h.rotations(id)
}

// Close stops every stream, wakes waiting callers with certs.ErrClosed and
// waits for the goroutines. It is idempotent.
func (d *Delegated) Close() error {
	d.init()
	d.h.close()
	d.cancel()
	d.wg.Wait()
	if d.conn != nil {
		d.conn.Close()
	}
	return nil
}

// startLocked starts e's stream (holder.mu held).
func (d *Delegated) startLocked(e *held) {
	if d.connErr != nil {
		e.err = d.connErr
		return
	}
	ctx, cancel := context.WithCancel(d.ctx)
	e.cancel = cancel
	d.wg.Add(1)
	go d.watchSVID(ctx, e.id)
}

// watchSVID keeps id's SVID in step with the agent until ctx ends.
func (d *Delegated) watchSVID(ctx context.Context, id spiffeid.ID) {
	defer d.wg.Done()
	selectors := d.Selectors
	if selectors == nil {
		selectors = K8sSelectors
	}
	sels, err := selectors(id)
	if err != nil {
		d.h.failed(id, fmt.Errorf("selectors: %w", err))
		return // permanent: nothing to subscribe with
	}
	for {
		err := d.streamSVID(ctx, id, sels)
		if ctx.Err() != nil {
			return
		}
		n := d.h.failed(id, err)
		if !sleep(ctx, d.h.clock, backoff(n, d.MinBackoff, d.MaxBackoff)) {
			return
		}
	}
}

// streamSVID subscribes to id's SVIDs and records each update; it returns
// when the stream breaks.
func (d *Delegated) streamSVID(ctx context.Context, id spiffeid.ID, sels []*types.Selector) error {
	stream, err := d.client.SubscribeToX509SVIDs(ctx, &delegatedv1.SubscribeToX509SVIDsRequest{Selectors: sels})
	if err != nil {
		return fmt.Errorf("subscribe to x509-svids: %w", err)
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("x509-svid stream: %w", err)
		}
		svid, err := pickSVID(id, resp.GetX509Svids())
		d.h.update(id, svid, err)
		if !d.h.haveBundles() {
			select {
			case d.retryBundles <- struct{}{}:
			default:
			}
		}
	}
}

// pickSVID returns id's SVID among those the agent sent for its selectors
// (other entries can match the same selectors).
func pickSVID(id spiffeid.ID, in []*delegatedv1.X509SVIDWithKey) (*x509svid.SVID, error) {
	var others []string
	for _, s := range in {
		td, err := spiffeid.TrustDomainFromString(s.GetX509Svid().GetId().GetTrustDomain())
		if err != nil {
			continue
		}
		got, err := spiffeid.FromPath(td, s.GetX509Svid().GetId().GetPath())
		if err != nil {
			continue
		}
		if got != id {
			others = append(others, got.String())
			continue
		}
		svid, err := parseSVID(s)
		if err != nil {
			return nil, fmt.Errorf("svid for %s from the agent: %w", id, err)
		}
		if svid.ID != id {
			return nil, fmt.Errorf("svid for %s from the agent: its certificate is for %s", id, svid.ID)
		}
		return svid, nil
	}
	if len(others) > 0 {
		return nil, fmt.Errorf("%w (entries matching its selectors give %s)", ErrNoSVID, strings.Join(others, ", "))
	}
	return nil, fmt.Errorf("%w (no registration entry matches its selectors)", ErrNoSVID)
}

// parseSVID turns the agent's DER chain and PKCS#8 key into an SVID.
func parseSVID(s *delegatedv1.X509SVIDWithKey) (*x509svid.SVID, error) {
	var chain []byte
	for _, c := range s.GetX509Svid().GetCertChain() {
		chain = append(chain, c...)
	}
	return x509svid.ParseRaw(chain, s.GetX509SvidKey())
}

// watchBundles keeps the bundles in step with the agent until Close.
func (d *Delegated) watchBundles() {
	defer d.wg.Done()
	ctx := d.ctx
	failures := 0
	for {
		err := d.streamBundles(ctx, func() { failures = 0 })
		if ctx.Err() != nil {
			return
		}
		d.h.bundlesFailed(err)
		if failures++; failures == 1 {
			d.h.log.Warn("spire agent bundle stream failed: keeping the last bundles", "err", err)
		}
		t := d.h.clock.NewTimer(backoff(failures, d.MinBackoff, d.MaxBackoff))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C():
		case <-d.retryBundles:
			t.Stop()
		}
	}
}

func (d *Delegated) streamBundles(ctx context.Context, ok func()) error {
	stream, err := d.client.SubscribeToX509Bundles(ctx, &delegatedv1.SubscribeToX509BundlesRequest{})
	if err != nil {
		return fmt.Errorf("subscribe to x509 bundles: %w", err)
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("x509 bundle stream: %w", err)
		}
		bs, err := parseBundles(resp.GetCaCertificates())
		if err != nil {
			d.h.log.Warn("bad bundle update from the spire agent: ignored", "err", err)
			continue
		}
		d.h.setBundles(bs)
		ok()
	}
}

// parseBundles parses the agent's map of trust domain ("spiffe://td") to
// concatenated DER roots.
func parseBundles(m map[string][]byte) ([]*x509bundle.Bundle, error) {
	out := make([]*x509bundle.Bundle, 0, len(m))
	for name, der := range m {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return nil, fmt.Errorf("bundle %q: %w", name, err)
		}
		roots, err := x509.ParseCertificates(der)
		if err != nil {
			return nil, fmt.Errorf("bundle %s: %w", td, err)
		}
		out = append(out, x509bundle.FromX509Authorities(td, roots))
	}
	return out, nil
}
