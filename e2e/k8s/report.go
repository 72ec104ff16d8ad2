package main

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// report collects the timed phases and the checks of a run.
type report struct {
	phases []phaseResult
	checks []checkResult
	notes  []string
}

type phaseResult struct {
	name string
	took time.Duration
	err  error
}

type checkResult struct {
	id, name string
	err      error
	evidence string
}

// phase runs f as a named, timed phase.
func (r *report) phase(name string, f func() error) error {
	logf("phase %s", name)
	start := time.Now()
	err := f()
	r.phases = append(r.phases, phaseResult{name: name, took: time.Since(start), err: err})
	if err != nil {
		logf("phase %s FAILED: %v", name, err)
	}
	return err
}

// check records one check: f returns the evidence, and an error when the check fails.
func (r *report) check(id, name string, f func() (string, error)) bool {
	evidence, err := f()
	r.checks = append(r.checks, checkResult{id: id, name: name, err: err, evidence: evidence})
	verdict := "PASS"
	if err != nil {
		verdict = "FAIL"
	}
	logf("check %s %s: %s", id, verdict, name)
	return err == nil
}

func (r *report) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

func (r *report) failed() bool {
	for _, p := range r.phases {
		if p.err != nil {
			return true
		}
	}
	for _, c := range r.checks {
		if c.err != nil {
			return true
		}
	}
	return false
}

func (r *report) write(w io.Writer) {
	fmt.Fprintln(w, "\n== e2e-k8s report ==")
	fmt.Fprintln(w, "phases:")
	var total time.Duration
	for _, p := range r.phases {
		total += p.took
		status := "ok"
		if p.err != nil {
			status = "FAILED: " + p.err.Error()
		}
		fmt.Fprintf(w, "  %-22s %8s  %s\n", p.name, p.took.Round(100*time.Millisecond), status)
	}
	fmt.Fprintf(w, "  %-22s %8s\n", "(cluster total)", total.Round(100*time.Millisecond))
	fmt.Fprintln(w, "checks:")
	for _, c := range r.checks {
		verdict := "PASS"
		if c.err != nil {
			verdict = "FAIL"
		}
		fmt.Fprintf(w, "  [%s] %s %s\n", verdict, c.id, c.name)
		if c.err != nil {
			fmt.Fprintf(w, "         why: %s\n", indent(c.err.Error()))
		}
		if c.evidence != "" {
			fmt.Fprintf(w, "         evidence: %s\n", indent(c.evidence))
		}
	}
	if len(r.notes) > 0 {
		fmt.Fprintln(w, "observed:")
		for _, n := range r.notes {
			fmt.Fprintf(w, "  - %s\n", indent(n))
		}
	}
	if r.failed() {
		fmt.Fprintln(w, "result: FAIL")
	} else {
		fmt.Fprintln(w, "result: PASS")
	}
}

func indent(s string) string { return strings.ReplaceAll(s, "\n", "\n           ") }
