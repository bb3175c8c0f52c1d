package kubelet

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

// Stream timeouts of the kubelet API (a kubelet's defaults).
const (
	streamIdleTimeout     = 4 * time.Hour
	streamCreationTimeout = remotecommand.DefaultStreamCreationTimeout
)

// api is the kubelet API the API server proxies pods/exec, pods/portforward
// and pods/log to.
type api struct {
	k   *Kubelet
	log *slog.Logger
}

// serveAPI serves the kubelet API on ln with k.TLS until ctx ends.
func (k *Kubelet) serveAPI(ctx context.Context, ln net.Listener, log *slog.Logger) error {
	a := &api{k: k, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/exec/{namespace}/{pod}/{container}", a.exec)
	mux.HandleFunc("/portForward/{namespace}/{pod}", a.portForward)
	mux.HandleFunc("GET /containerLogs/{namespace}/{pod}/{container}", a.containerLogs)
	srv := &http.Server{
		Handler:           a.authorize(mux),
		TLSConfig:         k.TLS.Clone(),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		// SPDY upgrades need HTTP/1.1.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(tls.NewListener(ln, srv.TLSConfig)) }()
	select {
	case <-ctx.Done():
		srv.Close()
		<-errc
		return nil
	case err := <-errc:
		return fmt.Errorf("kubelet api: %w", err)
	}
}

// authorize lets a request through when its verified client certificate's
// user may use this node's proxy subresource (a SubjectAccessReview, as a
// kubelet with webhook authorization asks; the API server's kubelet client is
// bound to system:kubelet-api-admin).
func (a *api) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		cert := r.TLS.PeerCertificates[0]
		verb := map[string]string{http.MethodGet: "get", http.MethodHead: "get", http.MethodPost: "create",
			http.MethodPut: "update", http.MethodPatch: "patch", http.MethodDelete: "delete"}[r.Method]
		if verb == "" {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		sar, err := a.k.Client.AuthorizationV1().SubjectAccessReviews().Create(r.Context(), &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{
				User:   cert.Subject.CommonName,
				Groups: cert.Subject.Organization,
				ResourceAttributes: &authorizationv1.ResourceAttributes{
					Verb: verb, Resource: "nodes", Subresource: "proxy", Name: a.k.Node.Name,
				},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			http.Error(w, "authorization: "+err.Error(), http.StatusInternalServerError)
			return
		}
		if !sar.Status.Allowed {
			a.log.Warn("kubelet api: forbidden", "user", cert.Subject.CommonName, "verb", verb, "path", r.URL.Path)
			http.Error(w, fmt.Sprintf("Forbidden (user=%s, verb=%s, resource=nodes, subresource=proxy)", cert.Subject.CommonName, verb), http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// lookup returns the running pod namespace/name and the container's spec
// (nil for an in-process workload), or writes a 404.
func (a *api) lookup(w http.ResponseWriter, r *http.Request, withContainer bool) (*running, string, bool) {
	key := r.PathValue("namespace") + "/" + r.PathValue("pod")
	a.k.mu.Lock()
	rp := a.k.pods[key]
	a.k.mu.Unlock()
	if rp == nil {
		http.Error(w, "pod "+key+" is not running on node "+a.k.Node.Name, http.StatusNotFound)
		return nil, "", false
	}
	c := r.PathValue("container")
	if withContainer && !slices.Contains(rp.containers, c) {
		http.Error(w, "container "+c+" is not in pod "+key, http.StatusNotFound)
		return nil, "", false
	}
	return rp, c, true
}

func (a *api) exec(w http.ResponseWriter, r *http.Request) {
	rp, container, ok := a.lookup(w, r, true)
	if !ok {
		return
	}
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	cmd := r.URL.Query()["command"]
	remotecommand.ServeExec(w, r, &executor{k: a.k, p: rp}, rp.key, string(rp.uid), container, cmd, opts,
		streamIdleTimeout, streamCreationTimeout, remotecommand.SupportedStreamingProtocols)
}

func (a *api) portForward(w http.ResponseWriter, r *http.Request) {
	rp, _, ok := a.lookup(w, r, false)
	if !ok {
		return
	}
	opts, err := portforward.NewV4Options(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	portforward.ServePortForward(w, r, &forwarder{k: a.k, p: rp}, rp.key, string(rp.uid), opts,
		streamIdleTimeout, streamCreationTimeout, portforward.SupportedProtocols)
}

// containerLogs serves a container's log: tailLines, limitBytes and follow
// (until the client goes away or the pod stops). Lines carry no
// timestamps of their own; timestamps=true is ignored.
func (a *api) containerLogs(w http.ResponseWriter, r *http.Request) {
	rp, container, ok := a.lookup(w, r, true)
	if !ok {
		return
	}
	q := r.URL.Query()
	path := a.k.LogFile(rp.key, container)
	f, err := os.Open(path)
	if err != nil {
		http.Error(w, "log of "+rp.key+"/"+container+": "+err.Error(), http.StatusNotFound)
		return
	}
	defer f.Close()
	limit := int64(-1)
	if v := q.Get("limitBytes"); v != "" {
		if limit, err = strconv.ParseInt(v, 10, 64); err != nil || limit <= 0 {
			http.Error(w, "bad limitBytes", http.StatusBadRequest)
			return
		}
	}
	var start int64
	if v := q.Get("tailLines"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			http.Error(w, "bad tailLines", http.StatusBadRequest)
			return
		}
		if start, err = tailOffset(f, n); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
	}
	if _, err := f.Seek(start, io.SeekStart); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	var out io.Writer = w
	lw := &limitWriter{w: w, n: limit}
	if limit > 0 {
		out = lw
	}
	flush := func() {
		if fl, ok := w.(http.Flusher); ok {
			fl.Flush()
		}
	}
	if _, err := io.Copy(out, f); err != nil || lw.full() || q.Get("follow") != "true" {
		return
	}
	flush()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-rp.stopped:
			io.Copy(out, f)
			return
		case <-tick.C:
		}
		n, err := io.Copy(out, f)
		if err != nil || lw.full() {
			return
		}
		if n > 0 {
			flush()
		}
	}
}

// tailOffset returns the offset of the last n lines of f.
func tailOffset(f *os.File, n int) (int64, error) {
	b, err := io.ReadAll(f)
	if err != nil {
		return 0, err
	}
	end := len(b)
	if end > 0 && b[end-1] == '\n' {
		end--
	}
	for i := 0; i < n; i++ {
		j := bytes.LastIndexByte(b[:end], '\n')
		if j < 0 {
			return 0, nil
		}
		end = j
	}
	if n == 0 {
		return int64(len(b)), nil
	}
	return int64(end + 1), nil
}

// limitWriter writes at most n bytes (n < 0: no limit).
type limitWriter struct {
	w io.Writer
	n int64
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if l.n >= 0 && int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.w.Write(p)
	if l.n >= 0 {
		l.n -= int64(n)
	}
	return n, err
}

func (l *limitWriter) full() bool { return l.n == 0 }

// executor runs exec'd commands in a pod's namespaces.
type executor struct {
	k *Kubelet
	p *running
}

func (e *executor) ExecInContainer(ctx context.Context, _, _ string, container string, argv []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, _ time.Duration) error {
	if len(argv) == 0 {
		return errors.New("no command")
	}
	cmd := exec.CommandContext(ctx, "nsenter", append(e.p.nsenterArgs(e.k), argv...)...)
	cmd.Env = e.p.env(container)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: !tty, Setsid: tty, Setctty: tty, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = time.Second
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGKILL) }
	if tty {
		return runTTY(cmd, in, out, resize)
	}
	if out != nil {
		cmd.Stdout = out
	}
	if errw != nil {
		cmd.Stderr = errw
	}
	var stdin io.WriteCloser
	if in != nil {
		var err error
		if stdin, err = cmd.StdinPipe(); err != nil {
			return err
		}
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	if stdin != nil {
		go func() {
			io.Copy(stdin, in)
			stdin.Close()
		}()
	}
	return exitError(cmd.Wait())
}

// exitError makes a command's exit status the remotecommand protocol's
// (a non-zero exit code is reported as such, not as an internal error).
func exitError(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return &utilexec.ExitErrorWrapper{ExitError: ee}
	}
	return err
}

// forwarder connects port-forward streams to a port on the pod's loopback.
type forwarder struct {
	k *Kubelet
	p *running
}

func (f *forwarder) PortForward(ctx context.Context, _, _ string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	ns := f.k.Node.NS
	if f.p.net != nil {
		ns = f.p.net.NS
	}
	c, err := ns.Dial(ctx, &net.Dialer{Timeout: 5 * time.Second}, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil {
		return fmt.Errorf("port-forward to %s port %d: %w", f.p.key, port, err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(c, stream)
		if tc, ok := c.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}()
	_, err = io.Copy(stream, c)
	stream.Close()
	c.Close()
	wg.Wait()
	return err
}

// nsenterArgs are nsenter's arguments (up to "--") that join the pod's
// network and UTS namespaces (a hostNetwork pod's: the node's network).
func (r *running) nsenterArgs(k *Kubelet) []string {
	if r.net == nil {
		if r.mnt != "" {
			return []string{"--net=" + k.Node.NS.Path(), "--mount=" + r.mnt, "--"}
		}
		return []string{"--net=" + k.Node.NS.Path(), "--"}
	}
	args := []string{"--net=" + r.net.NS.Path()}
	if r.uts != "" {
		args = append(args, "--uts="+r.uts)
	}
	if r.mnt != "" {
		args = append(args, "--mount="+r.mnt)
	}
	return append(args, "--")
}

// env is the environment of commands exec'd in container: the container's
// own when it runs from an image mapping, else a default PATH.
func (r *running) env(container string) []string {
	if s := r.specs[container]; s != nil {
		return s.env
	}
	return []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "HOSTNAME=" + r.name}
}

// podRef names a pod in the running table.
type podRef struct {
	key  string    // namespace/name
	name string    // the pod's name
	uid  types.UID // the pod's UID
}
