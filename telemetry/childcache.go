package telemetry

import "sync"

// ChildCache maps what a label set derives from (K) to the metric children
// of that label set (V), so a connection or request hashes its labels once
// (a Go map lookup) instead of once per WithLabelValues. It is bounded:
// label sets are bounded by the mesh's config and Claims, so a full cache
// is cleared (the vectors keep their children) and only means churn. The
// zero value is ready to use.
type ChildCache[K comparable, V any] struct {
	mu sync.Mutex // guards m
	m  map[K]V
}

// MaxChildren bounds a ChildCache.
const MaxChildren = 4096

// Get returns k's children, made by mk (outside the lock) the first time.
func (c *ChildCache[K, V]) Get(k K, mk func() V) V {
	c.mu.Lock()
	v, ok := c.m[k]
	c.mu.Unlock()
	if ok {
		return v
	}
	v = mk()
	c.mu.Lock()
	if c.m == nil || len(c.m) >= MaxChildren {
		c.m = make(map[K]V)
	}
	c.m[k] = v
	c.mu.Unlock()
	return v
}

// Len is the number of label sets cached.
func (c *ChildCache[K, V]) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
