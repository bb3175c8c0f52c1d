// Package configfile reads ambit's config model from a local file (local
// mode: no control plane) and keeps a model.Store in step with it. The file
// is JSON or YAML with the model's field names:
//
//	workloads:           [model.Workload...]
//	services:            [model.Service...]
//	policies:            [model.Policy...]           # L4 AuthorizationPolicies
//	peerAuthentications: [model.PeerAuthentication...]
//
// A file that fails to read or parse leaves the store as it was (the last
// good config keeps serving) and is retried when it changes again. Writers
// should replace the file atomically (write a temporary file, rename it).
package configfile

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/model"
)

// File is the file's schema.
type File struct {
	Workloads           []*model.Workload           `json:"workloads,omitempty"`
	Services            []*model.Service            `json:"services,omitempty"`
	Policies            []*model.Policy             `json:"policies,omitempty"`
	PeerAuthentications []*model.PeerAuthentication `json:"peerAuthentications,omitempty"`
}

// Parse decodes a JSON or YAML config, rejecting unknown fields and
// resources without a key. An empty file is an error (most likely one being
// written); an empty config is "{}".
func Parse(data []byte) (*model.Snapshot, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errors.New("parse config: empty file")
	}
	var f File
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		return nil, fmt.Errorf("parse config: %w", err)
	}
	for i, w := range f.Workloads {
		if w == nil || w.UID == "" {
			return nil, fmt.Errorf("parse config: workload %d has no uid", i)
		}
	}
	for i, s := range f.Services {
		if s == nil || s.Hostname == "" || s.Namespace == "" {
			return nil, fmt.Errorf("parse config: service %d needs namespace and hostname", i)
		}
	}
	for i, p := range f.Policies {
		if p == nil || p.Name == "" || p.Namespace == "" {
			return nil, fmt.Errorf("parse config: policy %d needs namespace and name", i)
		}
		switch p.Action {
		case model.ActionAllow, model.ActionDeny, "":
		default:
			return nil, fmt.Errorf("parse config: policy %s: unknown action %q", p.Key(), p.Action)
		}
	}
	for i, p := range f.PeerAuthentications {
		if p == nil || p.Name == "" || p.Namespace == "" {
			return nil, fmt.Errorf("parse config: peerAuthentication %d needs namespace and name", i)
		}
		switch p.Mode {
		case model.MTLSUnset, model.MTLSStrict, model.MTLSPermissive, model.MTLSDisable:
		default:
			return nil, fmt.Errorf("parse config: peerAuthentication %s: unknown mode %q", p.Key(), p.Mode)
		}
	}
	return model.NewSnapshot(f.Workloads, f.Services, f.Policies, f.PeerAuthentications), nil
}

// Load reads and parses the file at path.
func Load(path string) (*model.Snapshot, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(data)
}

// Watcher keeps Store in step with the file at Path. Path and Store are
// required.
type Watcher struct {
	Path  string
	Store *model.Store
	// Interval is how often the file is checked (1s if zero).
	Interval time.Duration
	// Logger (nil: discard).
	Logger *slog.Logger
	// OnError, if set, is called on Run's goroutine with every reload that
	// failed (the file could not be read or parsed), after the failure is
	// final: the store still holds the last good config. It is called again
	// at each check while the file stays broken, and must not block for
	// long. Nil: failures are only logged.
	OnError func(error)

	loaded bool     // a config was installed; Run's goroutine only
	sum    [32]byte // of the installed file's content
}

// LoadOnce installs the file's config into the store; it fails if the file
// cannot be read or parsed (the store is then unchanged).
func (w *Watcher) LoadOnce() error {
	data, err := os.ReadFile(w.Path)
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	sum := sha256.Sum256(data)
	if w.loaded && bytes.Equal(sum[:], w.sum[:]) {
		return nil
	}
	snap, err := Parse(data)
	if err != nil {
		return err
	}
	w.Store.Replace(snap)
	w.loaded, w.sum = true, sum
	w.logger().Info("config loaded", "path", w.Path, "workloads", len(snap.Workloads),
		"services", len(snap.Services), "policies", len(snap.Policies), "peerAuthentications", len(snap.PeerAuthn))
	return nil
}

// Run loads the file, then reloads it whenever its content changes, until
// ctx ends. A first load that fails is returned as an error; later failures
// are logged and the last good config stays.
func (w *Watcher) Run(ctx context.Context) error {
	if w.Path == "" || w.Store == nil {
		return errors.New("configfile: Path and Store are required")
	}
	if err := w.LoadOnce(); err != nil {
		return err
	}
	interval := w.Interval
	if interval <= 0 {
		interval = time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if err := w.LoadOnce(); err != nil {
			if w.OnError != nil {
				w.OnError(err)
			}
			if err.Error() != lastErr {
				w.logger().Error("config reload failed; keeping the last good config", "path", w.Path, "err", err)
			}
			lastErr = err.Error()
			continue
		}
		lastErr = ""
	}
}

func (w *Watcher) logger() *slog.Logger {
	if w.Logger != nil {
		return w.Logger
	}
	return slog.New(slog.DiscardHandler)
}
