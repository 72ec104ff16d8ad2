package main

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/meshless/meshless/pkg/agent"
	meshtls "github.com/meshless/meshless/pkg/tls"
	"github.com/meshless/meshless/pkg/tunnel"
)

// countingHandler counts the warnings and errors the daemon logs, for the health line.
type countingHandler struct {
	slog.Handler
	warnings, errors *atomic.Int64
}

func newCountingHandler(h slog.Handler) countingHandler {
	return countingHandler{Handler: h, warnings: new(atomic.Int64), errors: new(atomic.Int64)}
}

func (h countingHandler) Handle(ctx context.Context, r slog.Record) error {
	switch {
	case r.Level >= slog.LevelError:
		h.errors.Add(1)
	case r.Level >= slog.LevelWarn:
		h.warnings.Add(1)
	}
	return h.Handler.Handle(ctx, r)
}

func (h countingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return countingHandler{Handler: h.Handler.WithAttrs(attrs), warnings: h.warnings, errors: h.errors}
}

func (h countingHandler) WithGroup(name string) slog.Handler {
	return countingHandler{Handler: h.Handler.WithGroup(name), warnings: h.warnings, errors: h.errors}
}

// healthReporter writes the daemon's one-line health summary: what an operator reads in
// `kubectl logs` to see how a node is doing.
type healthReporter struct {
	agent  *agent.Agent
	stats  *tunnel.Stats
	svids  meshtls.Source
	counts countingHandler
	// bulk reads the relays' large buffers (tunnel.BulkBuffers).
	bulk func() tunnel.BulkBufferStats
	// log writes past counts: a health line at warn level must not count itself.
	log *slog.Logger

	// Totals at the previous line, so that each line tells what happened since.
	last struct {
		total, failed, plaintext, warnings, errors, bulkDenied int64
		handshakes, resumed                                    int64
	}
}

// run logs a summary every interval until ctx ends.
func (h *healthReporter) run(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			h.report(ctx)
		}
	}
}

// report logs one summary line: at warn level when something needs a look (errors since the
// last line, a certificate unavailable or close to expiry, pods not re-attached).
func (h *healthReporter) report(ctx context.Context) {
	st := h.agent.Status(ctx)
	total, failed, plaintext := h.stats.Total.Load(), h.stats.Failed.Load(), h.stats.Plaintext.Load()
	handshakes := h.stats.Outbound.Total.Load() + h.stats.Inbound.Total.Load()
	resumed := h.stats.Outbound.Resumed.Load() + h.stats.Inbound.Resumed.Load()
	warnings, errs := h.counts.warnings.Load(), h.counts.errors.Load()
	bulk := h.bulk()

	certs, certErrors, overdue := 0, 0, 0
	var earliest time.Time
	for _, id := range h.agent.Identities() {
		svid, err := h.svids.SVID(id)
		if err != nil || len(svid.Certificates) == 0 {
			certErrors++
			continue
		}
		certs++
		leaf := svid.Certificates[0]
		if earliest.IsZero() || leaf.NotAfter.Before(earliest) {
			earliest = leaf.NotAfter
		}
		// SVIDs are renewed at half their life: one in its last quarter missed its renewal.
		if time.Until(leaf.NotAfter) < leaf.NotAfter.Sub(leaf.NotBefore)/4 {
			overdue++
		}
	}
	attrs := []any{
		"ready", st.Ready,
		"pods_enrolled", st.Pods, "pods_skipped", st.Skipped, "pods_pending", st.Pending,
		"connections_open", h.stats.Open.Load(),
		"connections", total - h.last.total,
		"connections_failed", failed - h.last.failed,
		"connections_plaintext", plaintext - h.last.plaintext,
		"handshakes", handshakes - h.last.handshakes, "handshakes_resumed", resumed - h.last.resumed,
		"bulk_buffers_lent", bulk.Lent, "bulk_buffers_denied", bulk.Denied - h.last.bulkDenied,
		"certificates", certs, "certificates_unavailable", certErrors, "certificates_renewal_overdue", overdue,
		"errors", errs - h.last.errors, "warnings", warnings - h.last.warnings,
	}
	if !earliest.IsZero() {
		attrs = append(attrs, "cert_earliest_expiry", earliest.UTC().Format(time.RFC3339),
			"cert_expires_in", time.Until(earliest).Round(time.Second).String())
	}
	level := slog.LevelInfo
	if !st.Ready || st.Pending > 0 || certErrors > 0 || overdue > 0 || errs > h.last.errors {
		level = slog.LevelWarn
	}
	h.last.total, h.last.failed, h.last.plaintext, h.last.warnings, h.last.errors = total, failed, plaintext, warnings, errs
	h.last.bulkDenied = bulk.Denied
	h.last.handshakes, h.last.resumed = handshakes, resumed
	h.log.Log(ctx, level, "meshlessd health", attrs...)
}
