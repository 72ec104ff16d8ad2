package main

import (
	"bytes"
	"testing"

	"github.com/meshless/meshless/internal/promtest"
	"github.com/meshless/meshless/pkg/tunnel"
)

// TestMetricsExposition reads /metrics back with Prometheus's own parser: every family must be
// well formed, typed, and carry the value of the counter behind it.
func TestMetricsExposition(t *testing.T) {
	var s tunnel.Stats
	s.Open.Store(3)
	s.Total.Store(40)
	s.Failed.Store(2)
	s.Plaintext.Store(5)
	s.Outbound.Total.Store(20)
	s.Outbound.Resumed.Store(19)
	s.Inbound.Total.Store(17)
	s.Inbound.Resumed.Store(12)
	var buf bytes.Buffer
	writeMetrics(&buf, 7, &s, tunnel.BulkBufferStats{Lent: 1, Max: 240, Denied: 4})

	got, err := promtest.Parse(&buf)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{
		"meshless_pods_enrolled":                                      7,
		"meshless_connections_open":                                   3,
		"meshless_connections_total":                                  40,
		"meshless_connections_failed_total":                           2,
		"meshless_connections_plaintext_total":                        5,
		`meshless_tls_handshakes_total{direction="outbound"}`:         20,
		`meshless_tls_handshakes_total{direction="inbound"}`:          17,
		`meshless_tls_handshakes_resumed_total{direction="outbound"}`: 19,
		`meshless_tls_handshakes_resumed_total{direction="inbound"}`:  12,
		"meshless_relay_bulk_buffers_lent":                            1,
		"meshless_relay_bulk_buffers_max":                             240,
		"meshless_relay_bulk_buffers_denied_total":                    4,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present: %v), want %v", k, g, ok, v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("got %d samples, want %d: %v", len(got), len(want), got)
	}
}
