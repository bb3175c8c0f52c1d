package server

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/ambit-mesh/ambit/istiod-lite/ca"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
	"github.com/ambit-mesh/ambit/istiod-lite/leader"
	"github.com/ambit-mesh/ambit/istiod-lite/status"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

// controllers are the cluster-mode parts that write to the API server: the
// waypoint deployer and the status writer. They run on one replica at a
// time, the holder of the Lease (unless election is disabled: then on this
// one, which must be the only one).
type controllers struct {
	deployer *deployer.Controller
	status   *status.Writer
	routes   *attachedRoutes
	elector  *leader.Elector // nil without leader election
}

func newControllers(cfg *Config, cs kubernetes.Interface, gw gwclient.Interface, dyn dynamic.Interface, opts translate.Options, log *slog.Logger) *controllers {
	routes := &attachedRoutes{}
	c := &controllers{routes: routes}
	c.deployer = deployer.New(deployer.Config{
		Kube: cs, Gateway: gw,
		Image:         cfg.WaypointImage,
		XDSAddress:    cfg.WaypointXDSAddress,
		RootNamespace: cfg.CASecretNamespace, // where ca.PublishBundle puts the roots
		RootConfigMap: ca.DefaultBundleConfigMap,
		TrustDomain:   cfg.TrustDomain,
		ClusterDomain: cfg.DomainSuffix,
		// SPIRE signs for proxies: waypoints read the node agent's socket.
		SPIRESocketDir: spireSocketDir(cfg.ProxyIdentity),
		// Counted from the published model (Requeue on change, below).
		AttachedRoutes: routes.count,
		Logger:         log,
	})
	c.status = status.New(status.Config{Kube: cs, Gateway: gw, Dynamic: dyn, Options: opts, Logger: log.With("component", "status")})
	if !cfg.DisableLeaderElection {
		id := cfg.LeaderIdentity
		if id == "" {
			id = defaultIdentity()
		}
		c.elector = &leader.Elector{
			Client: cs, Run: c.run, Identity: id,
			// the pod's namespace (downward API), else leader's default
			Namespace:     os.Getenv("POD_NAMESPACE"),
			LeaseDuration: cfg.LeaseDuration, RenewDeadline: cfg.RenewDeadline, RetryPeriod: cfg.RetryPeriod,
			Logger: log.With("component", "leader"),
		}
	}
	return c
}

// defaultIdentity is this replica's name in the Lease: the pod's name
// (POD_NAME, from the downward API), else the host name (a pod's), else
// empty (leader's default: host name and a random suffix).
func defaultIdentity() string {
	if n := os.Getenv("POD_NAME"); n != "" {
		return n
	}
	h, _ := os.Hostname()
	return h
}

// Start runs the controllers, under election if enabled, once the store has
// its first model (so that the first Gateway statuses count routes), and
// keeps the attached-route counts in step with the model until ctx ends.
func (c *controllers) Start(ctx context.Context, store *model.Store, synced <-chan struct{}) error {
	changed := store.Changed() // before the first count: no change is missed
	select {
	case <-ctx.Done():
		return nil
	case <-synced:
	}
	c.routes.update(store.Load())
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-changed:
			}
			for _, k := range c.routes.update(store.Load()) {
				c.deployer.Requeue(k.Namespace, k.Name)
			}
		}
	})
	g.Go(func() error {
		if c.elector == nil {
			return c.run(ctx)
		}
		return c.elector.Start(ctx)
	})
	return g.Wait()
}

// run is one term: the deployer and the status writer until ctx ends (or
// one fails, which ends the term and istiod-lite).
func (c *controllers) run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := c.deployer.Start(ctx); err != nil {
			return fmt.Errorf("deployer: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		if err := c.status.Start(ctx); err != nil {
			return fmt.Errorf("status: %w", err)
		}
		return nil
	})
	return g.Wait()
}

// Leading reports whether this replica runs the controllers now.
func (c *controllers) Leading() bool { return c.elector == nil || c.elector.Leading() }

// attachedRoutes counts, per waypoint, the HTTPRoutes and GRPCRoutes
// attached to it in the model: a route with an accepted parent that is a
// Service bound to the waypoint, or the waypoint's Gateway itself. A route
// counts once per waypoint, however many of its parents lead there.
type attachedRoutes struct {
	mu     sync.Mutex    // guards counts
	counts map[key]int32 // by waypoint
}

type key struct{ Namespace, Name string }

func (a *attachedRoutes) count(namespace, name string) int32 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.counts[key{namespace, name}]
}

// update recounts from s and returns the waypoints whose count changed.
func (a *attachedRoutes) update(s *model.Snapshot) []key {
	counts := countAttached(s)
	a.mu.Lock()
	defer a.mu.Unlock()
	var changed []key
	for k, n := range counts {
		if a.counts[k] != n {
			changed = append(changed, k)
		}
	}
	for k := range a.counts {
		if _, ok := counts[k]; !ok {
			changed = append(changed, k)
		}
	}
	a.counts = counts
	return changed
}

func countAttached(s *model.Snapshot) map[key]int32 {
	bound := make(map[key]key) // Service -> its waypoint
	for _, v := range s.Services {
		if v.Waypoint != nil {
			bound[key{v.Namespace, v.Name}] = key{v.Waypoint.Namespace, v.Waypoint.Name}
		}
	}
	counts := map[key]int32{}
	to := map[key]bool{} // one route's waypoints
	for _, routes := range []map[string]*model.HTTPRoute{s.HTTPRoutes, s.GRPCRoutes} {
		for _, r := range routes {
			clear(to)
			for i := range r.Parents {
				p := &r.Parents[i]
				if !p.Accepted() {
					continue
				}
				switch p.Kind {
				case "Service":
					if wp, ok := bound[key{p.Namespace, p.Name}]; ok {
						to[wp] = true
					}
				case "Gateway":
					if _, ok := s.Waypoints[p.Namespace+"/"+p.Name]; ok {
						to[key{p.Namespace, p.Name}] = true
					}
				}
			}
			for wp := range to {
				counts[wp]++
			}
		}
	}
	return counts
}

// spireSocketDir is where waypoints find the SPIRE agent's Workload API
// socket when SPIRE signs for proxies (docs/spire.md), else "".
func spireSocketDir(proxyIdentity string) string {
	if proxyIdentity == "spire" {
		return "/run/spire/sockets"
	}
	return ""
}
