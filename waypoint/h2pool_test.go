package waypoint

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// h2Options sets explicit HTTP/2 with max_concurrent_streams and
// max_requests_per_connection (0: unset).
func h2Options(maxStreams, maxReqPerConn uint32) func(*clusterv3.Cluster) {
	return func(c *clusterv3.Cluster) {
		o := &upstreamhttpv3.HttpProtocolOptions{UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}}}}
		if maxStreams > 0 {
			o.GetExplicitHttpConfig().GetHttp2ProtocolOptions().MaxConcurrentStreams = wrapperspb.UInt32(maxStreams)
		}
		if maxReqPerConn > 0 {
			o.CommonHttpProtocolOptions = &corev3.HttpProtocolOptions{MaxRequestsPerConnection: wrapperspb.UInt32(maxReqPerConn)}
		}
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: mustAny(o)}
	}
}

// connBackend is an h2c backend that counts, per connection (its remote
// address), the requests it served, the most it had in flight at once,
// and the connections that closed. Requests to /hold wait for release.
type connBackend struct {
	*backend
	mu      sync.Mutex // guards the maps and closed
	served  map[string]int
	inFly   map[string]int
	peak    map[string]int
	closed  int
	held    chan struct{} // a /hold request arrived
	release chan struct{}
}

func newConnBackend(t *testing.T) *connBackend {
	cb := &connBackend{served: map[string]int{}, inFly: map[string]int{}, peak: map[string]int{},
		held: make(chan struct{}, 100), release: make(chan struct{})}
	s := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cb.mu.Lock()
		cb.served[r.RemoteAddr]++
		cb.inFly[r.RemoteAddr]++
		cb.peak[r.RemoteAddr] = max(cb.peak[r.RemoteAddr], cb.inFly[r.RemoteAddr])
		cb.mu.Unlock()
		if r.URL.Path == "/hold" {
			cb.held <- struct{}{}
			<-cb.release
		}
		cb.mu.Lock()
		cb.inFly[r.RemoteAddr]--
		cb.mu.Unlock()
		io.WriteString(w, "ok")
	}))
	s.Config.Protocols = new(http.Protocols)
	s.Config.Protocols.SetUnencryptedHTTP2(true)
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateClosed {
			cb.mu.Lock()
			cb.closed++
			cb.mu.Unlock()
		}
	}
	s.Start()
	t.Cleanup(s.Close)
	cb.backend = &backend{Server: s, addr: netip.MustParseAddrPort(strings.TrimPrefix(s.URL, "http://"))}
	return cb
}

func (cb *connBackend) snapshot() (served, peak map[string]int, closed int) {
	cb.mu.Lock()
	defer cb.mu.Unlock()
	served, peak = map[string]int{}, map[string]int{}
	for k, v := range cb.served {
		served[k] = v
	}
	for k, v := range cb.peak {
		peak[k] = v
	}
	return served, peak, cb.closed
}

// TestH2MaxConcurrentStreams: with max_concurrent_streams 2, five requests
// in flight at once to one HTTP/2 endpoint go over three connections, none
// carrying more than two at a time; once done, later requests reuse them.
func TestH2MaxConcurrentStreams(t *testing.T) {
	e := newEnv(t, nil)
	cb := newConnBackend(t)
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: cb.addr}}}, h2Options(2, 0))...)
	c := e.client(e.cliID, target, true)
	const n = 5
	errs := make(chan error, n)
	for range n {
		go func() {
			code, body, _ := get(t, c, "http://"+svc+"/hold")
			if code != 200 || body != "ok" {
				errs <- fmt.Errorf("%d %q", code, body)
				return
			}
			errs <- nil
		}()
	}
	for range n {
		select {
		case <-cb.held:
		case <-time.After(5 * time.Second):
			served, _, _ := cb.snapshot()
			t.Fatalf("not all %d requests reached the backend: %v", n, served)
		}
	}
	served, peak, _ := cb.snapshot()
	close(cb.release)
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if len(served) != 3 {
		t.Errorf("%d requests in flight went over %d connections %v, want 3", n, len(served), served)
	}
	for conn, p := range peak {
		if p > 2 {
			t.Errorf("connection %s carried %d streams at once, over max_concurrent_streams 2", conn, p)
		}
	}
	for range 4 {
		if code, _, _ := get(t, c, "http://"+svc+"/"); code != 200 {
			t.Fatal(code)
		}
	}
	if after, _, _ := cb.snapshot(); len(after) != 3 {
		t.Errorf("sequential requests opened connections: %v", after)
	}
}

// TestH2MaxRequestsPerConnection: with max_requests_per_connection 3, seven
// sequential HTTP/2 requests go over three connections (3, 3, 1), and the
// two used up are closed.
func TestH2MaxRequestsPerConnection(t *testing.T) {
	e := newEnv(t, nil)
	cb := newConnBackend(t)
	cl := clusterName(svc)
	e.apply(simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl)}, map[string][]ep{cl: {{addr: cb.addr}}}, h2Options(0, 3))...)
	c := e.client(e.cliID, target, true)
	for range 7 {
		if code, _, _ := get(t, c, "http://"+svc+"/"); code != 200 {
			t.Fatal(code)
		}
	}
	served, _, _ := cb.snapshot()
	var counts []int
	for _, v := range served {
		counts = append(counts, v)
	}
	if len(served) != 3 || fmt.Sprint(sortedInts(counts)) != "[1 3 3]" {
		t.Errorf("requests per connection %v, want 3, 3 and 1", served)
	}
	eventually(t, 5*time.Second, func() bool { _, _, closed := cb.snapshot(); return closed >= 2 }, "the used-up connections were not closed")
}

func sortedInts(v []int) []int {
	for i := range v {
		for j := i + 1; j < len(v); j++ {
			if v[j] < v[i] {
				v[i], v[j] = v[j], v[i]
			}
		}
	}
	return v
}
