package app

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
)

// Pod annotations that make a pod's workload the HTTP server (HTTP) instead
// of the echo (Server): the kubelet stand-in and the demo read them.
const (
	// AnnotationProtocol "http" selects HTTP.
	AnnotationProtocol = "app.ambit.dev/protocol"
	// AnnotationFailRatio is HTTP.FailRatio ("0.5").
	AnnotationFailRatio = "app.ambit.dev/fail-ratio"
	// AnnotationDelay is HTTP.Delay (a Go duration, "2s").
	AnnotationDelay = "app.ambit.dev/delay"
)

// HTTPFromAnnotations returns the HTTP server a pod's annotations ask for,
// named name, or nil when they ask for the echo.
func HTTPFromAnnotations(name string, annotations map[string]string) (*HTTP, error) {
	if annotations[AnnotationProtocol] != "http" {
		return nil, nil
	}
	h := &HTTP{Name: name}
	if v := annotations[AnnotationFailRatio]; v != "" {
		r, err := strconv.ParseFloat(v, 64)
		if err != nil || r < 0 || r > 1 {
			return nil, fmt.Errorf("annotation %s=%q: want a ratio in [0, 1]", AnnotationFailRatio, v)
		}
		h.FailRatio = r
	}
	if v := annotations[AnnotationDelay]; v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return nil, fmt.Errorf("annotation %s=%q: want a duration", AnnotationDelay, v)
		}
		h.Delay = d
	}
	return h, nil
}

// HTTP is the workload of L7 scenarios: an HTTP/1.1 server answering every
// request with 200 and the body
//
//	ambit-app <name> peer=<ip:port>\n
//
// (header X-Ambit-App: <name>), so a client behind a proxy can tell which
// backend answered. It also serves gRPC (grpc.health.v1.Health) to
// connections opening with the HTTP/2 preface: see grpc.go. FailRatio makes it a flaky backend; Delay a slow one.
// The zero value is usable; Serve may be called once.
type HTTP struct {
	// Name identifies the server in its answers (usually the pod name).
	Name string
	// FailRatio is the fraction of requests answered 503, spread evenly and
	// deterministically: request n (from 1) fails when floor(n*r) >
	// floor((n-1)*r), so 0.5 fails every second request. A client retrying
	// sequentially then always succeeds on a retry, as against several
	// replicas of which some fail; concurrent clients interleave.
	FailRatio float64
	// Delay holds each answer back (until the request is cancelled).
	Delay time.Duration
	// Logger receives errors; nil discards them.
	Logger *slog.Logger

	served, failed atomic.Uint64

	mu     sync.Mutex // guards srv, split, grpc, closed
	srv    *http.Server
	split  *splitListener // HTTP/2-preface connections to grpc (grpc.go)
	grpc   *grpc.Server
	closed bool
}

// CountsPath answers GET with the server's counts as JSON,
// {"served":n,"failed":m}, without counting itself: a test reads a mirror's
// received requests there (from inside the pod).
const CountsPath = "/ambit/counts"

// ServeHTTP answers one request.
func (h *HTTP) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == CountsPath && r.Method == http.MethodGet {
		served, failed := h.Counts()
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"served":%d,"failed":%d}`+"\n", served, failed)
		return
	}
	n := h.served.Add(1)
	if h.Delay > 0 {
		t := time.NewTimer(h.Delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	w.Header().Set("X-Ambit-App", h.Name)
	if h.fails(n) {
		h.failed.Add(1)
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintf(w, "ambit-app %s failing request %d on purpose\n", h.Name, n)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprintf(w, "ambit-app %s peer=%s\n", h.Name, r.RemoteAddr)
}

func (h *HTTP) fails(n uint64) bool {
	if h.FailRatio <= 0 {
		return false
	}
	return uint64(float64(n)*h.FailRatio) > uint64(float64(n-1)*h.FailRatio)
}

// Counts returns how many requests the server received and how many of
// them it failed on purpose.
func (h *HTTP) Counts() (served, failed uint64) {
	return h.served.Load(), h.failed.Load()
}

// Serve answers HTTP on ln until Close. It returns nil after Close.
func (h *HTTP) Serve(ln net.Listener) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		ln.Close()
		return nil
	}
	h.srv = &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(logger(h.Logger).Handler(), slog.LevelDebug)}
	h.split, h.grpc = newSplitListener(ln), h.newGRPC()
	srv, split, gs := h.srv, h.split, h.grpc
	h.mu.Unlock()
	gerr := make(chan error, 1)
	go func() { gerr <- serveGRPC(gs, split.h2) }()
	err := srv.Serve(split.h1)
	gs.Stop()
	split.Close()
	if err := <-gerr; err != nil {
		return fmt.Errorf("app grpc %s: %w", h.Name, err)
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("app http %s: %w", h.Name, err)
	}
	return nil
}

// Close stops the server and its connections. It is idempotent.
func (h *HTTP) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	if h.srv == nil {
		return nil
	}
	err := h.srv.Close()
	h.grpc.Stop()
	h.split.Close()
	return err
}
