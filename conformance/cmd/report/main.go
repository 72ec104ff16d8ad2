// Command report turns the `go test -json` output of the conformance suite into a report. It
// echoes the tests' output as `go test -v` prints it, so the log stays readable; collects every
// test's result and duration and the figures it logged with conformance.Figure; and writes
// report.md and report.json into a directory. It exits 1 if a test or a package failed, or if
// the input holds no package result at all (go test died before reporting).
//
//	go test -json ./conformance/ | go run ./conformance/cmd/report [-out results/conformance]
//	go run ./conformance/cmd/report -in test.json
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/meshless/meshless/conformance"
)

// event is one line of `go test -json` (see `go doc test2json`).
type event struct {
	Time    time.Time
	Action  string
	Package string
	Test    string
	Elapsed float64
	Output  string
}

// Results of a test or a package in the report.
const (
	resultPass = "pass"
	resultFail = "fail"
	resultSkip = "skip"
	// resultUnfinished is a test that started but never reported a result: the test binary
	// crashed or timed out while it ran.
	resultUnfinished = "unfinished"
)

// Report is what report.json holds.
type Report struct {
	Result          string    `json:"result"`
	Started         time.Time `json:"started"`
	DurationSeconds float64   `json:"duration_seconds"`
	Passed          int       `json:"passed"`
	Failed          int       `json:"failed"`
	Skipped         int       `json:"skipped"`
	Packages        []Package `json:"packages"`
	// Tests are the tests and subtests in the order they started; subtests are named
	// "TestParent/sub" as `go test -run` takes them.
	Tests []*Test `json:"tests"`
}

// Package is one tested package's outcome.
type Package struct {
	Package         string  `json:"package"`
	Result          string  `json:"result"`
	DurationSeconds float64 `json:"duration_seconds"`
}

// Test is one scenario's outcome.
type Test struct {
	Package         string   `json:"package"`
	Name            string   `json:"name"`
	Result          string   `json:"result"`
	DurationSeconds float64  `json:"duration_seconds"`
	Figures         []Figure `json:"figures,omitempty"`
}

// Figure is a value a scenario measured.
type Figure struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
}

func main() {
	out := flag.String("out", "results/conformance", "directory to write report.md and report.json into")
	in := flag.String("in", "", "file of `go test -json` output (default: standard input)")
	flag.Parse()
	r := io.Reader(os.Stdin)
	if *in != "" {
		f, err := os.Open(*in)
		if err != nil {
			fmt.Fprintln(os.Stderr, "report:", err)
			os.Exit(2)
		}
		defer f.Close()
		r = f
	}
	rep, err := collect(r, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(2)
	}
	if err := write(rep, *out); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(2)
	}
	fmt.Printf("\nconformance report: %s (%d passed, %d failed, %d skipped): %s\n", strings.ToUpper(rep.Result),
		rep.Passed, rep.Failed, rep.Skipped, filepath.Join(*out, "report.md"))
	if rep.Result != resultPass {
		os.Exit(1)
	}
}

// collect reads test2json events from r, echoes their output to echo, and builds the report.
// Lines that are not events (go test's own errors) are echoed as they are.
func collect(r io.Reader, echo io.Writer) (*Report, error) {
	rep := &Report{}
	tests := map[[2]string]*Test{}
	var pkgs []Package
	var last time.Time
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := sc.Bytes()
		var ev event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &ev) != nil {
			fmt.Fprintf(echo, "%s\n", line)
			continue
		}
		if rep.Started.IsZero() {
			rep.Started = ev.Time
		}
		if ev.Time.After(last) {
			last = ev.Time
		}
		if ev.Action == "output" || ev.Action == "build-output" {
			io.WriteString(echo, ev.Output)
		}
		if ev.Test == "" {
			// A package that fails to build reports "fail" too (with FailedBuild).
			switch ev.Action {
			case resultPass, resultFail, resultSkip:
				pkgs = append(pkgs, Package{Package: ev.Package, Result: ev.Action, DurationSeconds: ev.Elapsed})
			}
			continue
		}
		key := [2]string{ev.Package, ev.Test}
		t := tests[key]
		if t == nil {
			t = &Test{Package: ev.Package, Name: ev.Test, Result: resultUnfinished}
			tests[key] = t
			rep.Tests = append(rep.Tests, t)
		}
		switch ev.Action {
		case resultPass, resultFail, resultSkip:
			t.Result, t.DurationSeconds = ev.Action, ev.Elapsed
		case "output":
			if f, ok := parseFigure(ev.Output); ok {
				t.Figures = append(t.Figures, f)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(pkgs) == 0 {
		return nil, errors.New("no package result in the input: go test did not run or did not finish")
	}
	rep.Packages = pkgs
	rep.DurationSeconds = last.Sub(rep.Started).Seconds()
	rep.Result = resultPass
	for _, p := range pkgs {
		if p.Result == resultFail {
			rep.Result = resultFail
		}
	}
	for _, t := range rep.Tests {
		switch t.Result {
		case resultPass:
			rep.Passed++
		case resultSkip:
			rep.Skipped++
		default:
			rep.Failed++
			rep.Result = resultFail
		}
	}
	return rep, nil
}

// parseFigure reads a conformance.Figure log line: "<file:line>: FIGURE name=value unit".
func parseFigure(output string) (Figure, bool) {
	_, rest, ok := strings.Cut(strings.TrimSpace(output), conformance.FigurePrefix)
	if !ok {
		return Figure{}, false
	}
	name, rest, ok := strings.Cut(rest, "=")
	if !ok {
		return Figure{}, false
	}
	value, unit, _ := strings.Cut(rest, " ")
	v, err := strconv.ParseFloat(value, 64)
	if err != nil {
		return Figure{}, false
	}
	return Figure{Name: name, Value: v, Unit: unit}, true
}

func write(rep *Report, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "report.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "report.md"), []byte(markdown(rep)), 0o644)
}

func markdown(rep *Report) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Conformance report\n\n**%s**: %d passed, %d failed, %d skipped in %s (started %s).\n\n",
		strings.ToUpper(rep.Result), rep.Passed, rep.Failed, rep.Skipped,
		seconds(rep.DurationSeconds), rep.Started.UTC().Format(time.RFC3339))
	b.WriteString("| Package | Result | Duration |\n| --- | --- | --- |\n")
	for _, p := range rep.Packages {
		fmt.Fprintf(&b, "| `%s` | %s | %s |\n", p.Package, p.Result, seconds(p.DurationSeconds))
	}
	b.WriteString("\n## Scenarios\n\n| Scenario | Result | Duration |\n| --- | --- | --- |\n")
	for _, t := range rep.Tests {
		fmt.Fprintf(&b, "| `%s` | %s | %s |\n", t.Name, mark(t.Result), seconds(t.DurationSeconds))
	}
	var figures strings.Builder
	for _, t := range rep.Tests {
		for _, f := range t.Figures {
			fmt.Fprintf(&figures, "| %s | %s | %s | `%s` |\n", f.Name, strconv.FormatFloat(f.Value, 'g', 4, 64), f.Unit, t.Name)
		}
	}
	if figures.Len() > 0 {
		b.WriteString("\n## Figures\n\nMeasured, not asserted.\n\n| Figure | Value | Unit | Scenario |\n| --- | ---: | --- | --- |\n")
		b.WriteString(figures.String())
	}
	return b.String()
}

func mark(result string) string {
	if result == resultPass || result == resultSkip {
		return result
	}
	return "**" + strings.ToUpper(result) + "**"
}

func seconds(s float64) string {
	return time.Duration(s * float64(time.Second)).Round(10 * time.Millisecond).String()
}
