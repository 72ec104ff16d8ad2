package main

import (
	"bytes"
	"testing"

	"github.com/prometheus/common/expfmt"

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

	var parser expfmt.TextParser
	families, err := parser.TextToMetricFamilies(&buf)
	if err != nil {
		t.Fatalf("not the Prometheus text format: %v", err)
	}
	type sample struct {
		family    string
		direction string // the direction label, if any
	}
	got := map[sample]float64{}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			key := sample{family: name}
			for _, l := range m.GetLabel() {
				if l.GetName() == "direction" {
					key.direction = l.GetValue()
				}
			}
			switch {
			case m.GetCounter() != nil:
				got[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				got[key] = m.GetGauge().GetValue()
			default:
				t.Errorf("%s: neither a counter nor a gauge", name)
			}
		}
	}
	want := map[sample]float64{
		{family: "meshless_pods_enrolled"}:                                       7,
		{family: "meshless_connections_open"}:                                    3,
		{family: "meshless_connections_total"}:                                   40,
		{family: "meshless_connections_failed_total"}:                            2,
		{family: "meshless_connections_plaintext_total"}:                         5,
		{family: "meshless_tls_handshakes_total", direction: "outbound"}:         20,
		{family: "meshless_tls_handshakes_total", direction: "inbound"}:          17,
		{family: "meshless_tls_handshakes_resumed_total", direction: "outbound"}: 19,
		{family: "meshless_tls_handshakes_resumed_total", direction: "inbound"}:  12,
		{family: "meshless_relay_bulk_buffers_lent"}:                             1,
		{family: "meshless_relay_bulk_buffers_max"}:                              240,
		{family: "meshless_relay_bulk_buffers_denied_total"}:                     4,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s{direction=%q} = %v (present: %v), want %v", k.family, k.direction, g, ok, v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("got %d samples, want %d: %v", len(got), len(want), got)
	}
}
