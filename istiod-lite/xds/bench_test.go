package xds

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

// Scale benchmarks (make bench; not tests). The synthetic mesh: 100
// namespaces, each with 1,000 pods and 100 services selecting 10 pods each
// (100k pods, 10k services), on 100 nodes. Figures are reported with
// b.ReportMetric; run
//
//	go test -run '^$' -bench 'Push|PodChange' -benchtime 1x ./istiod-lite/xds
const (
	benchNamespaces   = 100
	benchPodsPerNS    = 1000
	benchSvcsPerNS    = 100
	benchStreams      = 100
	benchPodChanges   = 50
	benchWorkloadsAll = benchNamespaces * benchPodsPerNS
)

func benchPod(ns, i int, ready bool) *corev1.Pod {
	st := corev1.ConditionTrue
	if !ready {
		st = corev1.ConditionFalse
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: fmt.Sprintf("pod-%d", i), Namespace: fmt.Sprintf("ns-%d", ns),
			Labels: map[string]string{"app": fmt.Sprintf("svc-%d", i%benchSvcsPerNS), "version": "v1"},
		},
		Spec: corev1.PodSpec{NodeName: fmt.Sprintf("node-%d", (ns*benchPodsPerNS+i)%100), ServiceAccountName: fmt.Sprintf("sa-%d", i%benchSvcsPerNS)},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, PodIP: fmt.Sprintf("10.%d.%d.%d", ns, i/250, i%250+1),
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: st}},
		},
	}
}

func benchObjects() *translate.Objects {
	o := translate.NewObjects()
	for ns := range benchNamespaces {
		o.Set(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("ns-%d", ns), Labels: map[string]string{model.LabelDataplaneMode: model.DataplaneAmbient}}})
		for i := range benchPodsPerNS {
			o.Set(benchPod(ns, i, true))
		}
		for s := range benchSvcsPerNS {
			o.Set(&corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("svc-%d", s), Namespace: fmt.Sprintf("ns-%d", ns)},
				Spec: corev1.ServiceSpec{
					ClusterIP: fmt.Sprintf("172.%d.%d.%d", 16+ns/64, ns%64, s+1), Selector: map[string]string{"app": fmt.Sprintf("svc-%d", s)},
					Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}},
				},
			})
		}
	}
	return o
}

// rawClient is a minimal Delta ADS client: it ACKs everything and reports
// when it sees a resource name. It does not decode (the control plane is
// what is measured).
type rawClient struct {
	counts   map[string]int               // resources held per type (first sync only)
	versions map[string]map[string]string // when record is set
	record   bool
	synced   chan struct{}
}

type benchWatch struct {
	name atomic.Pointer[string]
	t0   atomic.Int64
	seen chan time.Duration
}

func (c *rawClient) run(ctx context.Context, conn *grpc.ClientConn, node string, initial map[string]map[string]string, w *benchWatch) error {
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		return err
	}
	for i, t := range workload.TypeURLs {
		req := &discovery.DeltaDiscoveryRequest{TypeUrl: t, ResourceNamesSubscribe: []string{"*"}, InitialResourceVersions: initial[t]}
		if i == 0 {
			req.Node = &core.Node{Id: node}
		}
		if err := st.Send(req); err != nil {
			return err
		}
	}
	seenTypes := map[string]bool{}
	for {
		resp, err := st.Recv()
		if err != nil {
			return err
		}
		now := time.Now()
		if target := w.name.Load(); target != nil && resp.GetTypeUrl() == workload.WorkloadType {
			for _, r := range resp.GetResources() {
				if r.GetName() == *target {
					w.seen <- now.Sub(time.Unix(0, w.t0.Load()))
				}
			}
		}
		if c.synced != nil {
			c.counts[resp.GetTypeUrl()] += len(resp.GetResources())
			if c.record {
				v := c.versions[resp.GetTypeUrl()]
				if v == nil {
					v = map[string]string{}
					c.versions[resp.GetTypeUrl()] = v
				}
				for _, r := range resp.GetResources() {
					v[r.GetName()] = r.GetVersion()
				}
			}
			seenTypes[resp.GetTypeUrl()] = true
			if len(seenTypes) == len(workload.TypeURLs) && c.counts[workload.WorkloadType] >= benchWorkloadsAll {
				close(c.synced)
				c.synced = nil
			}
		}
		if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
			return err
		}
	}
}

func cpuMs() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e6
}

func peakRSSMiB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			kb, _ := strconv.Atoi(strings.Fields(l)[1])
			return float64(kb) / 1024
		}
	}
	return 0
}

func startBenchServer(b *testing.B, ctx context.Context, store *model.Store) (*Server, *grpc.ClientConn, func()) {
	srv := New(store, nil)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	g := grpc.NewServer(ServerOptions()...)
	srv.Register(g)
	ctx, cancel := context.WithCancel(ctx)
	go func() { _ = g.Serve(lis) }()
	go func() { _ = srv.Start(ctx) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)),
		grpc.WithInitialWindowSize(4<<20), grpc.WithInitialConnWindowSize(16<<20))
	if err != nil {
		b.Fatal(err)
	}
	return srv, conn, func() { cancel(); conn.Close(); g.Stop() }
}

// BenchmarkFullPush100kPods: from the Kubernetes objects of 100k pods and
// 10k services to one ztunnel holding the whole model: translation, xDS
// resources, and the first push over gRPC. Reports build-ms, push-ms,
// total-ms and peak-rss-MiB (the whole process, client included).
func BenchmarkFullPush100kPods(b *testing.B) {
	if testing.Short() {
		b.Skip("scale benchmark")
	}
	// Timed: the build and the push, not making the objects. (ResetTimer
	// in the loop would leave only the last iteration timed: once one took
	// under the bench time, b.N grew without end.)
	b.StopTimer()
	for range b.N {
		objs := benchObjects()
		runtime.GC()
		b.StartTimer()
		cpu0 := cpuMs()
		start := time.Now()
		r := translate.Build(objs, translate.Options{})
		build := time.Since(start)
		store := &model.Store{}
		store.Replace(r.Snapshot)
		_, conn, stop := startBenchServer(b, b.Context(), store)
		c := &rawClient{counts: map[string]int{}, synced: make(chan struct{})}
		ctx, cancel := context.WithCancel(b.Context())
		go func() { _ = c.run(ctx, conn, "node-0", nil, &benchWatch{}) }()
		<-c.synced
		total := time.Since(start)
		b.StopTimer()
		b.ReportMetric(float64(build.Milliseconds()), "build-ms")
		b.ReportMetric(float64((total - build).Milliseconds()), "push-ms")
		b.ReportMetric(float64(total.Milliseconds()), "total-ms")
		b.ReportMetric(cpuMs()-cpu0, "total-cpu-ms")
		b.ReportMetric(peakRSSMiB(), "peak-rss-MiB")
		b.ReportMetric(float64(len(r.Snapshot.Workloads)), "workloads")
		cancel()
		stop()
	}
}

// BenchmarkOnePodChange100Streams: 100 ztunnel streams hold the 100k-pod
// model; one pod's readiness flips (as an informer event would apply it to
// the object set) and the time until each stream has received that one
// workload is measured: translate.Update, Store.Apply, the xDS push, gRPC.
// Reports per-stream p50/p99 and the p99 of the time to reach all 100.
func BenchmarkOnePodChange100Streams(b *testing.B) {
	if testing.Short() {
		b.Skip("scale benchmark")
	}
	objs := benchObjects()
	store := &model.Store{}
	store.Replace(translate.Build(objs, translate.Options{}).Snapshot)
	srv, conn, stop := startBenchServer(b, b.Context(), store)
	defer stop()
	var pushes atomic.Int64
	srv.workloads.pushed = func(time.Duration, int) { pushes.Add(1) }
	ctx, cancel := context.WithCancel(b.Context())
	defer cancel()

	w := &benchWatch{seen: make(chan time.Duration, benchStreams*2)}
	// The first stream syncs in full and records the versions; the others
	// connect as reconnecting ztunnels presenting them.
	first := &rawClient{counts: map[string]int{}, versions: map[string]map[string]string{}, record: true, synced: make(chan struct{})}
	synced := first.synced
	go func() { _ = first.run(ctx, conn, "node-0", nil, w) }()
	<-synced
	for i := 1; i < benchStreams; i++ {
		c := &rawClient{}
		go func() { _ = c.run(ctx, conn, fmt.Sprintf("node-%d", i), first.versions, w) }()
	}
	deadline := time.Now().Add(5 * time.Minute) // 99 requests of 8 MB of versions, on a shared machine
	for len(srv.Status()) < benchStreams || !allSynced(srv) {
		if time.Now().After(deadline) {
			st := srv.Status()
			bad := 0
			var ex string
			for _, x := range st {
				for _, t := range workload.TypeURLs {
					if ts := x.Types[t]; ts == nil || ts.Sync() != "SYNCED" {
						bad++
						if ts != nil {
							ex = fmt.Sprintf("%s %+v", t, *ts)
						} else {
							ex = t + " none"
						}
					}
				}
			}
			b.Fatalf("streams did not sync: %d streams, %d types not synced, e.g. %s", len(st), bad, ex)
		}
		time.Sleep(10 * time.Millisecond)
	}

	var perStream, toAll, modelTime []time.Duration
	b.ResetTimer()
	for n := range b.N * benchPodChanges {
		ns, i := n%benchNamespaces, (n*7)%benchPodsPerNS
		name := translate.WorkloadUID("", fmt.Sprintf("ns-%d", ns), fmt.Sprintf("pod-%d", i))
		w.name.Store(&name)
		w.t0.Store(time.Now().UnixNano())
		// What the registry's builder does for one informer event.
		ch := objs.Set(benchPod(ns, i, n/benchNamespaces%2 == 1))
		d, _ := translate.Update(objs, store.Load(), ch, translate.Options{})
		store.Apply(d)
		modelTime = append(modelTime, time.Since(time.Unix(0, w.t0.Load())))
		var last time.Duration
		for range benchStreams {
			select {
			case l := <-w.seen:
				perStream = append(perStream, l)
				last = max(last, l)
			case <-time.After(10 * time.Second):
				b.Fatalf("change %d did not reach every stream", n)
			}
		}
		toAll = append(toAll, last)
		time.Sleep(5 * time.Millisecond) // let ACKs settle, as between real events
	}
	b.StopTimer()
	pct := func(d []time.Duration, p float64) float64 {
		slices.Sort(d)
		return float64(d[min(len(d)-1, int(float64(len(d))*p))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(perStream, 0.50), "stream-p50-ms")
	b.ReportMetric(pct(perStream, 0.99), "stream-p99-ms")
	b.ReportMetric(pct(toAll, 0.50), "all100-p50-ms")
	b.ReportMetric(pct(toAll, 0.99), "all100-p99-ms")
	b.ReportMetric(pct(modelTime, 0.50), "model-p50-ms")
	b.ReportMetric(peakRSSMiB(), "peak-rss-MiB")
}

func allSynced(s *Server) bool {
	for _, st := range s.Status() {
		for _, t := range workload.TypeURLs {
			if ts := st.Types[t]; ts == nil || ts.Sync() != "SYNCED" {
				return false
			}
		}
	}
	return true
}
