package ambitctl

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/telemetry"
)

// waypointPodSelector selects the waypoint pods istiod-lite deploys.
const waypointPodSelector = "gateway.istio.io/managed=istio.io-mesh-controller"

type flowsFlags struct {
	addresses []string
	node      string
	filter    telemetry.FlowFilter
	follow    bool
	last      int
	waypoints bool
	output    string
}

func newFlowsCommand(g *globalFlags) *cobra.Command {
	f := &flowsFlags{}
	cmd := &cobra.Command{
		Use:   "flows",
		Short: "Show the connections (and waypoint requests) flowing through the mesh, live",
		Long: `flows reads the flow events of every ztunnel (and, with --waypoints, every
waypoint): one event when a connection opens, one when it closes (or is
refused), one per request at a waypoint, each with source and destination
(address, pod, workload, namespace, identity), the verdict and the policy that
decided it, response flags, bytes, duration and transport.

The proxies filter on their side (--namespace, --pod, --verdict, --identity),
so only matching events cross the network. Without --follow it prints each
proxy's recent events (--last per proxy) merged by time; with --follow it keeps
streaming. A reader that falls behind loses events, never slows the proxies: a
line says how many were lost.

In a cluster it port-forwards to each proxy's admin port through the API
server; --address reads host:port directly (repeat it for several proxies).`,
		Example: `  # denied connections anywhere in the mesh, as they happen
  ambitctl flows --verdict denied -f

  # the traffic of one pod, as JSON lines
  ambitctl flows --namespace shop --pod reviews-v1-5d8f -f -o json

  # a ztunnel run on a host or in local mode
  ambitctl flows --address 127.0.0.1:15000 --last 50`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runFlows(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), g, f)
		},
	}
	fl := cmd.Flags()
	fl.StringArrayVar(&f.addresses, "address", nil, "a proxy's admin API host:port, read directly without Kubernetes (repeatable)")
	fl.StringVar(&f.node, "node", "", "only the proxies of this node")
	fl.StringVarP(&f.filter.Namespace, "namespace", "n", "", "only flows from or to this namespace")
	fl.StringVar(&f.filter.Pod, "pod", "", "only flows from or to this pod or workload (NAME or NAMESPACE/NAME)")
	fl.StringVar(&f.filter.Verdict, "verdict", "", "only flows with this verdict: allowed, denied or failed")
	fl.StringVar(&f.filter.Identity, "identity", "", "only flows from or to this SPIFFE ID")
	fl.StringVar(&f.filter.Type, "type", "", "only events of this type: open, close or request")
	fl.BoolVarP(&f.follow, "follow", "f", false, "keep streaming new flows")
	fl.IntVar(&f.last, "last", 20, "recent flows to show first, per proxy")
	fl.BoolVar(&f.waypoints, "waypoints", true, "read the waypoints' request flows too (cluster mode)")
	fl.StringVarP(&f.output, "output", "o", "table", "output format: table or json (one JSON object per line)")
	return cmd
}

// flowSource is one proxy's flow stream.
type flowSource struct {
	what string
	open func(ctx context.Context) (*admin, error)
}

func runFlows(ctx context.Context, out, errOut io.Writer, g *globalFlags, f *flowsFlags) error {
	switch f.output {
	case "", "table", "json":
	default:
		return fmt.Errorf("unknown output format %q: use -o table or json", f.output)
	}
	q := f.filter.Query()
	if _, err := telemetry.ParseFlowFilter(q); err != nil {
		return err
	}
	if f.last < 0 {
		return errors.New("--last: want a count")
	}
	q.Set("last", strconv.Itoa(f.last))
	if f.follow {
		q.Set("follow", "true")
	}
	sources, err := f.sources(ctx, g)
	if err != nil {
		return err
	}
	p := &flowPrinter{w: out, json: f.output == "json"}
	events := make(chan telemetry.Flow, 256)
	errs := make(chan error, len(sources))
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, s := range sources {
		wg.Go(func() { errs <- streamFlows(ctx, s, "/debug/flows?"+q.Encode(), events) })
	}
	go func() {
		wg.Wait()
		close(events)
	}()
	var batch []telemetry.Flow
	for fl := range events {
		switch {
		case fl.Type == telemetry.FlowHello:
		case f.follow:
			if err := p.print(fl); err != nil {
				return err
			}
		default:
			batch = append(batch, fl)
		}
	}
	slices.SortStableFunc(batch, func(a, b telemetry.Flow) int { return a.Time.Compare(b.Time) })
	for _, fl := range batch {
		if err := p.print(fl); err != nil {
			return err
		}
	}
	close(errs)
	var failed []error
	for err := range errs {
		if err != nil {
			failed = append(failed, err)
		}
	}
	if len(failed) == len(sources) {
		return errors.Join(failed...)
	}
	for _, err := range failed {
		fmt.Fprintln(errOut, "warning:", err)
	}
	return nil
}

// sources are the proxies to read: --address, else the cluster's ztunnels
// (and waypoints).
func (f *flowsFlags) sources(ctx context.Context, g *globalFlags) ([]flowSource, error) {
	if len(f.addresses) > 0 {
		if f.node != "" {
			return nil, errors.New("--address reads proxies directly: no --node with it")
		}
		var out []flowSource
		for _, a := range f.addresses {
			out = append(out, flowSource{what: a, open: func(context.Context) (*admin, error) { return directAdmin(a) }})
		}
		return out, nil
	}
	c, err := g.cluster()
	if err != nil {
		return nil, err
	}
	var pods []corev1.Pod
	zl, err := c.kube.CoreV1().Pods(controlPlaneNamespace).List(ctx, metav1.ListOptions{LabelSelector: ztunnelSelector})
	if err != nil {
		return nil, c.explain("list ztunnel pods", err)
	}
	pods = append(pods, zl.Items...)
	if f.waypoints {
		wl, err := c.kube.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{LabelSelector: waypointPodSelector})
		if err != nil {
			return nil, c.explain("list waypoint pods", err)
		}
		pods = append(pods, wl.Items...)
	}
	var out []flowSource
	for i := range pods {
		p := &pods[i]
		if p.Status.Phase != corev1.PodRunning || (f.node != "" && p.Spec.NodeName != f.node) {
			continue
		}
		out = append(out, flowSource{what: "pod " + p.Namespace + "/" + p.Name,
			open: func(ctx context.Context) (*admin, error) { return c.podAdmin(ctx, p, proxyAdminPort) }})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no running ztunnel or waypoint pod (namespace %s, selector %s): is ambit installed? (ambitctl check)", controlPlaneNamespace, ztunnelSelector)
	}
	return out, nil
}

// streamFlows reads one proxy's flows into events until the stream or ctx
// ends.
func streamFlows(ctx context.Context, s flowSource, path string, events chan<- telemetry.Flow) error {
	a, err := s.open(ctx)
	if err != nil {
		return err
	}
	defer a.close()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.base+path, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", a.what, err)
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("cannot reach the admin API of %s: %w", a.what, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return fmt.Errorf("%s: GET /debug/flows: %s: %s (an ambit proxy of an older version?)", a.what, resp.Status, strings.TrimSpace(string(body)))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var fl telemetry.Flow
		if err := json.Unmarshal(sc.Bytes(), &fl); err != nil {
			return fmt.Errorf("%s: not a flow: %w", a.what, err)
		}
		if fl.Node == "" {
			fl.Node = a.what
		}
		select {
		case events <- fl:
		case <-ctx.Done():
			return nil
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return fmt.Errorf("%s: flows: %w", a.what, err)
	}
	return nil
}

// flowPrinter prints flows as aligned lines or JSON lines.
type flowPrinter struct {
	w      io.Writer
	json   bool
	header bool
}

func (p *flowPrinter) print(fl telemetry.Flow) error {
	if p.json {
		b, err := json.Marshal(fl)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(p.w, "%s\n", b)
		return err
	}
	if !p.header {
		p.header = true
		if _, err := fmt.Fprintf(p.w, "%-12s %-10s %-11s %-7s %-40s %-40s %-8s %-20s %s\n",
			"TIME", "NODE", "REPORTER", "EVENT", "SOURCE", "DESTINATION", "VERDICT", "POLICY/FLAGS", "DETAIL"); err != nil {
			return err
		}
	}
	if fl.Type == telemetry.FlowLost {
		_, err := fmt.Fprintf(p.w, "%-12s %-10s %d events lost (the reader was too slow)\n", fl.Time.Format("15:04:05.000"), fl.Node, fl.Lost)
		return err
	}
	why := fl.Policy
	if fl.ResponseFlags != "" && fl.ResponseFlags != "-" {
		why = strings.Trim(why+" "+fl.ResponseFlags, " ")
	}
	detail := fmt.Sprintf("%s %dB> <%dB", fl.Transport, fl.BytesReceived, fl.BytesSent)
	if fl.Type == telemetry.FlowRequest {
		detail = fmt.Sprintf("%s %s%s %d", fl.Method, fl.Authority, fl.Path, fl.ResponseCode)
	}
	if fl.Type != telemetry.FlowOpen {
		detail += " " + (time.Duration(fl.DurationMs * float64(time.Millisecond))).Round(time.Microsecond).String()
	}
	if fl.Reason != "" && fl.Verdict != telemetry.VerdictAllowed {
		detail += " (" + fl.Reason + ")"
	}
	_, err := fmt.Fprintf(p.w, "%-12s %-10s %-11s %-7s %-40s %-40s %-8s %-20s %s\n", fl.Time.Format("15:04:05.000"), fl.Node,
		fl.Reporter, fl.Type, flowEnd(fl.Source), flowEnd(fl.Destination), fl.Verdict, cmp.Or(why, "-"), detail)
	return err
}

// flowEnd names one end: namespace/pod (or workload), else its address,
// with its address when known.
func flowEnd(p telemetry.FlowPeer) string {
	name := cmp.Or(p.Pod, p.Workload)
	switch {
	case name != "" && p.Address != "":
		return p.Namespace + "/" + name + " (" + p.Address + ")"
	case name != "":
		return p.Namespace + "/" + name
	}
	return cmp.Or(p.Address, "-")
}
