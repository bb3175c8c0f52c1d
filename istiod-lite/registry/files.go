package registry

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

// Files builds the model from a directory of YAML (or JSON) files holding the
// same objects as Kubernetes would (Namespaces, Pods with status.podIP and
// spec.nodeName, Services, AuthorizationPolicies...), for local mode and for
// plain hosts and VMs. It re-reads the directory when a file changes (polled:
// no inotify dependency). A file that does not parse keeps its last good
// objects and is logged; it never empties the model.
type Files struct {
	Dir     string
	Store   *model.Store
	Options translate.Options
	Logger  *slog.Logger // may be nil
	// Interval between checks for changed files (default 1s).
	Interval time.Duration
	// Reporter receives the objects translation rejects (default: the log).
	Reporter Reporter
	// OnError, if set, is called on Start's goroutine with each file a
	// reload rejected (the error names it; its last good objects are kept
	// in the model) and each failure to read the directory (the last model
	// stays). A reload happens when the directory changes, so a file that
	// stays broken is reported once. It must not block for long. Nil:
	// failures are only logged.
	OnError func(error)

	good   map[string][]any // Start's goroutine only: last good objects per file
	once   sync.Once
	synced chan struct{} // closed after the first model is published
}

// Synced is closed when the first model is in the store.
func (f *Files) Synced() <-chan struct{} {
	f.once.Do(func() { f.synced = make(chan struct{}) })
	return f.synced
}

// Start loads the directory, publishes the model, and reloads it on changes
// until ctx ends. It fails if the directory cannot be read at start.
func (f *Files) Start(ctx context.Context) error {
	log := f.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := newBuilder(f.Store, f.Options, log, f.Reporter)
	f.Synced()
	b.published = f.synced
	interval := f.Interval
	if interval <= 0 {
		interval = time.Second
	}
	f.good = map[string][]any{}
	sum, err := f.fingerprint()
	if err != nil {
		return fmt.Errorf("files: %w", err)
	}
	b.replace(f.load(log))
	ready := make(chan struct{})
	close(ready)
	done := make(chan struct{})
	go func() { defer close(done); b.run(ctx, ready) }()
	defer func() { <-done }()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		s, err := f.fingerprint()
		if err != nil {
			log.Error("config directory unreadable; keeping the last model", "dir", f.Dir, "error", err)
			f.onError(fmt.Errorf("files: %w", err))
			continue
		}
		if bytes.Equal(s, sum) {
			continue
		}
		sum = s
		log.Info("config directory changed; reloading", "dir", f.Dir)
		b.replace(f.load(log))
	}
}

func (f *Files) files() ([]string, error) {
	var out []string
	err := filepath.WalkDir(f.Dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if p != f.Dir && strings.HasPrefix(d.Name(), ".") {
				return filepath.SkipDir // e.g. Kubernetes ConfigMap mounts' ..data
			}
			return nil
		}
		switch filepath.Ext(p) {
		case ".yaml", ".yml", ".json":
			out = append(out, p)
		}
		return nil
	})
	slices.Sort(out)
	return out, err
}

// fingerprint hashes the files' names, sizes and modification times.
func (f *Files) fingerprint() ([]byte, error) {
	files, err := f.files()
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	for _, p := range files {
		st, err := os.Stat(p)
		if err != nil {
			continue
		}
		fmt.Fprintf(h, "%s\x00%d\x00%d\n", p, st.Size(), st.ModTime().UnixNano())
	}
	return h.Sum(nil), nil
}

// load decodes every file; a file that fails keeps its previous objects.
func (f *Files) load(log *slog.Logger) []any {
	files, err := f.files()
	if err != nil {
		log.Error("config directory unreadable", "dir", f.Dir, "error", err)
		f.onError(fmt.Errorf("files: %w", err))
	}
	seen := map[string]bool{}
	var all []any
	for _, p := range files {
		seen[p] = true
		objs, err := decodeFile(p)
		if err != nil {
			log.Error("config file rejected; keeping its last good objects", "file", p, "error", err)
			f.onError(fmt.Errorf("config file %s: %w", p, err))
			objs = f.good[p]
		} else {
			f.good[p] = objs
		}
		all = append(all, objs...)
	}
	for p := range f.good {
		if !seen[p] {
			delete(f.good, p)
		}
	}
	return all
}

func (f *Files) onError(err error) {
	if f.OnError != nil {
		f.OnError(err)
	}
}

func decodeFile(p string) ([]any, error) {
	r, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	objs, _, err := translate.Decode(r)
	return objs, err
}
