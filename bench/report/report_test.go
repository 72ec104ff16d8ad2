package report

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{10, 10, 1, 10, 1}, 10},
	} {
		if got := Median(c.in); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
	if !math.IsNaN(Median(nil)) {
		t.Error("Median(nil) is not NaN")
	}
	in := []float64{3, 1, 2}
	Median(in)
	if in[0] != 3 || in[1] != 1 {
		t.Errorf("Median sorted its argument: %v", in)
	}
}

func TestPercentile(t *testing.T) {
	vs := make([]float64, 100)
	for i := range vs {
		vs[99-i] = float64(i + 1) // 100 .. 1, unsorted
	}
	for _, c := range []struct{ q, want float64 }{{0.5, 50}, {0.99, 99}, {1, 100}, {0.001, 1}} {
		if got := Percentile(vs, c.q); got != c.want {
			t.Errorf("Percentile(1..100, %v) = %v, want %v", c.q, got, c.want)
		}
	}
	if got := Percentile([]float64{7}, 0.99); got != 7 {
		t.Errorf("Percentile of one value = %v, want 7", got)
	}
}

func TestRatio(t *testing.T) {
	if got := Ratio(3, 2); got != 1.5 {
		t.Errorf("Ratio(3, 2) = %v", got)
	}
	for _, c := range [][2]float64{{1, 0}, {math.NaN(), 1}, {1, math.NaN()}} {
		if !math.IsNaN(Ratio(c[0], c[1])) {
			t.Errorf("Ratio(%v, %v) is not NaN", c[0], c[1])
		}
	}
}

// sample is a report with a baseline, a subject and two references over a throughput metric
// (higher is better), a latency metric (lower is better) and a CPU metric without a baseline.
func sample() *Report {
	r := New([]Variant{
		{Name: "plaintext", Role: Baseline},
		{Name: "meshless", Role: Subject},
		{Name: "stunnel4", Role: Reference},
		{Name: "haproxy", Role: Reference},
	}, []Metric{
		{ID: "tput", Name: "throughput", Unit: "Gbit/s", Higher: true},
		{ID: "lat", Name: "latency", Unit: "us"},
		{ID: "cpu", Name: "cpu", Unit: "s/GB", NoBaseline: true},
	})
	for _, s := range []struct {
		metric, variant string
		vs              []float64
	}{
		{"tput", "plaintext", []float64{10, 12, 11}},
		{"tput", "meshless", []float64{4, 5, 6}},
		{"tput", "stunnel4", []float64{3, 3, 3}},
		{"tput", "haproxy", []float64{4, 2, 4}},
		{"lat", "plaintext", []float64{20, 20, 20}},
		{"lat", "meshless", []float64{60, 70, 80}},
		{"lat", "stunnel4", []float64{90, 100, 110}},
		{"lat", "haproxy", []float64{80, 80, 200}},
		{"cpu", "meshless", []float64{2, 2, 2}},
		{"cpu", "stunnel4", []float64{4, 4, 4}},
		{"cpu", "haproxy", []float64{5, 5, 5}},
	} {
		for _, v := range s.vs {
			r.Add(s.metric, s.variant, v)
		}
	}
	r.AddFigure(Figure{ID: "rss", Name: "RSS idle", Value: 12, Unit: "MiB"})
	r.Targets = []Target{
		{Name: "throughput", Metric: "tput", AtLeast: true, Limit: 1.2},
		{Name: "latency", Metric: "lat", Limit: 0.8},
		{Name: "cpu", Metric: "cpu", Limit: 1},
		{Name: "rss", Figure: "rss", Limit: 20},
		{Name: "absent", Figure: "nothing", Limit: 1},
	}
	return r
}

func find(t *testing.T, r *Report, metric, variant string) Row {
	t.Helper()
	for _, rows := range r.Rows() {
		for _, row := range rows {
			if row.Metric.ID == metric && row.Variant == variant {
				return row
			}
		}
	}
	t.Fatalf("no row %s/%s", metric, variant)
	return Row{}
}

func TestRows(t *testing.T) {
	r := sample()
	// Throughput: meshless 5 over plaintext 11 and over the best reference (haproxy's median 4
	// beats stunnel4's 3).
	row := find(t, r, "tput", "meshless")
	if row.Median != 5 || row.Min != 4 || row.Max != 6 || row.Runs != 3 || row.BestRef != "haproxy" {
		t.Errorf("tput/meshless = %+v", row)
	}
	if math.Abs(row.VsBaseline-5.0/11) > 1e-12 || row.VsBestRef != 1.25 {
		t.Errorf("tput/meshless ratios = %v, %v", row.VsBaseline, row.VsBestRef)
	}
	// Latency is lower-better: the best reference is haproxy (median 80 against 100) even though
	// its worst run is the slowest of all.
	row = find(t, r, "lat", "meshless")
	if row.BestRef != "haproxy" || row.VsBestRef != 70.0/80 || row.VsBaseline != 3.5 {
		t.Errorf("lat/meshless = %+v", row)
	}
	if row.Min != 60 || row.Max != 80 {
		t.Errorf("lat/meshless range = %v – %v, want 60 – 80", row.Min, row.Max)
	}
	if row := find(t, r, "lat", "stunnel4"); row.VsBestRef != 1.25 {
		t.Errorf("lat/stunnel4 vs best = %v, want 1.25", row.VsBestRef)
	}
	// CPU has no baseline row and no ratio to it.
	for _, rows := range r.Rows() {
		for _, row := range rows {
			if row.Metric.ID == "cpu" && row.Variant == "plaintext" {
				t.Error("cpu has a plaintext row")
			}
		}
	}
	if row := find(t, r, "cpu", "meshless"); !math.IsNaN(row.VsBaseline) || row.VsBestRef != 0.5 {
		t.Errorf("cpu/meshless = %+v", row)
	}
}

func TestRowWithoutRuns(t *testing.T) {
	r := New([]Variant{{Name: "meshless", Role: Subject}}, []Metric{{ID: "m", Name: "m"}})
	row := find(t, r, "m", "meshless")
	if row.Runs != 0 || !math.IsNaN(row.Median) || !math.IsNaN(row.Min) || !math.IsNaN(row.Max) || spread(row) != "-" {
		t.Errorf("a row without runs = %+v, range %q", row, spread(row))
	}
}

func TestTargets(t *testing.T) {
	got := map[string]TargetResult{}
	for _, tr := range sample().TargetResults() {
		got[tr.Name] = tr
	}
	for name, want := range map[string]struct {
		value float64
		met   bool
	}{
		"throughput": {1.25, true},
		"latency":    {0.875, false},
		"cpu":        {0.5, true},
		"rss":        {12, true},
	} {
		if g := got[name]; g.Value != want.value || g.Met != want.met {
			t.Errorf("target %s = %v met=%v, want %v met=%v", name, g.Value, g.Met, want.value, want.met)
		}
	}
	if g := got["absent"]; !math.IsNaN(g.Value) || g.Met {
		t.Errorf("a target without a value: %+v", g)
	}
}

func TestOutputs(t *testing.T) {
	r := sample()
	r.Add("lat", "missing-variant", 1) // a sample of no declared variant is not shown
	var text, md bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteMarkdown(&md); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"throughput (Gbit/s, higher is better)", "1.25x", "0.45x", "MISSED", "RSS idle", "range of runs", "60.00 – 80.00"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text output lacks %q:\n%s", want, text.String())
		}
		if !strings.Contains(md.String(), want) {
			t.Errorf("markdown output lacks %q:\n%s", want, md.String())
		}
	}
	if strings.Contains(text.String(), "missing-variant") {
		t.Error("text output shows an undeclared variant")
	}

	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Samples map[string]map[string][]float64 `json:"samples"`
		Results []struct {
			ID       string `json:"id"`
			Variants []struct {
				Variant    string   `json:"variant"`
				Median     *float64 `json:"median"`
				Min        *float64 `json:"min"`
				Max        *float64 `json:"max"`
				VsBaseline *float64 `json:"vs_baseline"`
			} `json:"variants"`
		} `json:"results"`
		Targets []struct {
			Name  string   `json:"name"`
			Value *float64 `json:"value"`
			Met   bool     `json:"met"`
		} `json:"targets"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("%v: %s", err, b)
	}
	if got := doc.Samples["tput"]["haproxy"]; len(got) != 3 || got[1] != 2 {
		t.Errorf("samples in JSON: %v", got)
	}
	if len(doc.Results) != 3 || doc.Results[2].ID != "cpu" {
		t.Fatalf("results in JSON: %+v", doc.Results)
	}
	cpu := doc.Results[2].Variants[0]
	if cpu.Variant != "meshless" || cpu.Median == nil || *cpu.Median != 2 || cpu.Min == nil || *cpu.Min != 2 || cpu.Max == nil || *cpu.Max != 2 || cpu.VsBaseline != nil {
		t.Errorf("cpu/meshless in JSON: %+v", cpu)
	}
	if n := len(doc.Targets); n != 5 || doc.Targets[4].Value != nil || doc.Targets[0].Met != true {
		t.Errorf("targets in JSON: %+v", doc.Targets)
	}
}
