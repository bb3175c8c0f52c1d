package spire

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"k8s.io/utils/clock"

	"github.com/ambit-mesh/ambit/certs"
)

// Workload is a waypoint's provider: the SPIRE agent's Workload API, which
// attests the calling process and streams the SVIDs registered for it and
// the bundles. It holds the identities SetIdentities names (the waypoint's
// own) out of what the agent sends; an identity the agent does not give
// fails with ErrNoSVID.
//
// The zero value with Socket set is ready to use; it must not be copied
// after first use. Close stops it.
type Workload struct {
	// Socket is the path of the agent's Workload API socket (its
	// socket_path). Required.
	Socket string
	// Clock drives expiry checks (real time if nil).
	Clock clock.Clock
	// Logger (discard if nil).
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the delay before a failed stream is
	// retried (DefaultMinBackoff, DefaultMaxBackoff if zero).
	MinBackoff, MaxBackoff time.Duration

	initOnce sync.Once
	h        *holder
	cancel   context.CancelFunc
	wg       sync.WaitGroup // the watch goroutine

	conn     *grpc.ClientConn
	startErr error // no socket, or no client for it

	mu   sync.Mutex // guards last; taken after holder.mu, never before
	last *workload.X509SVIDResponse
}

var _ certs.Provider = (*Workload)(nil)

func (w *Workload) init() {
	w.initOnce.Do(func() {
		var ctx context.Context
		ctx, w.cancel = context.WithCancel(context.Background())
		w.h = newHolder(w.Clock, w.Logger)
		// A new identity takes what the last update had for it.
		w.h.start = func(e *held) {
			if w.startErr != nil {
				e.err = w.startErr
				return
			}
			w.mu.Lock()
			last := w.last
			w.mu.Unlock()
			if last != nil {
				e.svid, e.err = pickOwn(e.id, last)
			}
		}
		if w.Socket == "" {
			w.startErr = errors.New("spire: no workload api socket")
		} else {
			w.conn, w.startErr = grpc.NewClient("unix:"+w.Socket,
				grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithConnectParams(grpc.ConnectParams{
					Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
					MinConnectTimeout: 2 * time.Second,
				}))
		}
		if w.startErr != nil {
			w.startErr = fmt.Errorf("spire agent workload api socket %q: %w", w.Socket, w.startErr)
			w.h.bundlesFailed(w.startErr)
			return
		}
		w.wg.Add(1)
		go w.watch(ctx, workload.NewSpiffeWorkloadAPIClient(w.conn))
	})
}

// watch keeps the SVIDs and bundles in step with the agent until ctx ends.
func (w *Workload) watch(ctx context.Context, client workload.SpiffeWorkloadAPIClient) {
	defer w.wg.Done()
	// The Workload API refuses calls without this header (SSRF protection).
	ctx = metadata.NewOutgoingContext(ctx, metadata.Pairs("workload.spiffe.io", "true"))
	failures := 0
	for {
		err := w.stream(ctx, client, func() { failures = 0 })
		if ctx.Err() != nil {
			return
		}
		failures++
		w.failAll(err)
		if !sleep(ctx, w.h.clock, backoff(failures, w.MinBackoff, w.MaxBackoff)) {
			return
		}
	}
}

func (w *Workload) stream(ctx context.Context, client workload.SpiffeWorkloadAPIClient, ok func()) error {
	stream, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		return fmt.Errorf("workload api: %w", err)
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("workload api stream: %w", err)
		}
		bs, err := workloadBundles(resp)
		if err != nil {
			w.h.log.Warn("bad update from the spire agent's workload api: ignored", "err", err)
			continue
		}
		w.mu.Lock()
		w.last = resp
		w.mu.Unlock()
		w.h.setBundles(bs)
		for _, id := range w.held() {
			svid, err := pickOwn(id, resp)
			w.h.update(id, svid, err)
		}
		ok()
	}
}

func (w *Workload) held() []spiffeid.ID {
	w.h.mu.Lock()
	defer w.h.mu.Unlock()
	ids := make([]spiffeid.ID, 0, len(w.h.ids))
	for id := range w.h.ids {
		ids = append(ids, id)
	}
	return ids
}

// failAll records a broken stream: the SVIDs stay until they expire.
func (w *Workload) failAll(err error) {
	w.h.bundlesFailed(err)
	for _, id := range w.held() {
		w.h.failed(id, err)
	}
}

// workloadBundles returns the bundle of the SVIDs' trust domain and the
// federated ones.
func workloadBundles(resp *workload.X509SVIDResponse) ([]*x509bundle.Bundle, error) {
	var out []*x509bundle.Bundle
	if svids := resp.GetSvids(); len(svids) > 0 {
		id, err := spiffeid.FromString(svids[0].GetSpiffeId())
		if err != nil {
			return nil, fmt.Errorf("svid id: %w", err)
		}
		b, err := x509bundle.ParseRaw(id.TrustDomain(), svids[0].GetBundle())
		if err != nil {
			return nil, fmt.Errorf("bundle of %s: %w", id.TrustDomain(), err)
		}
		out = append(out, b)
	}
	fed, err := parseBundles(resp.GetFederatedBundles())
	if err != nil {
		return nil, err
	}
	return append(out, fed...), nil
}

func pickOwn(id spiffeid.ID, resp *workload.X509SVIDResponse) (*x509svid.SVID, error) {
	for _, s := range resp.GetSvids() {
		if s.GetSpiffeId() != id.String() {
			continue
		}
		svid, err := x509svid.ParseRaw(s.GetX509Svid(), s.GetX509SvidKey())
		if err != nil {
			return nil, fmt.Errorf("svid for %s from the agent: %w", id, err)
		}
		if svid.ID != id {
			return nil, fmt.Errorf("svid for %s from the agent: its certificate is for %s", id, svid.ID)
		}
		return svid, nil
	}
	return nil, fmt.Errorf("%w (the agent does not give it to this process)", ErrNoSVID)
}

// GetX509SVID implements certs.Provider (see Delegated.GetX509SVID).
func (w *Workload) GetX509SVID(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	w.init()
	return w.h.get(ctx, id)
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (w *Workload) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	w.init()
	return w.h.bundle(td)
}

// SetIdentities implements certs.Provider.
func (w *Workload) SetIdentities(ids []spiffeid.ID) {
	w.init()
	w.h.setIdentities(ids)
}

// Certificates implements certs.Provider.
func (w *Workload) Certificates() []certs.CertStatus {
	w.init()
	return w.h.status()
}

// Close stops the stream, wakes waiting callers with certs.ErrClosed and
// waits for the goroutine. It is idempotent.
func (w *Workload) Close() error {
	w.init()
	w.h.close()
	w.cancel()
	w.wg.Wait()
	if w.conn != nil {
		w.conn.Close()
	}
	return nil
}
