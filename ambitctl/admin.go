package ambitctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

// Admin ports of the proxies and of istiod-lite (all bound to localhost in
// their pods).
const (
	proxyAdminPort   = 15000 // ztunnel and waypoint
	istiodAdminPort  = 15014
	adminHTTPTimeout = 30 * time.Second
)

// admin is an HTTP client of one admin endpoint, reached directly or
// through a port-forward that close ends.
type admin struct {
	base   string // http://host:port
	what   string // for errors: "ztunnel pod ambit-system/ztunnel-abc" or "127.0.0.1:15000"
	hc     *http.Client
	closer func()
}

func (a *admin) close() {
	if a.closer != nil {
		a.closer()
	}
}

// get reads path's JSON into v.
func (a *admin) get(ctx context.Context, path string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, adminHTTPTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.base+path, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", a.what, err)
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) {
			return fmt.Errorf("cannot reach the admin API of %s (is the address right and the proxy running?): %w", a.what, err)
		}
		return fmt.Errorf("%s: %w", a.what, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return fmt.Errorf("%s: read %s: %w", a.what, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: GET %s: %s: %s (is this the right kind of proxy?)", a.what, path, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%s: GET %s: not the expected JSON: %w", a.what, path, err)
	}
	return nil
}

// directAdmin reaches host:port without Kubernetes.
func directAdmin(address string) (*admin, error) {
	if _, _, err := net.SplitHostPort(address); err != nil {
		return nil, fmt.Errorf("--address %q: want host:port: %w", address, err)
	}
	return &admin{base: "http://" + address, what: address, hc: &http.Client{}}, nil
}

// podAdmin port-forwards through the API server (pods/portforward, SPDY)
// to port in pod and returns a client of the forwarded port.
func (c *cluster) podAdmin(ctx context.Context, pod *corev1.Pod, port int) (*admin, error) {
	what := "pod " + pod.Namespace + "/" + pod.Name
	if pod.Status.Phase != corev1.PodRunning {
		return nil, fmt.Errorf("%s is %s, not Running: its admin API cannot be reached", what, pod.Status.Phase)
	}
	rt, upgrader, err := spdy.RoundTripperFor(c.cfg)
	if err != nil {
		return nil, fmt.Errorf("port-forward to %s: %w", what, err)
	}
	u, err := url.Parse(c.kube.CoreV1().RESTClient().Post().Resource("pods").
		Namespace(pod.Namespace).Name(pod.Name).SubResource("portforward").URL().String())
	if err != nil {
		return nil, fmt.Errorf("port-forward to %s: %w", what, err)
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	stop, ready := make(chan struct{}), make(chan struct{})
	var errOut strings.Builder
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", port)}, stop, ready, io.Discard, &errOut)
	if err != nil {
		return nil, fmt.Errorf("port-forward to %s: %w", what, err)
	}
	done := make(chan error, 1)
	go func() { done <- fw.ForwardPorts() }()
	closer := func() {
		close(stop)
		<-done
	}
	select {
	case <-ready:
	case err := <-done:
		if err == nil {
			err = errors.New("forwarding ended before it was ready")
		}
		return nil, c.explain("port-forward to "+what+" on node "+orNone(pod.Spec.NodeName)+" (through the API server and the node's kubelet)", err)
	case <-ctx.Done():
		closer()
		return nil, fmt.Errorf("port-forward to %s: %w", what, ctx.Err())
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) == 0 {
		closer()
		return nil, fmt.Errorf("port-forward to %s: no local port: %v", what, err)
	}
	return &admin{
		base:   fmt.Sprintf("http://127.0.0.1:%d", ports[0].Local),
		what:   what,
		hc:     &http.Client{Transport: &http.Transport{DisableKeepAlives: true}},
		closer: closer,
	}, nil
}

// pickPod chooses one pod among those of namespace matching selector: the
// one named name, else the one on node, else the first running one by name.
// kind names them in errors ("ztunnel").
func (c *cluster) pickPod(ctx context.Context, kind, namespace, selector, name, node string) (*corev1.Pod, error) {
	if name != "" {
		p, err := c.kube.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, c.explain(fmt.Sprintf("get %s pod %s/%s", kind, namespace, name), err)
		}
		return p, nil
	}
	l, err := c.kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, c.explain(fmt.Sprintf("list %s pods in %s", kind, namespace), err)
	}
	pods := l.Items
	sort.Slice(pods, func(i, j int) bool { return pods[i].Name < pods[j].Name })
	var running []*corev1.Pod
	for i := range pods {
		p := &pods[i]
		if node != "" && p.Spec.NodeName != node {
			continue
		}
		if p.Status.Phase == corev1.PodRunning {
			running = append(running, p)
		}
	}
	switch {
	case len(running) > 0:
		return running[0], nil
	case node != "":
		return nil, fmt.Errorf("no running %s pod on node %s (namespace %s, selector %s)", kind, node, namespace, selector)
	default:
		return nil, fmt.Errorf("no running %s pod in namespace %s (selector %s): is ambit installed and ready? (ambitctl check)", kind, namespace, selector)
	}
}

// proxyTarget are the flags that choose a proxy's admin API.
type proxyTarget struct {
	address string
	node    string
}

func (t *proxyTarget) register(cmd *cobra.Command, what string, defaultAddr string) {
	cmd.Flags().StringVar(&t.address, "address", "", fmt.Sprintf("the %s admin API's host:port, read directly without Kubernetes (a host or local mode; default port %s)", what, defaultAddr))
}
