package ztunnel

import (
	"context"
	"log/slog"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// hboneLogHandler is the handler of the logger given to the HBONE server.
// That package logs refused peers (failed handshakes: unknown local
// workload, foreign trust domain, expired or missing certificate; malformed
// requests) at debug level only; for a proxy they are security events, so
// these records are raised to warn and counted. Other records pass through
// unchanged.
type hboneLogHandler struct {
	inner   slog.Handler
	refused *prometheus.CounterVec // by reason
}

// raised maps the HBONE package's messages for refused peers to a reason.
var raised = map[string]string{
	"hbone: handshake failed":    "handshake",
	"hbone: bad request":         "bad_request",
	"hbone: bad or slow preface": "preface",
}

func (h *hboneLogHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelDebug // see Handle: some debug records are raised
}

func (h *hboneLogHandler) Handle(ctx context.Context, r slog.Record) error {
	if reason, ok := raised[r.Message]; ok && r.Level < slog.LevelWarn {
		h.refused.WithLabelValues(reason).Inc()
		r = r.Clone()
		r.Level = slog.LevelWarn
		r.Message = strings.TrimPrefix(r.Message, "hbone: ") + ": peer refused"
	}
	if !h.inner.Enabled(ctx, r.Level) {
		return nil
	}
	return h.inner.Handle(ctx, r)
}

func (h *hboneLogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &hboneLogHandler{inner: h.inner.WithAttrs(as), refused: h.refused}
}

func (h *hboneLogHandler) WithGroup(name string) slog.Handler {
	return &hboneLogHandler{inner: h.inner.WithGroup(name), refused: h.refused}
}
