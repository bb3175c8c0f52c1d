// Package leader runs a function only while this replica holds a
// Kubernetes Lease (client-go leader election), so that several istiod-lite
// replicas can all serve xDS and certificates while one alone writes to the
// API server (waypoint deployments, statuses).
//
//	el := &leader.Elector{Client: cs, Identity: podName, Run: deployer.Start}
//	err := el.Start(ctx) // campaigns, runs, re-campaigns after a lost term
//
// A term ends when the lease cannot be renewed within RenewDeadline: Run's
// context is cancelled then, before another replica can acquire the lease
// (LeaseDuration is longer than RenewDeadline). When Start's context ends,
// Run is stopped first and the lease is released after it returned, so a
// successor starts at once and never overlaps the predecessor's writes.
package leader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Defaults of Elector.
const (
	DefaultNamespace     = "ambit-system"
	DefaultName          = "istiod-lite-leader"
	DefaultLeaseDuration = 15 * time.Second
	DefaultRenewDeadline = 10 * time.Second
	DefaultRetryPeriod   = 2 * time.Second
)

// Elector campaigns for a Lease and runs Run while it holds it. Client and
// Run are required; the other fields have defaults.
type Elector struct {
	// Client reads and writes the Lease.
	Client kubernetes.Interface
	// Run is called with a context that ends with the term (or with
	// Start's context). It should return promptly once the context is done.
	// An error from Run ends the term (the lease is released) and Start
	// returns it.
	Run func(ctx context.Context) error

	// Namespace and Name of the Lease (defaults DefaultNamespace,
	// DefaultName).
	Namespace, Name string
	// Identity is this replica's name in the Lease (default: host name
	// and a random suffix).
	Identity string
	// LeaseDuration, RenewDeadline and RetryPeriod are client-go's
	// (defaults 15 s, 10 s, 2 s).
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// Logger receives elections' logs (nil: discard).
	Logger *slog.Logger

	leading atomic.Bool
}

// Leading reports whether this replica holds the lease now.
func (e *Elector) Leading() bool { return e.leading.Load() }

// Start campaigns and runs Run during each term, until ctx is done (it
// returns nil then) or Run fails (it returns Run's error).
func (e *Elector) Start(ctx context.Context) error {
	if e.Client == nil || e.Run == nil {
		return errors.New("leader: Elector.Client and Elector.Run are required")
	}
	for ctx.Err() == nil {
		if err := e.term(ctx); err != nil {
			return err
		}
	}
	return nil
}

func (e *Elector) log() *slog.Logger {
	if e.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return e.Logger
}

// term campaigns once and, if elected, runs Run until the term ends.
func (e *Elector) term(ctx context.Context) error {
	ns, name, id := e.Namespace, e.Name, e.Identity
	if ns == "" {
		ns = DefaultNamespace
	}
	if name == "" {
		name = DefaultName
	}
	if id == "" {
		host, _ := os.Hostname()
		id = host + "_" + string(uuid.NewUUID())
	}
	dur := func(d, def time.Duration) time.Duration {
		if d <= 0 {
			return def
		}
		return d
	}
	log := e.log().With("lease", ns+"/"+name, "identity", id)

	// The election's context is not ctx: when ctx ends while leading, Run
	// must stop before the lease is released (ReleaseOnCancel).
	electionCtx, endElection := context.WithCancel(context.WithoutCancel(ctx))
	defer endElection()

	var (
		mu     sync.Mutex // guards runErr
		runErr error
		ran    = make(chan struct{}) // closed when Run returned
		lock   = &trackingLock{Interface: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: ns, Name: name},
			Client:     e.Client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: id},
		}}
	)
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   dur(e.LeaseDuration, DefaultLeaseDuration),
		RenewDeadline:   dur(e.RenewDeadline, DefaultRenewDeadline),
		RetryPeriod:     dur(e.RetryPeriod, DefaultRetryPeriod),
		ReleaseOnCancel: true,
		Name:            name,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(termCtx context.Context) {
				defer close(ran)
				defer endElection() // Run returned: end the term, release the lease
				e.leading.Store(true)
				defer e.leading.Store(false)
				runCtx, cancel := context.WithCancel(termCtx)
				defer cancel()
				stop := context.AfterFunc(ctx, cancel)
				defer stop()
				log.Info("leading")
				err := e.Run(runCtx)
				mu.Lock()
				runErr = err
				mu.Unlock()
			},
			OnStoppedLeading: func() {},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	// Until elected, ctx's end stops the campaign directly.
	stop := context.AfterFunc(ctx, func() {
		if !lock.acquired.Load() {
			endElection()
		}
	})
	defer stop()
	le.Run(electionCtx)
	// le.Run returns when the term or the campaign ended; it does not wait
	// for OnStartedLeading, so wait here: no overlap with the next term.
	if lock.acquired.Load() {
		<-ran
		log.Info("stopped leading")
	}
	mu.Lock()
	defer mu.Unlock()
	if runErr != nil && ctx.Err() == nil {
		return fmt.Errorf("leader: run: %w", runErr)
	}
	return nil
}

// trackingLock notes, in the election's goroutine, that the lease was
// acquired: client-go starts OnStartedLeading in a goroutine of its own and
// does not wait for it, so this is how term knows whether to wait for Run.
type trackingLock struct {
	resourcelock.Interface
	acquired atomic.Bool // a write of this identity as holder succeeded
}

func (l *trackingLock) Create(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	err := l.Interface.Create(ctx, r)
	if err == nil && r.HolderIdentity == l.Identity() {
		l.acquired.Store(true)
	}
	return err
}

func (l *trackingLock) Update(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	err := l.Interface.Update(ctx, r)
	if err == nil && r.HolderIdentity == l.Identity() {
		l.acquired.Store(true)
	}
	return err
}
