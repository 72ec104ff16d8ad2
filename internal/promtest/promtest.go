// Package promtest reads a Prometheus text exposition (meshlessd's /metrics) back with
// Prometheus's own parser, for tests to assert on its samples.
package promtest

import (
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/prometheus/common/expfmt"
)

// Parse returns every sample of the exposition by its name and labels in the text format's
// notation: `meshless_pods_enrolled`, `meshless_tls_handshakes_total{direction="inbound"}`. A body
// that the parser rejects, or a sample that is neither a counter nor a gauge, is an error.
func Parse(r io.Reader) (map[string]float64, error) {
	var parser expfmt.TextParser
	families, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("not the Prometheus text format: %w", err)
	}
	samples := make(map[string]float64)
	for name, f := range families {
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			key := name
			if len(labels) > 0 {
				slices.Sort(labels)
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.GetCounter() != nil:
				samples[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				samples[key] = m.GetGauge().GetValue()
			default:
				return nil, fmt.Errorf("%s is neither a counter nor a gauge", key)
			}
		}
	}
	return samples, nil
}
