package xds

import (
	"context"
	"errors"
	"hash/fnv"
	"strconv"
	"sync"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// deltaCache is a go-control-plane cache (cache.Cache) for Delta xDS only,
// built for many identical wildcard subscribers of a large resource set.
//
// go-control-plane's LinearCache recomputes every watch's difference against
// the whole resource set on each update and on each ACK (O(resources) per
// stream per push: about a second for 100 streams of 100k resources). This
// cache keeps, per stream and type, what it has sent (the resource versions)
// and the cache revision it is up to date with, and a per-type log of which
// names changed at which revision: a push costs O(changed resources) per
// stream, and re-arming a watch after an ACK costs nothing when nothing
// changed in between. A stream that falls behind the log, or that connects
// with initial_resource_versions, is compared in full once.
//
// It learns which stream a request belongs to from the server callbacks
// (OnStreamDeltaRequest runs just before CreateDeltaWatch for the same
// request), and forgets the stream in OnDeltaStreamClosed.
//
// The version of a resource is a hash of its serialized bytes, so a
// reconnecting client that presents the versions it holds receives only what
// changed while it was away.
type deltaCache struct {
	mu       sync.Mutex                                 // guards everything below
	rev      uint64                                     // bumped on every change
	types    map[string]*typeState                      // by type URL
	streams  map[int64]map[string]*subState             // stream -> type -> state
	pending  map[*discovery.DeltaDiscoveryRequest]int64 // request -> stream, between the callback and CreateDeltaWatch
	watches  map[*deltaWatch]struct{}                   // open watches
	logLimit int                                        // entries kept per type log
	ctx      context.Context                            // the server's, for responses
}

type entry struct {
	res     *anypb.Any
	version string
}

type change struct {
	rev  uint64
	name string
}

type typeState struct {
	entries  map[string]*entry
	log      []change // ascending rev
	logStart uint64   // changes at or before this revision may be missing from log
}

// subState is one stream's subscription to one type.
type subState struct {
	known map[string]string // what the client was sent: name -> version
	rev   uint64            // known reflects every change up to rev; 0: compare in full
}

type deltaWatch struct {
	typeURL string
	req     *discovery.DeltaDiscoveryRequest
	sub     cache.Subscription
	ch      chan cache.DeltaResponse
	st      *subState
}

var errSotW = errors.New("state-of-the-world xDS is not served; use Delta xDS")

func newDeltaCache(ctx context.Context) *deltaCache {
	return &deltaCache{
		ctx:      ctx,
		types:    map[string]*typeState{},
		streams:  map[int64]map[string]*subState{},
		pending:  map[*discovery.DeltaDiscoveryRequest]int64{},
		watches:  map[*deltaWatch]struct{}{},
		logLimit: 1 << 18,
	}
}

func (c *deltaCache) typ(url string) *typeState {
	t := c.types[url]
	if t == nil {
		t = &typeState{entries: map[string]*entry{}}
		c.types[url] = t
	}
	return t
}

func version(b []byte) string {
	h := fnv.New64a()
	h.Write(b)
	return strconv.FormatUint(h.Sum64(), 36)
}

// Update sets and removes resources of one type and notifies the watches it
// concerns. Setting a resource to bytes it already has is not a change.
func (c *deltaCache) Update(typeURL string, set map[string]*anypb.Any, remove []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.typ(typeURL)
	c.rev++
	var changed []string
	for name, res := range set {
		v := version(res.GetValue())
		if e := t.entries[name]; e != nil && e.version == v {
			continue
		}
		t.entries[name] = &entry{res: res, version: v}
		changed = append(changed, name)
	}
	for _, name := range remove {
		if _, ok := t.entries[name]; ok {
			delete(t.entries, name)
			changed = append(changed, name)
		}
	}
	for _, name := range changed {
		t.log = append(t.log, change{c.rev, name})
	}
	if len(t.log) > c.logLimit {
		drop := len(t.log) - c.logLimit/2
		t.logStart = t.log[drop-1].rev
		t.log = append([]change(nil), t.log[drop:]...)
	}
	if len(changed) == 0 {
		return
	}
	for w := range c.watches {
		if w.typeURL != typeURL {
			continue
		}
		if c.respond(w, t, changed, false) {
			delete(c.watches, w)
		}
	}
}

// respond computes w's response from the names given (all of the type when
// names is nil) and sends it if there is anything to send or force is set.
// It reports whether it sent.
func (c *deltaCache) respond(w *deltaWatch, t *typeState, names []string, force bool) bool {
	st := w.st
	wildcard := w.sub.IsWildcard()
	subscribed := w.sub.SubscribedResources()
	var out []*discovery.Resource
	var removed []string
	consider := func(name string) {
		if !wildcard {
			if _, ok := subscribed[name]; !ok {
				return
			}
		}
		e := t.entries[name]
		known, isKnown := st.known[name]
		switch {
		case e == nil && isKnown:
			removed = append(removed, name)
			delete(st.known, name)
		case e != nil && (!isKnown || known != e.version):
			out = append(out, &discovery.Resource{Name: name, Version: e.version, Resource: e.res})
			st.known[name] = e.version
		}
	}
	if names == nil {
		for name := range t.entries {
			consider(name)
		}
		for name := range st.known {
			if t.entries[name] == nil {
				consider(name)
			}
		}
		if !wildcard {
			for name := range st.known {
				if _, ok := subscribed[name]; !ok {
					delete(st.known, name) // unsubscribed: resend if subscribed again
				}
			}
		}
	} else {
		seen := make(map[string]bool, len(names))
		for _, name := range names {
			if !seen[name] {
				seen[name] = true
				consider(name)
			}
		}
	}
	st.rev = c.rev
	if len(out) == 0 && len(removed) == 0 && !force {
		return false
	}
	w.ch <- &deltaResponse{
		req: w.req,
		resp: &discovery.DeltaDiscoveryResponse{
			SystemVersionInfo: strconv.FormatUint(c.rev, 10),
			TypeUrl:           w.typeURL,
			Resources:         out,
			RemovedResources:  removed,
		},
		versions: st.known,
		ctx:      c.ctx,
	}
	return true
}

// CreateDeltaWatch implements cache.ConfigWatcher.
func (c *deltaCache) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) (func(), error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	url := req.GetTypeUrl()
	id, ok := c.pending[req]
	delete(c.pending, req)
	var st *subState
	if ok {
		if c.streams[id] == nil {
			c.streams[id] = map[string]*subState{}
		}
		st = c.streams[id][url]
	}
	if st == nil {
		known := make(map[string]string, len(sub.ReturnedResources()))
		for k, v := range sub.ReturnedResources() {
			known[k] = v
		}
		st = &subState{known: known}
		if ok {
			c.streams[id][url] = st
		}
	}
	t := c.typ(url)
	w := &deltaWatch{typeURL: url, req: req, sub: sub, ch: ch, st: st}
	force := sub.IsWildcard() && req.GetResponseNonce() == "" // the first wildcard request is always answered
	var names []string
	if st.rev != 0 && st.rev >= t.logStart && sub.IsWildcard() && len(req.GetResourceNamesSubscribe())+len(req.GetResourceNamesUnsubscribe()) == 0 {
		names = []string{}
		for i := len(t.log) - 1; i >= 0 && t.log[i].rev > st.rev; i-- {
			names = append(names, t.log[i].name)
		}
	}
	if c.respond(w, t, names, force) {
		return nil, nil
	}
	c.watches[w] = struct{}{}
	return func() {
		c.mu.Lock()
		delete(c.watches, w)
		c.mu.Unlock()
	}, nil
}

// requestOnStream records which stream req came on (from the callbacks).
func (c *deltaCache) requestOnStream(id int64, req *discovery.DeltaDiscoveryRequest) {
	c.mu.Lock()
	c.pending[req] = id
	c.mu.Unlock()
}

// streamClosed forgets a stream.
func (c *deltaCache) streamClosed(id int64) {
	c.mu.Lock()
	delete(c.streams, id)
	c.mu.Unlock()
}

// CreateWatch implements cache.ConfigWatcher; SotW is not served.
func (c *deltaCache) CreateWatch(*cache.Request, cache.Subscription, chan cache.Response) (func(), error) {
	return nil, errSotW
}

// Fetch implements cache.ConfigFetcher; REST is not served.
func (c *deltaCache) Fetch(context.Context, *cache.Request) (cache.Response, error) {
	return nil, errSotW
}

// Resources returns the number of resources per type (for status).
func (c *deltaCache) Resources() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]int{}
	for url, t := range c.types {
		out[url] = len(t.entries)
	}
	return out
}

// deltaResponse implements cache.DeltaResponse.
type deltaResponse struct {
	req      *discovery.DeltaDiscoveryRequest
	resp     *discovery.DeltaDiscoveryResponse
	versions map[string]string
	ctx      context.Context
}

func (r *deltaResponse) GetDeltaDiscoveryResponse() (*discovery.DeltaDiscoveryResponse, error) {
	return r.resp, nil
}
func (r *deltaResponse) GetDeltaRequest() *discovery.DeltaDiscoveryRequest { return r.req }
func (r *deltaResponse) GetSystemVersion() (string, error)                 { return r.resp.SystemVersionInfo, nil }
func (r *deltaResponse) GetResponseVersion() string                        { return r.resp.SystemVersionInfo }

// GetNextVersionMap returns the stream's known-versions map, which the cache
// owns and updates in place under its lock (the server only stores it and
// hands it back as Subscription.ReturnedResources).
func (r *deltaResponse) GetNextVersionMap() map[string]string    { return r.versions }
func (r *deltaResponse) GetReturnedResources() map[string]string { return r.versions }
func (r *deltaResponse) GetContext() context.Context             { return context.Background() }
