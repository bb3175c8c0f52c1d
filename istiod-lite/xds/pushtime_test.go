package xds

import (
	"context"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	dto "github.com/prometheus/client_model/go"

	"github.com/ambit-mesh/ambit/istiod-lite/monitoring"
	"github.com/ambit-mesh/ambit/model"
)

// hist is a histogram's (or counter's) state in a registry gather.
type hist struct {
	count uint64
	sum   float64
	over  uint64 // observations above the bucket bound asked for
}

// histogram reads family name's child whose type label is typ ("" for a
// family without labels); above is the bucket bound to count observations
// beyond.
func histogram(t *testing.T, m *monitoring.Metrics, name, typ string, above float64) hist {
	t.Helper()
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, mt := range f.GetMetric() {
			if typ != "" && labelOf(mt, "type") != typ {
				continue
			}
			if c := mt.GetCounter(); c != nil {
				return hist{count: uint64(c.GetValue())}
			}
			h := mt.GetHistogram()
			out := hist{count: h.GetSampleCount(), sum: h.GetSampleSum(), over: h.GetSampleCount()}
			for _, b := range h.GetBucket() {
				if b.GetUpperBound() == above {
					out.over = h.GetSampleCount() - b.GetCumulativeCount()
				}
			}
			return out
		}
	}
	return hist{}
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// Over real gRPC and TLS, with two real ztunnel clients and a waypoint
// stream: a connect counts in pilot_xds_push_time but not in
// pilot_proxy_convergence_time; a config change pushed to all three moves
// both (once per proxy), bounded by the time the change took to arrive;
// and a change a waypoint receives only after it ACKs its previous
// response converges no sooner than that ACK.
func TestPushMetrics(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	store := &model.Store{}
	store.Replace(meshSnapshot(t))
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", "a", "10.9.0.1")}})
	m := monitoring.New()
	s := New(store, nil)
	s.BuildWaypoint = testWaypointResources
	s.Metrics = m
	addr, stop := serve(t, ctx, s, "")
	defer stop()

	clients := []interface{ Load() *model.Snapshot }{
		startClient(t, ctx, addr, "node-1").Store, startClient(t, ctx, addr, "node-2").Store,
	}
	east := newADSClient(t, ctx, addr, secret(eastWP.String()))
	for _, r := range east.subscribeAll("wp-east-0", eastWP.String()) {
		east.ack(r)
	}
	eventually(t, "the connects' push times", func() bool {
		return histogram(t, m, "pilot_xds_push_time", "wds", 0).count >= 2 &&
			histogram(t, m, "pilot_xds_push_time", "eds", 0).count >= 1 &&
			histogram(t, m, "pilot_xds_config_size_bytes", "eds", 0).count >= 1
	})
	if c := histogram(t, m, "pilot_proxy_convergence_time", "", 0).count; c != 0 {
		t.Fatalf("convergence recorded %d times for connects, want 0", c)
	}
	wds0, eds0 := histogram(t, m, "pilot_xds_push_time", "wds", 0), histogram(t, m, "pilot_xds_push_time", "eds", 0)
	endpoint0 := histogram(t, m, "pilot_push_triggers", monitoring.TriggerEndpoint, 0)

	// A pod in east: the node proxies get the workload, east/wp its
	// endpoints.
	changed := time.Now()
	d := pod("east", "d", "10.9.0.2")
	store.Apply(&model.Delta{Workloads: []*model.Workload{d}})
	for _, c := range clients {
		eventually(t, "the workload at a node proxy", func() bool { return c.Load().Workloads[d.UID] != nil })
	}
	resp := east.recv()
	if n := endpointsIn(t, resp); n != 2 {
		t.Fatalf("east/wp: %d endpoints, want 2", n)
	}
	arrived := time.Since(changed)
	var conv hist
	eventually(t, "three convergences", func() bool {
		conv = histogram(t, m, "pilot_proxy_convergence_time", "", 0)
		return conv.count >= 3
	})
	if conv.count != 3 || conv.sum <= 0 || conv.sum > 3*arrived.Seconds() {
		t.Errorf("convergence: %d observations summing %.6fs; want 3, each within the %s the change took to arrive", conv.count, conv.sum, arrived)
	}
	if got := histogram(t, m, "pilot_xds_push_time", "wds", 0).count - wds0.count; got != 2 {
		t.Errorf("pilot_xds_push_time{type=wds} moved by %d, want 2 (one per node proxy)", got)
	}
	if got := histogram(t, m, "pilot_xds_push_time", "eds", 0).count - eds0.count; got != 1 {
		t.Errorf("pilot_xds_push_time{type=eds} moved by %d, want 1", got)
	}
	if got := histogram(t, m, "pilot_push_triggers", monitoring.TriggerEndpoint, 0).count - endpoint0.count; got != 1 {
		t.Errorf("pilot_push_triggers{type=endpoint} moved by %d, want 1", got)
	}

	// Another pod while east/wp has not ACKed: its push waits for the ACK,
	// and converges no sooner.
	store.Apply(&model.Delta{Workloads: []*model.Workload{pod("east", "e", "10.9.0.3")}})
	eventually(t, "the node proxies' convergences", func() bool {
		return histogram(t, m, "pilot_proxy_convergence_time", "", 0).count == 5
	})
	over := histogram(t, m, "pilot_proxy_convergence_time", "", 0.1).over
	eventually(t, "east/wp's snapshot of the change", func() bool { return waypointStatus(s, eastWP).Version == storeVersion(store) })
	time.Sleep(300 * time.Millisecond) // east/wp holding its ACK back (what is measured, not a synchronization)
	east.ack(resp)
	next := east.recv()
	if next.GetTypeUrl() != resource.EndpointType || endpointsIn(t, next) != 3 {
		t.Fatalf("after the ACK: %s", names(next))
	}
	eventually(t, "the waypoint's convergence", func() bool {
		return histogram(t, m, "pilot_proxy_convergence_time", "", 0).count == 6
	})
	if got := histogram(t, m, "pilot_proxy_convergence_time", "", 0.1).over; got != over+1 {
		t.Errorf("convergences over 0.1s: %d, want %d (the waypoint's, held up by its ACK)", got, over+1)
	}
}
