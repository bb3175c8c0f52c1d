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
	ready    bool                                       // the first full state is in; until then watches wait
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

// subState is one stream's subscription to one type. A wildcard stream
// keeps the versions it was sent only until its first response: from then on
// it is "in sync at rev" and what to send next is exactly what changed since
// rev (the type's log), so the per-stream state of 100 streams of 100k
// resources is a few words each, not 100 maps of 100k entries.
type subState struct {
	known    map[string]string // name -> version sent; nil for a wildcard stream in sync
	rev      uint64            // the stream has every change up to rev (when known is nil)
	returned map[string]string // handed to the server as the "returned resources" (see GetNextVersionMap)
}

type deltaWatch struct {
	force   bool // answer even if there is nothing to send (a first request)
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
		logLimit: 1 << 18, // trimmed to half when full
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
	if len(changed) == 0 || !c.ready {
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

// respond computes w's response and sends it if there is anything to send
// or force is set; it reports whether it sent. names are the names changed
// since the stream's revision; nil means compare everything with st.known.
func (c *deltaCache) respond(w *deltaWatch, t *typeState, names []string, force bool) bool {
	st := w.st
	wildcard := w.sub.IsWildcard()
	subscribed := w.sub.SubscribedResources()
	var out []*discovery.Resource
	var removed []string
	upsert := func(name string, e *entry) {
		out = append(out, &discovery.Resource{Name: name, Version: e.version, Resource: e.res})
	}
	switch {
	case st.known == nil:
		// In sync at st.rev: send what changed since. A removal of a name the
		// client never had is harmless in Delta xDS.
		seen := make(map[string]bool, len(names))
		for _, name := range names {
			if seen[name] {
				continue
			}
			seen[name] = true
			if e := t.entries[name]; e != nil {
				upsert(name, e)
			} else {
				removed = append(removed, name)
			}
		}
	default:
		// Compare with what the client holds (its initial versions, or for a
		// named subscription what it was sent).
		inScope := func(name string) bool {
			_, ok := subscribed[name]
			return wildcard || ok
		}
		for name, e := range t.entries {
			if v, ok := st.known[name]; inScope(name) && (!ok || v != e.version) {
				upsert(name, e)
			}
		}
		for name := range st.known {
			if t.entries[name] == nil && inScope(name) {
				removed = append(removed, name)
			}
		}
		if wildcard {
			st.known = nil // read-only above: it may be the request's map
		} else {
			for name := range st.known {
				if t.entries[name] == nil || !inScope(name) {
					delete(st.known, name)
				}
			}
			for _, r := range out {
				st.known[r.Name] = r.Version
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
		versions: st.returned,
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
	if st == nil || (st.known == nil && !sub.IsWildcard()) {
		// What the client holds: its initial_resource_versions. A wildcard
		// stream only reads it, once; a named one keeps a copy it updates.
		known := sub.ReturnedResources()
		if !sub.IsWildcard() || known == nil {
			known = make(map[string]string, len(sub.ReturnedResources()))
			for k, v := range sub.ReturnedResources() {
				known[k] = v
			}
		}
		st = &subState{known: known, returned: map[string]string{}}
		if ok {
			c.streams[id][url] = st
		}
	}
	t := c.typ(url)
	w := &deltaWatch{typeURL: url, req: req, sub: sub, ch: ch, st: st}
	w.force = sub.IsWildcard() && req.GetResponseNonce() == "" // the first wildcard request is always answered
	if !c.ready {
		// No state yet: a client must not take an empty answer for the mesh.
		c.watches[w] = struct{}{}
		return c.cancelFunc(w), nil
	}
	sent, err := c.answer(w, t)
	if err != nil || sent {
		return nil, err
	}
	c.watches[w] = struct{}{}
	return c.cancelFunc(w), nil
}

func (c *deltaCache) cancelFunc(w *deltaWatch) func() {
	return func() {
		c.mu.Lock()
		delete(c.watches, w)
		c.mu.Unlock()
	}
}

// SetReady marks the first full state as in and answers the waiting watches.
func (c *deltaCache) SetReady() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ready {
		return
	}
	c.ready = true
	for w := range c.watches {
		// Watches created before the first state are first requests: they
		// compare in full and cannot fall behind.
		if sent, _ := c.answer(w, c.typ(w.typeURL)); sent {
			delete(c.watches, w)
		}
	}
}

// answer responds to a new watch with what its stream lacks; it reports
// whether it sent.
func (c *deltaCache) answer(w *deltaWatch, t *typeState) (bool, error) {
	st := w.st
	var names []string
	if st.known == nil {
		if st.rev < t.logStart {
			return false, errFellBehind
		}
		names = []string{}
		for i := len(t.log) - 1; i >= 0 && t.log[i].rev > st.rev; i-- {
			names = append(names, t.log[i].name)
		}
	}
	return c.respond(w, t, names, w.force), nil
}

// errFellBehind ends a stream that missed changes the log no longer holds
// (it was not reading for a long time): the client reconnects presenting the
// versions it holds and gets an exact difference.
var errFellBehind = errors.New("client fell behind the change log; reconnect")

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
	for req, sid := range c.pending { // a request the server refused before watching
		if sid == id {
			delete(c.pending, req)
		}
	}
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

// GetNextVersionMap returns a placeholder map: the cache keeps each
// stream's state itself (subState) and the server only stores this map and
// hands it back as Subscription.ReturnedResources, which the cache reads only
// when a stream's subscription starts.
func (r *deltaResponse) GetNextVersionMap() map[string]string    { return r.versions }
func (r *deltaResponse) GetReturnedResources() map[string]string { return r.versions }
func (r *deltaResponse) GetContext() context.Context             { return context.Background() }
