package auth

import (
	"cmp"
	"context"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"
)

// Defaults of RefusalLog.
const (
	DefaultRefusalInterval = 10 * time.Second
	DefaultRefusalBurst    = 5
	refusalSources         = 1000 // sources counted per interval; beyond, "other"
)

// RefusalLog logs refused calls without letting a flood of them flood the
// log or slow the server: in each Interval the first Burst refusals are
// logged one line each (WARN, with their attributes), the others are only
// counted, and one summary line per interval gives their number and the
// sources that sent the most. A flood of N refused calls therefore writes at
// most Burst+1 lines per Interval, whatever N. The zero value is usable (it
// discards: set Logger).
type RefusalLog struct {
	// Logger (discard if nil).
	Logger *slog.Logger
	// Interval of the summaries (DefaultRefusalInterval if zero).
	Interval time.Duration
	// Burst is how many refusals per interval are logged in full
	// (DefaultRefusalBurst if zero; negative: none).
	Burst int
	// Now is the clock (time.Now if nil).
	Now func() time.Time

	mu         sync.Mutex // guards the fields below
	start      time.Time  // of the current interval; zero before the first refusal
	logged     int        // refusals logged in full in this interval
	suppressed int        // refusals only counted in this interval
	bySource   map[string]int
	total      int64 // refusals since creation
}

func (r *RefusalLog) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func (r *RefusalLog) interval() time.Duration {
	if r.Interval > 0 {
		return r.Interval
	}
	return DefaultRefusalInterval
}

func (r *RefusalLog) log() *slog.Logger {
	if r != nil && r.Logger != nil {
		return r.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// Refuse records one refused call from source (an IP address or a
// caller's name) and logs msg with attrs if this interval's burst allows.
// A nil RefusalLog discards.
func (r *RefusalLog) Refuse(msg, source string, attrs ...any) {
	if r == nil {
		return
	}
	now := r.now()
	r.mu.Lock()
	r.total++
	r.rollLocked(now)
	burst := r.Burst
	if burst == 0 {
		burst = DefaultRefusalBurst
	}
	full := r.logged < burst
	if full {
		r.logged++
	} else {
		r.suppressed++
		if r.bySource == nil {
			r.bySource = map[string]int{}
		}
		if _, ok := r.bySource[source]; !ok && len(r.bySource) >= refusalSources {
			source = "other"
		}
		r.bySource[source]++
	}
	r.mu.Unlock()
	if full {
		r.log().Warn(msg, append([]any{"source", source}, attrs...)...)
	}
}

// Total returns the number of refusals recorded.
func (r *RefusalLog) Total() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}

// rollLocked ends the current interval if now is past it, writing its
// summary. r.mu is held.
func (r *RefusalLog) rollLocked(now time.Time) {
	if !r.start.IsZero() && now.Sub(r.start) < r.interval() {
		return
	}
	r.summaryLocked()
	r.start, r.logged, r.suppressed, r.bySource = now, 0, 0, nil
}

func (r *RefusalLog) summaryLocked() {
	if r.suppressed == 0 {
		return
	}
	top := slices.SortedFunc(maps.Keys(r.bySource), func(a, b string) int {
		return cmp.Or(cmp.Compare(r.bySource[b], r.bySource[a]), cmp.Compare(a, b))
	})
	if len(top) > 5 {
		top = top[:5]
	}
	srcs := make([]any, 0, len(top))
	for _, s := range top {
		srcs = append(srcs, slog.Int(s, r.bySource[s]))
	}
	r.log().Warn("calls refused (not logged one by one)", "count", r.suppressed, "since", r.start,
		"sources", len(r.bySource), slog.Group("top", srcs...))
}

// Flush writes the current interval's summary now and starts a new
// interval.
func (r *RefusalLog) Flush() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.summaryLocked()
	r.start, r.logged, r.suppressed, r.bySource = time.Time{}, 0, 0, nil
}

// Start writes each interval's summary when the interval ends (rather than
// with the next refusal) until ctx ends, then flushes.
func (r *RefusalLog) Start(ctx context.Context) error {
	t := time.NewTicker(r.interval())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			r.Flush()
			return nil
		case <-t.C:
			r.mu.Lock()
			if !r.start.IsZero() {
				r.rollLocked(r.now())
			}
			r.mu.Unlock()
		}
	}
}
