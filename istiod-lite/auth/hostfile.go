package auth

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultHostFileInterval is how often HostFile looks at its file.
const DefaultHostFileInterval = 2 * time.Second

// HostFile authenticates local-mode hosts and waypoints by a host
// credentials file (format: the package doc) and reloads it when its content
// changes, so that secrets rotate without a restart: from the reload on, a
// removed or replaced secret is refused and a new one accepted. A file that
// no longer parses is not taken: the last good credentials stay, and the
// error is logged until the file is fixed. A change is taken once it has
// been the same for one Interval, so that a file written in place is not
// read half-written; writing a temporary file and renaming it over is
// better still. A file that lists no credential is not taken either. A caller whose secret a reload
// removes or gives to another caller is revoked (Caller.Revoked is closed):
// istiod-lite ends its xDS streams.
//
// Call Load before serving, then run Start.
type HostFile struct {
	// Path of the credentials file (required).
	Path string
	// TrustDomain of waypoints' identities (identity.DefaultTrustDomain if
	// zero).
	TrustDomain spiffeid.TrustDomain
	// Interval between looks at the file (DefaultHostFileInterval if zero).
	Interval time.Duration
	// Logger (discard if nil).
	Logger *slog.Logger

	cur     atomic.Pointer[HostAuthenticator] // the credentials in force; nil before Load
	mu      sync.Mutex                        // guards sum, bad, missing and seen; serializes reloads
	sum     [sha256.Size]byte                 // of the content in force
	bad     [sha256.Size]byte                 // of the last content refused (logged once)
	missing bool                              // the file could not be read last time (logged once)
	seen    [sha256.Size]byte                 // of the content the last look found: taken when the next look finds it again
	loaded  atomic.Int64                      // successful loads, for tests and logs
}

// Load reads the file now; it fails when the file cannot be read or parsed
// (the credentials in force, if any, stay).
func (h *HostFile) Load() error {
	_, err := h.reload(false)
	return err
}

// Loads returns how many times the credentials were (re)loaded.
func (h *HostFile) Loads() int64 { return h.loaded.Load() }

func (h *HostFile) log() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// reload takes the file's content if it changed; changed says whether it
// did (and was taken). When settle is set (polling), a new content is taken
// only once two looks in a row find it: a file being written in place is
// not taken half-written. A file without any credential replaces none
// (an emptied file is a write under way more often than an intent).
func (h *HostFile) reload(settle bool) (changed bool, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	data, err := os.ReadFile(h.Path)
	if err != nil {
		if !h.missing && h.cur.Load() != nil {
			h.log().Error("host credentials unreadable: keeping the previous ones", "file", h.Path, "err", err)
		}
		h.missing = true
		return false, fmt.Errorf("host credentials: %w", err)
	}
	h.missing = false
	sum := sha256.Sum256(data)
	if h.cur.Load() != nil && sum == h.sum {
		return false, nil
	}
	if settle && sum != h.seen {
		h.seen = sum
		return false, nil
	}
	a, err := parseHostCredentials(h.Path, data, h.TrustDomain)
	if err == nil && a.len() == 0 && h.cur.Load() != nil {
		err = errors.New("host credentials: the file lists no credential")
	}
	if err != nil {
		if sum != h.bad && h.cur.Load() != nil {
			h.log().Error("host credentials not reloaded: keeping the previous ones", "file", h.Path, "err", err)
		}
		h.bad = sum
		return false, err
	}
	// A secret that stays, for the same caller, keeps its Revoked; the
	// others' are closed once the new credentials are in force.
	old := h.cur.Load()
	var gone []chan struct{}
	if old != nil {
		for k, c := range old.callers {
			if nc, ok := a.callers[k]; ok && *nc == *c {
				a.revoke[k] = old.revoke[k]
			} else {
				gone = append(gone, old.revoke[k])
			}
		}
	}
	h.cur.Store(a)
	for _, ch := range gone {
		close(ch)
	}
	h.sum, h.bad = sum, [sha256.Size]byte{}
	h.loaded.Add(1)
	return true, nil
}

// Start looks at the file every Interval until ctx ends, reloading it when
// its content changed.
func (h *HostFile) Start(ctx context.Context) error {
	iv := h.Interval
	if iv <= 0 {
		iv = DefaultHostFileInterval
	}
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if changed, _ := h.reload(true); changed { // errors are logged once each by reload
			h.log().Info("host credentials reloaded", "file", h.Path, "callers", h.cur.Load().len())
		}
	}
}

// Authenticate implements Authenticator with the credentials in force.
func (h *HostFile) Authenticate(ctx context.Context, token string) (*Caller, error) {
	a := h.cur.Load()
	if a == nil {
		return nil, fmt.Errorf("%w: no host credentials loaded", ErrUnauthenticated)
	}
	return a.Authenticate(ctx, token)
}

func (a *HostAuthenticator) len() int { return len(a.callers) }
