package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"

	"github.com/meshless/meshless/pkg/agent"
	"github.com/meshless/meshless/pkg/tunnel"
)

// healthLines decodes the JSON lines in buf.
func healthLines(t *testing.T, buf *bytes.Buffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if m["msg"] == "meshlessd health" {
			out = append(out, m)
		}
	}
	return out
}

// The health line counts what happened since the previous line, and is a warning when there were
// errors (without counting itself as one).
func TestHealthLineCountsSinceTheLastLine(t *testing.T) {
	var buf bytes.Buffer
	h, err := newLogHandler(&buf, "info")
	if err != nil {
		t.Fatal(err)
	}
	counts := newCountingHandler(h)
	log := slog.New(counts)
	ag, err := agent.New(agent.Config{StateDir: t.TempDir(), Log: log})
	if err != nil {
		t.Fatal(err)
	}
	ag.Restore()
	stats := &tunnel.Stats{}
	var bulk tunnel.BulkBufferStats
	hr := &healthReporter{agent: ag, stats: stats, counts: counts, log: slog.New(h),
		bulk: func() tunnel.BulkBufferStats { return bulk }}
	ctx := context.Background()

	stats.Total.Add(7)
	stats.Failed.Add(2)
	stats.Open.Add(3)
	stats.Outbound.Total.Add(4)
	stats.Outbound.Resumed.Add(3)
	stats.Inbound.Total.Add(2)
	stats.Inbound.Resumed.Add(1)
	bulk = tunnel.BulkBufferStats{Lent: 2, Max: 120, Denied: 5}
	log.Error("something broke", "reason", "test")
	log.Warn("something odd", "reason", "test")
	hr.report(ctx)
	stats.Total.Add(1)
	stats.Outbound.Total.Add(1)
	stats.Outbound.Resumed.Add(1)
	bulk = tunnel.BulkBufferStats{Lent: 0, Max: 120, Denied: 6}
	hr.report(ctx)

	lines := healthLines(t, &buf)
	if len(lines) != 2 {
		t.Fatalf("%d health lines, want 2:\n%s", len(lines), buf.String())
	}
	want := []map[string]any{
		{"level": "WARN", "ready": true, "connections": 7.0, "connections_failed": 2.0, "connections_open": 3.0, "errors": 1.0, "warnings": 1.0, "pods_enrolled": 0.0, "bulk_buffers_lent": 2.0, "bulk_buffers_denied": 5.0, "handshakes": 6.0, "handshakes_resumed": 4.0},
		{"level": "INFO", "ready": true, "connections": 1.0, "connections_failed": 0.0, "connections_open": 3.0, "errors": 0.0, "warnings": 0.0, "certificates": 0.0, "bulk_buffers_lent": 0.0, "bulk_buffers_denied": 1.0, "handshakes": 1.0, "handshakes_resumed": 1.0},
	}
	for i, w := range want {
		for k, v := range w {
			if lines[i][k] != v {
				t.Errorf("line %d: %s = %v, want %v (%v)", i+1, k, lines[i][k], v, lines[i])
			}
		}
	}
}
