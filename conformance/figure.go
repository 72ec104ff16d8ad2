package conformance

// FigurePrefix starts the log line of a measured figure; the conformance report
// (conformance/cmd/report) collects these lines from `go test -json` output.
const FigurePrefix = "FIGURE "

// Figure records a figure the running scenario measured (a latency, a size, a count), for the
// report. Figures are read, not asserted: no scenario passes or fails on a timing.
func Figure(env Env, name string, value float64, unit string) {
	env.Logf("%s%s=%g %s", FigurePrefix, name, value, unit)
}
