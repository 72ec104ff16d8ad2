// Package report turns the benchmark's repeated measurements into the figures `make bench`
// publishes: the median of each variant per metric, its ratio to the plaintext baseline and to the
// best reference proxy, single-run figures of meshless alone, and issue 6's targets read from
// them. It renders one text table, Markdown and JSON. Nothing here judges a timing as a failure:
// a missed target is a line in the report.
package report

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Role is what a variant is measured as.
type Role string

// Roles of variants: one baseline (ratios are taken to it), the subject, and references (the
// best of them is what the subject is compared with).
const (
	Baseline  Role = "baseline"
	Subject   Role = "subject"
	Reference Role = "reference"
)

// Variant is one way of connecting the two pods.
type Variant struct {
	Name string `json:"name"`
	Role Role   `json:"role"`
	// Detail says how it was set up (versions, configuration), for the reader.
	Detail string `json:"detail,omitempty"`
}

// Metric is one measured quantity, taken from every variant.
type Metric struct {
	ID     string `json:"id"`
	Name   string `json:"name"`
	Unit   string `json:"unit"`
	Higher bool   `json:"higher_is_better"`
	// NoBaseline marks metrics the baseline has no value for (CPU of the proxies: it has none).
	NoBaseline bool `json:"no_baseline,omitempty"`
}

// Figure is a single measurement of the subject alone (daemon memory, CNI ADD time).
type Figure struct {
	ID    string  `json:"id"`
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
}

// Target is a goal from issue 6. Against a metric, Value is the subject's ratio to the best
// reference; against a figure (Figure set), it is the figure itself.
type Target struct {
	Name string `json:"name"`
	// Metric or Figure is the ID the target reads.
	Metric string `json:"metric,omitempty"`
	Figure string `json:"figure,omitempty"`
	// AtLeast: the value must be >= Limit; otherwise <= Limit.
	AtLeast bool    `json:"at_least"`
	Limit   float64 `json:"limit"`
}

// Report collects the samples of one benchmark run.
type Report struct {
	Started  time.Time      `json:"started"`
	Finished time.Time      `json:"finished"`
	Params   map[string]any `json:"params,omitempty"`
	Notes    []string       `json:"notes,omitempty"`
	Variants []Variant      `json:"variants"`
	Metrics  []Metric       `json:"metrics"`
	// Samples maps metric ID, then variant name, to the values of every repetition in order.
	Samples map[string]map[string][]float64 `json:"samples"`
	Figures []Figure                        `json:"figures,omitempty"`
	Targets []Target                        `json:"-"`
	// Errors are runs that failed; their metrics have fewer samples.
	Errors []string `json:"errors,omitempty"`
}

// New returns an empty report over the given variants and metrics.
func New(variants []Variant, metrics []Metric) *Report {
	return &Report{Variants: variants, Metrics: metrics, Samples: map[string]map[string][]float64{}}
}

// Add records one sample of metric for variant.
func (r *Report) Add(metric, variant string, v float64) {
	m := r.Samples[metric]
	if m == nil {
		m = map[string][]float64{}
		r.Samples[metric] = m
	}
	m[variant] = append(m[variant], v)
}

// AddFigure records a figure of the subject alone.
func (r *Report) AddFigure(f Figure) { r.Figures = append(r.Figures, f) }

// Median returns the median of vs (the mean of the middle two for an even count); NaN for none.
func Median(vs []float64) float64 {
	if len(vs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Percentile returns the nearest-rank q-quantile (0 < q <= 1) of vs; NaN for none.
func Percentile(vs []float64, q float64) float64 {
	if len(vs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// Ratio returns a/b, NaN when either is missing or b is zero.
func Ratio(a, b float64) float64 {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return math.NaN()
	}
	return a / b
}

// Row is one variant's result for one metric.
type Row struct {
	Metric  Metric
	Variant string
	Role    Role
	Median  float64
	// Min and Max are the lowest and highest of the runs (NaN for none): how far the median's
	// runs spread on this machine, which tells a real difference between variants from noise.
	Min, Max float64
	Runs     int
	// VsBaseline and VsBestRef are Median divided by the baseline's and the best reference's
	// medians (NaN when not applicable); BestRef names that reference.
	VsBaseline, VsBestRef float64
	BestRef               string
}

// Rows returns, per metric in order, one row per variant in order.
func (r *Report) Rows() [][]Row {
	var out [][]Row
	for _, m := range r.Metrics {
		medians := map[string]float64{}
		for _, v := range r.Variants {
			medians[v.Name] = Median(r.Samples[m.ID][v.Name])
		}
		base := math.NaN()
		best, bestName := math.NaN(), ""
		for _, v := range r.Variants {
			x := medians[v.Name]
			switch {
			case v.Role == Baseline && !m.NoBaseline:
				base = x
			case v.Role == Reference && !math.IsNaN(x):
				if math.IsNaN(best) || (m.Higher && x > best) || (!m.Higher && x < best) {
					best, bestName = x, v.Name
				}
			}
		}
		var rows []Row
		for _, v := range r.Variants {
			x := medians[v.Name]
			if v.Role == Baseline && m.NoBaseline {
				continue
			}
			samples := r.Samples[m.ID][v.Name]
			lo, hi := math.NaN(), math.NaN()
			if len(samples) > 0 {
				lo, hi = slices.Min(samples), slices.Max(samples)
			}
			rows = append(rows, Row{
				Metric: m, Variant: v.Name, Role: v.Role, Median: x, Min: lo, Max: hi,
				Runs:       len(samples),
				VsBaseline: Ratio(x, base), VsBestRef: Ratio(x, best), BestRef: bestName,
			})
		}
		out = append(out, rows)
	}
	return out
}

// TargetResult is a target with the value read from the report.
type TargetResult struct {
	Target
	Value float64
	// Met is false also when the value is missing.
	Met bool
}

// TargetResults evaluates the report's targets.
func (r *Report) TargetResults() []TargetResult {
	subject := ""
	for _, v := range r.Variants {
		if v.Role == Subject {
			subject = v.Name
		}
	}
	var out []TargetResult
	for _, t := range r.Targets {
		value := math.NaN()
		if t.Figure != "" {
			for _, f := range r.Figures {
				if f.ID == t.Figure {
					value = f.Value
				}
			}
		} else {
			for _, rows := range r.Rows() {
				for _, row := range rows {
					if row.Metric.ID == t.Metric && row.Variant == subject {
						value = row.VsBestRef
					}
				}
			}
		}
		met := !math.IsNaN(value) && ((t.AtLeast && value >= t.Limit) || (!t.AtLeast && value <= t.Limit))
		out = append(out, TargetResult{Target: t, Value: value, Met: met})
	}
	return out
}

// num formats a measured value with about three significant digits.
func num(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case math.Abs(v) >= 1000:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// spread formats a row's lowest and highest run.
func spread(row Row) string {
	if math.IsNaN(row.Min) {
		return "-"
	}
	return num(row.Min) + " – " + num(row.Max)
}

func ratio(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	return fmt.Sprintf("%.2fx", v)
}

func direction(m Metric) string {
	if m.Higher {
		return "higher is better"
	}
	return "lower is better"
}

func (t Target) describe() string {
	op := "<="
	if t.AtLeast {
		op = ">="
	}
	if t.Figure != "" {
		return fmt.Sprintf("%s %s", op, num(t.Limit))
	}
	return fmt.Sprintf("%s %.2fx best reference", op, t.Limit)
}

func verdict(t TargetResult) string {
	switch {
	case t.Met:
		return "met"
	case math.IsNaN(t.Value):
		return "not measured"
	}
	return "MISSED"
}

// WriteText prints the report as aligned plain-text tables.
func (r *Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "workload\tvariant\tmedian\trange of runs\tvs plaintext\tvs best reference\truns")
	for _, rows := range r.Rows() {
		for i, row := range rows {
			name := ""
			if i == 0 {
				name = fmt.Sprintf("%s (%s, %s)", row.Metric.Name, row.Metric.Unit, direction(row.Metric))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\n", name, row.Variant, num(row.Median), spread(row), ratio(row.VsBaseline), ratio(row.VsBestRef), row.Runs)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(r.Figures) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "meshless alone\tvalue")
		for _, f := range r.Figures {
			fmt.Fprintf(tw, "%s\t%s %s\n", f.Name, num(f.Value), f.Unit)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if ts := r.TargetResults(); len(ts) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "issue 6 target\tvalue\tgoal\tverdict")
		for _, t := range ts {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.Name, valueOf(t), t.describe(), verdict(t))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func valueOf(t TargetResult) string {
	if t.Figure != "" {
		return num(t.Value)
	}
	return ratio(t.Value)
}

// WriteMarkdown writes the report as a Markdown document.
func (r *Report) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# meshless benchmark\n\n")
	fmt.Fprintf(&b, "Run %s, %s. Each value is the median over the runs shown; the variants were run interleaved.\n\n",
		r.Started.UTC().Format(time.RFC3339), r.Finished.Sub(r.Started).Round(time.Second))
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "- %s\n", n)
	}
	if len(r.Notes) > 0 {
		b.WriteString("\n")
	}
	b.WriteString("| variant | role | setup |\n| --- | --- | --- |\n")
	for _, v := range r.Variants {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", v.Name, v.Role, v.Detail)
	}
	b.WriteString("\n| workload | variant | median | range of runs | vs plaintext | vs best reference | runs |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
	for _, rows := range r.Rows() {
		for i, row := range rows {
			name := ""
			if i == 0 {
				name = fmt.Sprintf("%s (%s, %s)", row.Metric.Name, row.Metric.Unit, direction(row.Metric))
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %d |\n", name, row.Variant, num(row.Median), spread(row), ratio(row.VsBaseline), ratio(row.VsBestRef), row.Runs)
		}
	}
	if len(r.Figures) > 0 {
		b.WriteString("\n## meshless alone\n\n| figure | value |\n| --- | ---: |\n")
		for _, f := range r.Figures {
			fmt.Fprintf(&b, "| %s | %s %s |\n", f.Name, num(f.Value), f.Unit)
		}
	}
	if ts := r.TargetResults(); len(ts) > 0 {
		b.WriteString("\n## issue 6 targets\n\n| target | value | goal | verdict |\n| --- | ---: | --- | --- |\n")
		for _, t := range ts {
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", t.Name, valueOf(t), t.describe(), verdict(t))
		}
	}
	if len(r.Errors) > 0 {
		b.WriteString("\n## failed runs\n\n")
		for _, e := range r.Errors {
			fmt.Fprintf(&b, "- %s\n", e)
		}
	}
	if len(r.Params) > 0 {
		b.WriteString("\n## parameters\n\n")
		keys := make([]string, 0, len(r.Params))
		for k := range r.Params {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			fmt.Fprintf(&b, "- %s: %v\n", k, r.Params[k])
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

type jsonMetric struct {
	Metric
	Rows []Row `json:"variants"`
}

// number is a float64 whose NaN (no value) is encoded as JSON null.
type number float64

func (n number) MarshalJSON() ([]byte, error) {
	f := float64(n)
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return []byte("null"), nil
	}
	return strconv.AppendFloat(nil, f, 'g', -1, 64), nil
}

// MarshalJSON encodes a row with missing values as null.
func (r Row) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Variant    string `json:"variant"`
		Role       Role   `json:"role"`
		Median     number `json:"median"`
		Min        number `json:"min"`
		Max        number `json:"max"`
		Runs       int    `json:"runs"`
		VsBaseline number `json:"vs_baseline"`
		VsBestRef  number `json:"vs_best_reference"`
		BestRef    string `json:"best_reference,omitempty"`
	}{r.Variant, r.Role, number(r.Median), number(r.Min), number(r.Max), r.Runs, number(r.VsBaseline), number(r.VsBestRef), r.BestRef})
}

// MarshalJSON encodes a target result with a missing value as null.
func (t TargetResult) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Target
		Value number `json:"value"`
		Met   bool   `json:"met"`
	}{t.Target, number(t.Value), t.Met})
}

// MarshalJSON encodes the report with its medians, ratios and target verdicts.
func (r *Report) MarshalJSON() ([]byte, error) {
	type plain Report // the same fields, without this method
	doc := struct {
		*plain
		Results []jsonMetric   `json:"results"`
		Targets []TargetResult `json:"targets,omitempty"`
	}{plain: (*plain)(r), Targets: r.TargetResults()}
	for _, rows := range r.Rows() {
		if len(rows) > 0 {
			doc.Results = append(doc.Results, jsonMetric{Metric: rows[0].Metric, Rows: rows})
		}
	}
	return json.Marshal(doc)
}
