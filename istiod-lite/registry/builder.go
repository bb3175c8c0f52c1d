// Package registry builds ambit's model from a source of objects and keeps it
// current in a *model.Store: Kubernetes through client-go informers
// (Kubernetes), or a directory of the same objects as YAML (Files), for local
// mode and for plain hosts and VMs. Both feed one builder that translates
// (istiod-lite/translate) incrementally and reports the objects it rejects.
package registry

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

// Reporter is told about the objects translation rejected or changed.
type Reporter interface {
	Report(p translate.Problem)
}

// LogReporter logs problems (local mode).
type LogReporter struct{ Logger *slog.Logger }

// Report implements Reporter.
func (r LogReporter) Report(p translate.Problem) {
	if r.Logger != nil {
		r.Logger.Warn("object not translated as written", "kind", p.Kind, "namespace", p.Namespace, "name", p.Name, "reason", p.Reason, "message", p.Message)
	}
}

// builder holds the object set, collects changes from event handlers, and
// turns them into model updates in its run loop.
type builder struct {
	store  *model.Store
	opts   translate.Options
	log    *slog.Logger
	report Reporter

	mu        sync.Mutex         // guards objs and pending
	objs      *translate.Objects // the source's current objects
	pending   translate.Changes  // changes since the last translation
	published chan struct{}      // closed after the first model is published (may be nil)
	kick      chan struct{}      // 1-buffered: there are pending changes

	reported map[translate.Problem]time.Time // run loop only: when each problem was last reported

	// built, when set, is called after each translation with its duration
	// and the size of the delta (benchmarks).
	built func(full bool, d time.Duration, changes int)
}

func newBuilder(store *model.Store, opts translate.Options, log *slog.Logger, r Reporter) *builder {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if r == nil {
		r = LogReporter{Logger: log}
	}
	return &builder{store: store, opts: opts, log: log, report: r, objs: translate.NewObjects(), kick: make(chan struct{}, 1), reported: map[translate.Problem]time.Time{}}
}

func (b *builder) signal() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// set records an added or updated object.
func (b *builder) set(obj any) {
	b.mu.Lock()
	b.pending.Merge(b.objs.Set(obj))
	b.mu.Unlock()
	b.signal()
}

// del records a deleted object.
func (b *builder) del(obj any, key string) {
	b.mu.Lock()
	b.pending.Merge(b.objs.Delete(obj, key))
	b.mu.Unlock()
	b.signal()
}

// replace swaps the whole object set (a reloaded directory).
func (b *builder) replace(objs []any) {
	o := translate.NewObjects()
	for _, obj := range objs {
		o.Set(obj)
	}
	b.mu.Lock()
	b.objs = o
	b.pending = translate.Changes{Full: true}
	b.mu.Unlock()
	b.signal()
}

// run translates pending changes until ctx ends. Nothing is published before
// ready is closed (the sources have synced): the first translation is a full
// build of the synced objects.
func (b *builder) run(ctx context.Context, ready <-chan struct{}) {
	select {
	case <-ctx.Done():
		return
	case <-ready:
	}
	first := true
	for {
		b.mu.Lock()
		ch := b.pending
		b.pending = translate.Changes{}
		start := time.Now()
		var d *model.Delta
		var problems []translate.Problem
		if first {
			r := translate.Build(b.objs, b.opts)
			d, problems = translate.Diff(b.store.Load(), r.Snapshot), r.Problems
			ch.Full = true
		} else if !ch.Empty() {
			d, problems = translate.Update(b.objs, b.store.Load(), ch, b.opts)
		}
		b.mu.Unlock()
		if d != nil {
			b.store.Apply(d)
			n := d.Len()
			if first || n > 0 {
				b.log.Info("model updated", "full", ch.Full, "changed", n, "took", time.Since(start).Round(time.Microsecond),
					"workloads", len(b.store.Load().Workloads), "services", len(b.store.Load().Services))
			}
			if b.built != nil {
				b.built(ch.Full, time.Since(start), n)
			}
		}
		b.reportAll(problems)
		if first && b.published != nil {
			close(b.published)
		}
		first = false
		select {
		case <-ctx.Done():
			return
		case <-b.kick:
		}
	}
}

// reportAll reports problems, each at most once an hour while it persists.
func (b *builder) reportAll(ps []translate.Problem) {
	now := time.Now()
	for _, p := range ps {
		if t, ok := b.reported[p]; ok && now.Sub(t) < time.Hour {
			continue
		}
		b.reported[p] = now
		b.report.Report(p)
	}
	if len(b.reported) > 10000 {
		for p, t := range b.reported {
			if now.Sub(t) >= time.Hour {
				delete(b.reported, p)
			}
		}
	}
}

// lookup runs f with the object set locked (for reporters that need an
// object's UID).
func (b *builder) lookup(f func(o *translate.Objects)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f(b.objs)
}
