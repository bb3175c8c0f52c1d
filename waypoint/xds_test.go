package waypoint

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	delta "github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/ambit-mesh/ambit/xdsclient"
)

type adsServer struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	d delta.Server
}

func (a adsServer) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	return a.d.DeltaStreamHandler(st, "")
}

// nackRecorder remembers NACK details.
type nackRecorder struct {
	mu    sync.Mutex
	nacks []string
}

func (*nackRecorder) OnDeltaStreamOpen(context.Context, int64, string) error { return nil }
func (*nackRecorder) OnDeltaStreamClosed(int64, *corev3.Node)                {}
func (n *nackRecorder) OnStreamDeltaRequest(_ int64, req *discovery.DeltaDiscoveryRequest) error {
	if req.GetErrorDetail() != nil {
		n.mu.Lock()
		n.nacks = append(n.nacks, req.GetErrorDetail().GetMessage())
		n.mu.Unlock()
	}
	return nil
}
func (*nackRecorder) OnStreamDeltaResponse(int64, *discovery.DeltaDiscoveryRequest, *discovery.DeltaDiscoveryResponse) {
}

func (n *nackRecorder) all() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return strings.Join(n.nacks, "\n")
}

// TestXDS: the waypoint fed by xdsclient from go-control-plane's delta ADS
// server: a snapshot applies; an invalid one is NACKed with the field path
// and the last good config serves; the next valid one applies.
func TestXDS(t *testing.T) {
	e := newEnv(t, nil)
	ba, bb := newBackend(t, whoami("A")), newBackend(t, whoami("B"))
	cl := clusterName(svc)
	sc := cache.NewSnapshotCache(false, cache.IDHash{}, nil)
	rec := &nackRecorder{}
	ln := listen(t)
	gs := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(gs, adsServer{d: delta.NewServer(t.Context(), sc, rec)})
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	set := func(version string, rs []Resource) {
		m := map[resource.Type][]types.Resource{resource.ListenerType: nil, resource.RouteType: nil, resource.ClusterType: nil, resource.EndpointType: nil}
		for _, r := range rs {
			tu := "type.googleapis.com/" + string(r.Resource.ProtoReflect().Descriptor().FullName())
			m[tu] = append(m[tu], r.Resource.(types.Resource))
		}
		snap, err := cache.NewSnapshot(version, m)
		if err != nil {
			t.Fatal(err)
		}
		if err := sc.SetSnapshot(t.Context(), "wp", snap); err != nil {
			t.Fatal(err)
		}
	}
	cfgFor := func(b *backend, tweak ...func(*routev3.RouteAction)) []Resource {
		return simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), cl, tweak...)}, map[string][]ep{cl: {{addr: b.addr}}})
	}
	set("1", cfgFor(ba))
	xc := &xdsclient.Client{Addr: ln.Addr().String(), Node: "wp", Types: XDSTypes(), OnUpdate: e.p.OnXDSUpdate,
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- xc.Start(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	c := e.client(e.cliID, target, false)
	body := func() string {
		_, b, _ := get(t, c, "http://"+svc+"/")
		return b
	}
	eventually(t, 5*time.Second, func() bool { return e.p.snap.Load() != nil }, "no config from xDS")
	if b := body(); !strings.HasPrefix(b, "A") {
		t.Fatalf("v1: %q", b)
	}
	// v2's route both rewrites the path and sets an unsupported field:
	// NACKed, so the path stays as sent.
	set("2", cfgFor(ba, func(a *routev3.RouteAction) {
		a.PrefixRewrite = "/v2/"
		a.IdleTimeout = durationpb.New(time.Second)
	}))
	eventually(t, 5*time.Second, func() bool { return strings.Contains(rec.all(), "route.idle_timeout: field not supported") }, "no NACK")
	if _, _, hdr := get(t, c, "http://"+svc+"/"); hdr.Get("X-Seen-Path") != "/" {
		t.Fatalf("after the NACK the path was rewritten to %q", hdr.Get("X-Seen-Path"))
	}
	set("3", cfgFor(bb))
	eventually(t, 5*time.Second, func() bool { return strings.HasPrefix(body(), "B") }, "v3 never applied")
}
