//go:build integration

package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambit-mesh/ambit/integration/app"
	"github.com/ambit-mesh/ambit/integration/mesh"
)

// TestWaypointRollout: a rolling restart of a two-replica waypoint under
// steady load loses no request. The Deployment controller rolls it out
// (maxSurge 1, maxUnavailable 0, as Kubernetes computes them for two
// replicas): a new pod, once it is Ready an old one deleted, twice (on the
// light harness the test plays the controller the same way).
// A deleted pod terminates as on a kubelet (SIGTERM, SIGKILL after its
// grace period); istiod-lite takes it out of the ztunnels' endpoints when
// its deletionTimestamp appears, while the waypoint drains (not ready,
// still accepting, every answer making its client reconnect).
//
// WAYPOINT_ROLLOUT_DRAIN (a Go duration, e.g. 0s) overrides the waypoint
// pods' drain duration, to measure what a waypoint that exits at once
// loses.
func TestWaypointRollout(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and eBPF")
	}
	e := setup(t)
	ctx := context.Background()
	if _, err := e.cs.CoreV1().ServiceAccounts(shop).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "reviews"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	httpApp := map[string]string{app.AnnotationProtocol: "http"}
	e.pod(ctx, shop, "client-1", "node-1", "client", nil, 0)
	e.httpPod(ctx, "reviews-v1", "node-1", "reviews", map[string]string{"app": "reviews"}, httpApp)
	e.httpPod(ctx, "reviews-v2", "node-2", "reviews", map[string]string{"app": "reviews"}, httpApp)
	vip := e.httpService(ctx, "reviews", map[string]string{"app": "reviews"}, map[string]string{"istio.io/use-waypoint": "waypoint"})
	e.kubectlApply(t, fmt.Sprintf(`apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: %s, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
`, shop))
	drain := os.Getenv("WAYPOINT_ROLLOUT_DRAIN")
	e.runWaypoint(t, "waypoint", "node-2", func(p *corev1.Pod) { withDrain(p, drain) })
	for _, p := range []string{"shop/client-1", "shop/reviews-v1", "shop/reviews-v2"} {
		e.waitReady(ctx, p)
	}
	url := fmt.Sprintf("http://%s/", netip.AddrPortFrom(vip, 80))
	probe := e.httpClient("shop/client-1", false)
	var last string
	if !eventually(30*time.Second, func() bool {
		code, _, err := get(probe, http.MethodGet, url)
		last = fmt.Sprint(code, err)
		return err == nil && code == http.StatusOK
	}) {
		t.Fatalf("no 200 through the waypoint after 30s (last: %s)\n%s", last, e.waypointTail())
	}
	// The second replica (the Deployment scaled to two).
	old := e.scaleWaypoint(t, drain)

	// Steady load: 200 requests/s, paced, over 8 clients: 6 keep their
	// connection alive, 2 open one per request. Requests are POSTs with a
	// 1 KiB body: net/http's client never retries those by itself, so a
	// lost request shows as an error.
	const rate, workers = 200, 8
	body := bytes.Repeat([]byte("x"), 1024)
	type result struct {
		at   time.Duration
		code int
		err  string
	}
	var mu sync.Mutex // guards results
	var results []result
	start := time.Now()
	loadCtx, stopLoad := context.WithCancel(ctx)
	tokens := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(tokens)
		tick := time.NewTicker(time.Second / rate)
		defer tick.Stop()
		for {
			select {
			case <-loadCtx.Done():
				return
			case <-tick.C:
				select {
				case tokens <- struct{}{}:
				case <-loadCtx.Done():
					return
				}
			}
		}
	}()
	for i := range workers {
		c := e.loadClient("shop/client-1", i < 6)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.CloseIdleConnections()
			for range tokens {
				r := result{at: time.Since(start)}
				req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
				if err != nil {
					panic(err)
				}
				resp, err := c.Do(req)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					r.code = resp.StatusCode
				}
				if err != nil || r.code != http.StatusOK {
					r.err = fmt.Sprintf("%d: %v", r.code, err)
				}
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
			}
		}()
	}
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(results) }
	// Some load on the two replicas first.
	eventually(10*time.Second, func() bool { return count() >= rate })

	// The rolling restart.
	fresh, gone, marks := e.restartWaypoint(t, old, drain, start)
	// Load on the new replicas for a moment more.
	n := count()
	eventually(10*time.Second, func() bool { return count() >= n+2*rate })
	stopLoad()
	wg.Wait()
	elapsed := time.Since(start)

	var failed []string
	for _, r := range results {
		if r.err != "" {
			failed = append(failed, fmt.Sprintf("at %s: %s", r.at.Round(time.Millisecond), r.err))
		}
	}
	// Every request went through one of the waypoints: their access logs
	// (kept after their pods stopped) add up to the requests answered.
	pods := append(slices.Clone(old), fresh...)
	by := map[string]int{}
	logged := 0
	eventually(10*time.Second, func() bool {
		logged = 0
		for _, w := range pods {
			logs, err := mesh.ReadRequestLogs(e.kls[w.node].LogFile(shop+"/"+w.name, "istio-proxy")) // kept after the pod is gone
			if err != nil {
				t.Fatal(err)
			}
			k := 0
			for _, l := range logs {
				if l.Method == http.MethodPost {
					k++
				}
			}
			by[w.name] = k
			logged += k
		}
		return logged >= len(results)-len(failed)
	})
	names := make([]string, 0, len(gone))
	for k := range gone {
		names = append(names, k)
	}
	sort.Strings(names)
	var goneIn []string
	for _, k := range names {
		goneIn = append(goneIn, fmt.Sprintf("%s %s", k, gone[k]))
	}
	t.Logf("rolling restart under %d req/s over %d clients (drain %q): %d requests in %s, %d failed; deletion to pod gone: %s; POSTs in each waypoint's access log: %v; %s",
		rate, workers, drain, len(results), elapsed.Round(time.Millisecond), len(failed), strings.Join(goneIn, ", "), by, strings.Join(marks, ", "))
	if len(failed) > 0 {
		t.Errorf("%d of %d requests failed during the rolling restart; first: %s", len(failed), len(results), strings.Join(failed[:min(len(failed), 5)], "; "))
	}
	if logged != len(results)-len(failed) {
		t.Errorf("the waypoints logged %d requests (%v), the clients had %d answered", logged, by, len(results)-len(failed))
	}
	for _, w := range pods {
		if by[w.name] == 0 {
			t.Errorf("waypoint replica %s served nothing: %v", w.name, by)
		}
	}
	if want := int(elapsed.Seconds() * rate * 0.7); len(results) < want {
		t.Errorf("only %d requests in %s: the load was not steady (want at least %d)", len(results), elapsed.Round(time.Millisecond), want)
	}
}

// loadClient is an HTTP/1.1 client in pod key with its own connection pool
// (one connection kept alive, or none).
func (e *env) loadClient(key string, keepAlive bool) *http.Client {
	p := e.netns(key)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return p.NS.Dial(ctx, nil, network, addr)
		},
		DisableKeepAlives:   !keepAlive,
		MaxIdleConnsPerHost: 1,
		MaxConnsPerHost:     1,
	}}
}

// wpReplica is a waypoint pod and its node.
type wpReplica struct{ name, node string }

// scaleWaypoint makes the waypoint two replicas and returns them. On the
// harness cluster the Deployment is scaled to two, each revision's pods
// spread over the nodes (a topology spread constraint instead of
// runWaypoint's node); on the
// light harness the test creates the second pod itself on node-1.
func (e *env) scaleWaypoint(t *testing.T, drain string) []wpReplica {
	t.Helper()
	if !e.onCluster {
		old := []wpReplica{{strings.TrimPrefix(waypointPod, shop+"/"), "node-2"}, {"waypoint-1", "node-1"}}
		e.startWaypointPodEnv(t, old[1].name, old[1].node, drain)
		return old
	}
	patch := fmt.Sprintf(`{"spec": {"replicas": 2, "template": {"spec": {"nodeSelector": null, "topologySpreadConstraints": [{
		"maxSkew": 1, "topologyKey": %q, "whenUnsatisfiable": "DoNotSchedule",
		"labelSelector": {"matchLabels": {%q: "waypoint"}}, "matchLabelKeys": ["pod-template-hash"]}]}}}}`,
		corev1.LabelHostname, "gateway.networking.k8s.io/gateway-name")
	if _, err := e.cs.AppsV1().Deployments(shop).Patch(t.Context(), "waypoint", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{FieldManager: "ambit-integration"}); err != nil {
		t.Fatal(err)
	}
	var old []wpReplica
	for _, p := range e.waitRolledOut(t, "waypoint", 2, nil) {
		old = append(old, wpReplica{p.Name, p.Spec.NodeName})
	}
	t.Logf("waypoint replicas: %v", old)
	return old
}

// restartWaypoint replaces the replicas old one by one, each new one Ready
// before an old one is deleted (maxSurge 1, maxUnavailable 0), and waits
// until the old pods are gone (their kubelet deletes them once their
// process has exited). On the harness cluster that is the Deployment
// controller's rollout after a restart (kubectl rollout restart's
// annotation), watched here; on the light harness the test plays the
// controller. It returns the new replicas, each old pod's time from
// deletion to gone, and the moments it saw (since start).
func (e *env) restartWaypoint(t *testing.T, old []wpReplica, drain string, start time.Time) (fresh []wpReplica, gone map[string]time.Duration, marks []string) {
	t.Helper()
	ctx := t.Context()
	var mu sync.Mutex // guards marks (the cluster's watcher adds to them)
	mark := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		marks = append(marks, fmt.Sprintf("%s at %s", fmt.Sprintf(format, args...), time.Since(start).Round(time.Millisecond)))
	}
	gone = map[string]time.Duration{}
	deleted := map[string]time.Time{} // guarded by mu
	stopWatching := func() {}
	if !e.onCluster {
		fresh = []wpReplica{{"waypoint-2", "node-2"}, {"waypoint-3", "node-1"}}
		for i, o := range old {
			e.startWaypointPodEnv(t, fresh[i].name, fresh[i].node, drain)
			mark("%s ready", fresh[i].name)
			if err := e.cs.CoreV1().Pods(shop).Delete(ctx, o.name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			deleted[o.name] = time.Now()
			mark("%s deleted", o.name)
		}
	} else {
		// Watch the pods come and go, for the marks and deletion times.
		watchCtx, stopWatch := context.WithCancel(ctx)
		watched := make(chan struct{})
		seen := map[string]string{} // pod -> "ready" or "deleted"; the watcher's
		for _, o := range old {
			seen[o.name] = "ready"
		}
		// (earlier revisions' pods may still be draining: not this rollout's)
		if pods, err := e.cs.CoreV1().Pods(shop).List(ctx, metav1.ListOptions{LabelSelector: "gateway.networking.k8s.io/gateway-name=waypoint"}); err == nil {
			for _, p := range pods.Items {
				if p.DeletionTimestamp != nil {
					seen[p.Name] = "deleted"
				}
			}
		}
		stopWatching = func() { stopWatch(); <-watched }
		go func() {
			defer close(watched)
			for watchCtx.Err() == nil {
				pods, err := e.cs.CoreV1().Pods(shop).List(watchCtx, metav1.ListOptions{LabelSelector: "gateway.networking.k8s.io/gateway-name=waypoint"})
				if err == nil {
					for _, p := range pods.Items {
						switch {
						case p.DeletionTimestamp != nil && seen[p.Name] != "deleted":
							seen[p.Name] = "deleted"
							mu.Lock()
							deleted[p.Name] = time.Now()
							mu.Unlock()
							mark("%s deleted", p.Name)
						case p.DeletionTimestamp == nil && podReady(&p) && seen[p.Name] == "":
							seen[p.Name] = "ready"
							mark("%s ready", p.Name)
						}
					}
				}
				select {
				case <-watchCtx.Done():
				case <-time.After(50 * time.Millisecond):
				}
			}
		}()
		patch := fmt.Sprintf(`{"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": %q}}}}}`, time.Now().Format(time.RFC3339))
		if _, err := e.cs.AppsV1().Deployments(shop).Patch(ctx, "waypoint", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{FieldManager: "ambit-integration"}); err != nil {
			t.Fatal(err)
		}
		mark("rollout restart")
		names := map[string]bool{}
		for _, o := range old {
			names[o.name] = true
		}
		for _, p := range e.waitRolledOut(t, "waypoint", 2, func(p *corev1.Pod) bool { return !names[p.Name] }) {
			fresh = append(fresh, wpReplica{p.Name, p.Spec.NodeName})
		}
	}
	for _, o := range old {
		if !eventually(60*time.Second, func() bool {
			_, err := e.cs.CoreV1().Pods(shop).Get(ctx, o.name, metav1.GetOptions{})
			return apierrors.IsNotFound(err)
		}) {
			t.Fatalf("%s still there 60s after its deletion", o.name)
		}
		mu.Lock()
		gone[o.name] = time.Since(deleted[o.name]).Round(100 * time.Millisecond)
		mu.Unlock()
		mark("%s gone", o.name)
	}
	stopWatching()
	return fresh, gone, marks
}

// startWaypointPodEnv creates another pod called name on node from the
// waypoint Deployment's template (the ReplicaSet controller's and the
// scheduler's part: this harness has neither) and waits until it is ready.
// A drain duration, when given, goes to its TERMINATION_DRAIN_DURATION.
func (e *env) startWaypointPodEnv(t *testing.T, name, node, drain string) {
	t.Helper()
	ctx := context.Background()
	d, err := e.cs.AppsV1().Deployments(shop).Get(ctx, "waypoint", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{ObjectMeta: d.Spec.Template.ObjectMeta, Spec: d.Spec.Template.Spec}
	pod.Name, pod.Namespace, pod.Spec.NodeName = name, shop, node
	withDrain(pod, drain)
	if _, err := e.cs.CoreV1().Pods(shop).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitReady(ctx, shop+"/"+name)
}

// withDrain sets the waypoint pod's drain duration (TERMINATION_DRAIN_DURATION)
// when drain is not empty.
func withDrain(pod *corev1.Pod, drain string) {
	if drain == "" {
		return
	}
	for i := range pod.Spec.Containers {
		pod.Spec.Containers[i].Env = append(pod.Spec.Containers[i].Env, corev1.EnvVar{Name: "TERMINATION_DRAIN_DURATION", Value: drain})
	}
}
