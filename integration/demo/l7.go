package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/mesh"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// routeRun is the traffic the L7 act sent through one HTTPRoute.
type routeRun struct {
	route    *gwv1.HTTPRoute
	svc      *corev1.Service
	host     string // the Host the client sent: <svc>.<ns>.svc.cluster.local
	addr     string // the service VIP:port the client dialled
	sent     int
	codes    map[int]int
	errs     int
	firstErr error
	backends []backend
	by       map[string]int // answers (200) by backend service
	served   map[*pod][2]uint64
	logs     []mesh.RequestLog // the waypoint's lines for this host
}

// backend is one backendRef of a route: its service and configured weight.
type backend struct {
	name   string
	weight int32
	pods   []*pod
}

// l7Act runs the L7 act: the waypoints of the examples are already running;
// the enrolled client of their namespace sends each HTTPRoute's traffic.
func l7Act(ctx context.Context, w io.Writer, m *mesh.Mesh, ex *examples, nodes []netns.NodeConfig) error {
	var wp *pod
	for _, p := range ex.pods {
		if p.waypointOf() != "" {
			wp = p
			break
		}
	}
	if wp == nil || len(ex.routes) == 0 {
		return nil // no waypoint or no route in the examples: no L7 act
	}
	var client *pod
	for _, p := range ex.pods {
		if p.obj.Namespace == wp.obj.Namespace && p.obj.Name == "client" {
			client = p
		}
	}
	if client == nil {
		return fmt.Errorf("no pod %s/client to send the L7 act's traffic from", wp.obj.Namespace)
	}
	step("L7 act: HTTP through the waypoint")
	before, err := m.RequestLogs(wp.obj.Name)
	if err != nil {
		return err
	}
	var runs []*routeRun
	for _, rt := range ex.routes {
		r, err := planRoute(rt, ex)
		if err != nil {
			return err
		}
		for p := range r.served {
			s, f := p.http.Counts()
			r.served[p] = [2]uint64{s, f}
		}
		r.send(ctx, client)
		for p, b := range r.served {
			s, f := p.http.Counts()
			r.served[p] = [2]uint64{s - b[0], f - b[1]}
		}
		runs = append(runs, r)
	}
	// The waypoint logs a request when it ends, which may be just after the
	// client saw its answer.
	var total int
	for _, r := range runs {
		total += r.sent
	}
	var after []mesh.RequestLog
	for deadline := time.Now().Add(5 * time.Second); ; {
		if after, err = m.RequestLogs(wp.obj.Name); err != nil {
			return err
		}
		if len(after)-len(before) >= total || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	fresh := after[len(before):]
	for _, r := range runs {
		for _, l := range fresh {
			if l.Authority == r.host {
				r.logs = append(r.logs, l)
			}
		}
	}

	clientID := "spiffe://" + identity.DefaultTrustDomain.Name() + "/ns/" + client.obj.Namespace + "/sa/" + client.obj.Spec.ServiceAccountName
	wpID := "spiffe://" + identity.DefaultTrustDomain.Name() + "/ns/" + wp.obj.Namespace + "/sa/" + wp.obj.Spec.ServiceAccountName
	fmt.Fprintf(w, "\nL7 act: waypoint %s/%s (pod %s on %s, %s:15008, identity %s)\n", wp.obj.Namespace, wp.waypointOf(), wp.obj.Name, wp.obj.Spec.NodeName, wp.ip, shortID(wpID))
	fmt.Fprintf(w, "path: %s -> eBPF -> ztunnel %s -> HBONE -> waypoint -> HBONE -> destination ztunnel -> pod\n\n", client.key(), client.obj.Spec.NodeName)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ROUTE\tSERVICE\tREQUESTS\tCODES\tSPLIT (configured -> observed)\tRETRIES BY THE WAYPOINT")
	for _, r := range runs {
		var split []string
		answered := 0
		for _, b := range r.backends {
			answered += r.by[b.name]
		}
		var sumW int32
		for _, b := range r.backends {
			sumW += b.weight
		}
		for _, b := range r.backends {
			obs := 0.0
			if answered > 0 {
				obs = 100 * float64(r.by[b.name]) / float64(answered)
			}
			split = append(split, fmt.Sprintf("%s %.0f%% -> %.1f%%", b.name, 100*float64(b.weight)/float64(sumW), obs))
		}
		retries := 0
		for _, l := range r.logs {
			if l.Attempts > 1 {
				retries += l.Attempts - 1
			}
		}
		retried := strconv.Itoa(retries)
		var served, failed uint64
		for _, c := range r.served {
			served += c[0]
			failed += c[1]
		}
		if failed > 0 {
			retried += fmt.Sprintf(" (backend got %d requests, failed %d with 503 on purpose)", served, failed)
		}
		fmt.Fprintf(tw, "%s/%s\t%s:%d\t%d\t%s\t%s\t%s\n", r.route.Namespace, r.route.Name, r.svc.Name+"."+r.svc.Namespace,
			r.svc.Spec.Ports[0].Port, r.sent, r.codeSummary(), strings.Join(split, ", "), retried)
	}
	tw.Flush()

	// Identities: what the waypoint saw of the client, what the backends'
	// ztunnels saw of the waypoint.
	seen := map[string]int{}
	logged := 0
	for _, r := range runs {
		for _, l := range r.logs {
			seen[l.SourcePrincipal]++
			logged++
		}
	}
	counted, err := mesh.MetricsIn(ctx, wp.net.NS, "istio_requests_total", map[string]string{"reporter": "waypoint", "source_principal": clientID})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\nthe waypoint saw the client as %s on %d of the %d requests it logged (istio_requests_total{reporter=\"waypoint\",source_principal=...} = %.0f)\n",
		shortID(clientID), seen[clientID], logged, counted)
	for _, id := range slices.Sorted(maps.Keys(seen)) {
		if id != clientID {
			fmt.Fprintf(w, "  and %s on %d\n", id, seen[id])
		}
	}
	// The client's connections end with the act (logged); the waypoint's
	// upstream tunnels stay pooled (counted when opened).
	var toWaypoint int
	logs, err := m.AccessLogs(client.obj.Spec.NodeName)
	if err != nil {
		return err
	}
	for _, l := range logs {
		if l.Direction == "outbound" && l.Route == "waypoint" && strings.HasPrefix(l.Src, client.ip.String()+":") {
			toWaypoint++
		}
	}
	backendNodes := map[string]bool{}
	for _, r := range runs {
		for _, b := range r.backends {
			for _, p := range b.pods {
				backendNodes[p.obj.Spec.NodeName] = true
			}
		}
	}
	var fromWaypoint float64
	for _, n := range nodes {
		if !backendNodes[n.Name] {
			continue
		}
		v, err := m.Metrics(ctx, n.Name, "istio_tcp_connections_opened_total", map[string]string{"reporter": "destination", "source_principal": wpID})
		if err != nil {
			return err
		}
		fromWaypoint += v
	}
	fmt.Fprintf(w, "ztunnels: %s tunnelled %d of the client's connections to the waypoint; the backends' ztunnels accepted %.0f tunnels from %s (the waypoint's pooled upstream connections)\n",
		client.obj.Spec.NodeName, toWaypoint, fromWaypoint, shortID(wpID))
	return nil
}

// planRoute resolves a route's parent service and backends in the examples.
func planRoute(rt *gwv1.HTTPRoute, ex *examples) (*routeRun, error) {
	r := &routeRun{route: rt, codes: map[int]int{}, by: map[string]int{}, served: map[*pod][2]uint64{}}
	svcByName := func(ns, name string) *corev1.Service {
		for _, s := range ex.svcs {
			if s.Namespace == ns && s.Name == name {
				return s
			}
		}
		return nil
	}
	for _, ref := range rt.Spec.ParentRefs {
		if ref.Kind != nil && *ref.Kind == "Service" {
			ns := rt.Namespace
			if ref.Namespace != nil {
				ns = string(*ref.Namespace)
			}
			r.svc = svcByName(ns, string(ref.Name))
			if r.svc != nil && len(r.svc.Spec.Ports) > 0 && r.svc.Spec.ClusterIP != "" {
				port := r.svc.Spec.Ports[0].Port
				if ref.Port != nil {
					port = int32(*ref.Port)
				}
				r.addr = net.JoinHostPort(r.svc.Spec.ClusterIP, strconv.Itoa(int(port)))
				break
			}
		}
	}
	if r.addr == "" {
		return nil, fmt.Errorf("HTTPRoute %s/%s: no parent Service with a cluster IP in the examples", rt.Namespace, rt.Name)
	}
	r.host = r.svc.Name + "." + r.svc.Namespace + ".svc.cluster.local"
	r.sent = 200
	for _, rule := range rt.Spec.Rules {
		if len(rule.BackendRefs) > 1 {
			r.sent = 1000 // a split: enough requests to measure it
		}
		for _, ref := range rule.BackendRefs {
			b := backend{name: string(ref.Name), weight: 1}
			if ref.Weight != nil {
				b.weight = *ref.Weight
			}
			if s := svcByName(rt.Namespace, b.name); s != nil {
				sel := labels.SelectorFromSet(s.Spec.Selector)
				for _, p := range ex.pods {
					if p.obj.Namespace == s.Namespace && sel.Matches(labels.Set(p.obj.Labels)) {
						b.pods = append(b.pods, p)
						if p.http != nil {
							r.served[p] = [2]uint64{}
						}
					}
				}
			}
			r.backends = append(r.backends, b)
		}
	}
	return r, nil
}

// send makes the route's requests from client over kept-alive connections,
// four at a time (one at a time on a route with retries: the flaky backend
// fails every second request it gets, so a sequential client's retry lands on
// a success, as against replicas of which some fail; concurrent requests
// would interleave and may all land on failures), and counts codes and
// answering backends.
func (r *routeRun) send(ctx context.Context, client *pod) {
	workers := 4
	for _, rule := range r.route.Spec.Rules {
		if rule.Retry != nil {
			workers = 1
		}
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return client.net.NS.Dial(ctx, nil, network, r.addr)
		},
		MaxIdleConnsPerHost: 4,
	}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	owner := map[string]string{} // pod name -> backend
	for _, b := range r.backends {
		for _, p := range b.pods {
			owner[p.obj.Name] = b.name
		}
	}
	var mu sync.Mutex // guards r's counters
	work := make(chan int)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				code, from, err := get(ctx, hc, fmt.Sprintf("http://%s/%s/%d", r.host, r.route.Name, i))
				mu.Lock()
				if err != nil {
					r.errs++
					if r.firstErr == nil {
						r.firstErr = err
					}
				} else {
					r.codes[code]++
					if code == http.StatusOK {
						r.by[owner[from]]++
					}
				}
				mu.Unlock()
			}
		}()
	}
	for i := range r.sent {
		work <- i
	}
	close(work)
	wg.Wait()
}

func get(ctx context.Context, hc *http.Client, url string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Ambit-App"), nil
}

func (r *routeRun) codeSummary() string {
	var parts []string
	for _, c := range slices.Sorted(maps.Keys(r.codes)) {
		parts = append(parts, fmt.Sprintf("%d x%d", c, r.codes[c]))
	}
	if r.errs > 0 {
		parts = append(parts, fmt.Sprintf("failed x%d (%s)", r.errs, shortErr(r.firstErr)))
	}
	return strings.Join(parts, ", ")
}
