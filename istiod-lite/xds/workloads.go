package xds

import (
	"context"
	"log/slog"
	"time"

	"github.com/ambit-mesh/ambit/model"
)

// workloadGen is the generator for node proxies: it turns each change of
// the store into ambit.workload.v1 resources (MakeDeltaResources, or
// MakeResources against the last pushed snapshot when the store's log does
// not reach back) and pushes them into the wildcard deltaCache that every
// node proxy's stream reads.
type workloadGen struct {
	store *model.Store
	log   *slog.Logger
	cache *deltaCache
	clock *pushClock // times the pushes (pilot_xds_push_time, pilot_proxy_convergence_time)

	// pushed, when set, is called after each push with its duration and size
	// (for benchmarks and metrics). Set before Start.
	pushed func(d time.Duration, resources int)
}

// Start pushes every change of the store to the cache (and so to the
// clients) until ctx ends. A snapshot that fails its consistency check is not
// pushed; the clients keep the last pushed state until a good one arrives.
func (g *workloadGen) Start(ctx context.Context) error {
	changed := g.store.Changed()
	pushed := model.NewSnapshot(nil, nil, nil, nil) // version 0 of a store is empty
	var pushedVersion uint64
	push := func() {
		start := time.Now()
		ds, cur, version, ok := g.store.Since(pushedVersion)
		var r *Resources
		var err error
		if ok {
			r, err = MakeDeltaResources(ds, cur)
		} else {
			r, err = MakeResources(pushed, cur)
		}
		if err == nil {
			err = Consistent(r, cur)
		}
		if err != nil {
			g.log.Error("not pushing an inconsistent model; clients keep the last one", "error", err)
			return
		}
		var types []string
		for _, t := range typeOrder {
			if len(r.Set[t])+len(r.Remove[t]) > 0 {
				types = append(types, t)
			}
		}
		if len(types) > 0 { // ds is nil when !ok: what changed is not known
			g.clock.workloadPush(g.cache.revision(), start, g.clock.changedAfter(pushedVersion, version), types, ds)
		}
		for _, t := range typeOrder {
			if len(r.Set[t])+len(r.Remove[t]) > 0 {
				g.cache.Update(t, r.Set[t], r.Remove[t])
			}
		}
		pushed, pushedVersion = cur, version
		g.cache.SetReady()
		if n := r.Count(); n > 0 {
			logResources(g.log, r, "pushed")
			if g.pushed != nil {
				g.pushed(time.Since(start), n)
			}
		}
	}
	push()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			push()
		}
	}
}
