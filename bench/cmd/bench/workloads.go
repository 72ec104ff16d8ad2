package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/meshless/meshless/bench/harness"
	"github.com/meshless/meshless/bench/report"
)

// Metric IDs.
const (
	mIPerf1   = "iperf3_1_stream"
	mIPerf4   = "iperf3_4_streams"
	mRR64p50  = "rr_64b_p50"
	mRR64p99  = "rr_64b_p99"
	mRR1kp50  = "rr_1kib_p50"
	mRR1kp99  = "rr_1kib_p99"
	mWrk      = "http_keepalive_wrk"
	mHey      = "new_connection_hey"
	mCPUGB1   = "cpu_per_gb_1_stream"
	mCPUGB4   = "cpu_per_gb_4_streams"
	mCPU10kH  = "cpu_per_10k_hey"
	mCPU10kW  = "cpu_per_10k_wrk"
	fRSSStart = "rss_start"
	fRSSIdle  = "rss_idle"
	fRSSConns = "rss_conns"
	fRSSPair  = "rss_per_pod_conn"
	fRSSConn  = "rss_per_proxied_conn"
	fAddMesh  = "cni_add_p50_meshless"
	fAddPlain = "cni_add_p50_plain"
	fAdd99M   = "cni_add_p99_meshless"
	fAdd99P   = "cni_add_p99_plain"
	fAddDelta = "cni_add_p50_delta"
)

var metrics = []report.Metric{
	{ID: mIPerf1, Name: "iperf3 1 stream", Unit: "Gbit/s", Higher: true},
	{ID: mIPerf4, Name: "iperf3 4 streams", Unit: "Gbit/s", Higher: true},
	{ID: mRR64p50, Name: "warm request/response 64 B, p50", Unit: "us"},
	{ID: mRR64p99, Name: "warm request/response 64 B, p99", Unit: "us"},
	{ID: mRR1kp50, Name: "warm request/response 1 KiB, p50", Unit: "us"},
	{ID: mRR1kp99, Name: "warm request/response 1 KiB, p99", Unit: "us"},
	{ID: mWrk, Name: "HTTP keep-alive (wrk, 1 KiB)", Unit: "req/s", Higher: true},
	{ID: mHey, Name: "new connection per request (hey)", Unit: "req/s", Higher: true},
	{ID: mCPUGB1, Name: "proxy CPU per GB, iperf3 1 stream", Unit: "s/GB", NoBaseline: true},
	{ID: mCPUGB4, Name: "proxy CPU per GB, iperf3 4 streams", Unit: "s/GB", NoBaseline: true},
	{ID: mCPU10kH, Name: "proxy CPU per 10k requests, hey", Unit: "s", NoBaseline: true},
	{ID: mCPU10kW, Name: "proxy CPU per 10k requests, wrk", Unit: "s", NoBaseline: true},
}

// targets are issue 6's, as ratios of meshless to the best reference or as absolute figures.
var targets = []report.Target{
	{Name: "bulk 1 stream >= 1.2x best reference", Metric: mIPerf1, AtLeast: true, Limit: 1.2},
	{Name: "bulk 4 streams >= 1.2x best reference", Metric: mIPerf4, AtLeast: true, Limit: 1.2},
	{Name: "CPU per GB (1 stream) <= best reference", Metric: mCPUGB1, Limit: 1},
	{Name: "CPU per GB (4 streams) <= best reference", Metric: mCPUGB4, Limit: 1},
	{Name: "warm 64 B p50 <= 0.8x best reference", Metric: mRR64p50, Limit: 0.8},
	{Name: "warm 64 B p99 <= 0.8x best reference", Metric: mRR64p99, Limit: 0.8},
	{Name: "warm 1 KiB p50 <= 0.8x best reference", Metric: mRR1kp50, Limit: 0.8},
	{Name: "warm 1 KiB p99 <= 0.8x best reference", Metric: mRR1kp99, Limit: 0.8},
	{Name: "new connection req/s >= 2x best reference", Metric: mHey, AtLeast: true, Limit: 2},
	{Name: "daemon RSS idle with the pods <= 20 MiB", Figure: fRSSIdle, Limit: 20},
	{Name: "daemon RSS per proxied connection <= 32 KiB", Figure: fRSSConn, Limit: 32},
	{Name: "CNI ADD p50 with meshless-cni <= 10 ms more", Figure: fAddDelta, Limit: 10},
}

func newReport(o options, tools harness.Tools) *report.Report {
	rep := report.New([]report.Variant{
		{Name: harness.Plaintext, Role: report.Baseline, Detail: "two plain pods on one bridge (bridge + host-local), no proxy"},
		{Name: harness.Meshless, Role: report.Subject, Detail: "two pods enrolled with meshless-cni, one meshlessd (defaults: --pq, log level info) " + runtime.Version()},
		{Name: harness.Stunnel, Role: report.Reference, Detail: firstLine(tools.Stunnel, "-version") + "; client in the client pod, server in the server pod, TLS 1.3, client cert required, debug = 3"},
		{Name: harness.HAProxy, Role: report.Reference, Detail: firstLine(tools.HAProxy, "-v") + "; tcp mode, same layout and TLS settings, default threads"},
	}, metrics)
	rep.Targets = targets
	rep.Params = map[string]any{
		"repetitions":        o.reps,
		"duration":           o.duration.String(),
		"rr_round_trips":     o.rrCount,
		"rr_warmup":          o.rrWarmup,
		"wrk":                fmt.Sprintf("%d threads, %d connections, %s", o.wrkThr, o.wrkConns, firstLine(tools.Wrk, "-v")),
		"hey":                fmt.Sprintf("%d workers, -disable-keepalive, %s", o.heyConc, tools.Hey),
		"iperf3":             firstLine(tools.IPerf3, "--version"),
		"nginx":              firstLine(tools.Nginx, "-v"),
		"daemon_pods":        o.pods,
		"daemon_connections": o.conns,
		"quick":              o.quick,
	}
	return rep
}

// firstLine returns the first line a tool prints (on stdout or stderr) for its version flag
// that mentions the tool's name (stunnel starts with other chatter).
func firstLine(tool, flag string) string {
	out, _ := exec.Command(tool, flag).CombinedOutput()
	name := filepath.Base(tool)
	for line := range strings.SplitSeq(string(out), "\n") {
		if strings.Contains(strings.ToLower(line), name) {
			return strings.TrimSpace(line)
		}
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return strings.TrimSpace(line)
}

// workload is one measurement run against one variant; it records its samples itself.
type workload struct {
	name string
	run  func(ctx context.Context, b *harness.Bench, v *harness.Variant, rep *report.Report, o options) error
}

var workloads = []workload{
	{"iperf3 1 stream", func(ctx context.Context, b *harness.Bench, v *harness.Variant, rep *report.Report, o options) error {
		return iperf(ctx, b, v, rep, o, 1, mIPerf1, mCPUGB1)
	}},
	{"iperf3 4 streams", func(ctx context.Context, b *harness.Bench, v *harness.Variant, rep *report.Report, o options) error {
		return iperf(ctx, b, v, rep, o, 4, mIPerf4, mCPUGB4)
	}},
	{"request/response 64 B", func(ctx context.Context, b *harness.Bench, v *harness.Variant, rep *report.Report, o options) error {
		return rr(ctx, v, rep, o, 64, mRR64p50, mRR64p99)
	}},
	{"request/response 1 KiB", func(ctx context.Context, b *harness.Bench, v *harness.Variant, rep *report.Report, o options) error {
		return rr(ctx, v, rep, o, 1024, mRR1kp50, mRR1kp99)
	}},
	{"wrk", func(ctx context.Context, b *harness.Bench, v *harness.Variant, rep *report.Report, o options) error {
		var res harness.WrkResult
		cpu, err := proxyCPU(v, func() (err error) {
			res, err = harness.Wrk(ctx, b, v, o.duration, o.wrkConns, o.wrkThr)
			return err
		})
		if err != nil {
			return err
		}
		rep.Add(mWrk, v.Name, res.RequestsPerSecond)
		addCPU(rep, mCPU10kW, v, cpu, float64(res.Requests)/10000)
		logf("  %-9s %8.0f req/s", v.Name, res.RequestsPerSecond)
		return nil
	}},
	{"hey", func(ctx context.Context, b *harness.Bench, v *harness.Variant, rep *report.Report, o options) error {
		var res harness.HeyResult
		cpu, err := proxyCPU(v, func() (err error) {
			res, err = harness.Hey(ctx, b, v, o.duration, o.heyConc)
			return err
		})
		if err != nil {
			return err
		}
		rep.Add(mHey, v.Name, res.RequestsPerSecond)
		addCPU(rep, mCPU10kH, v, cpu, float64(res.OK+res.Errors)/10000)
		logf("  %-9s %8.0f req/s (%d ok, %d errors)", v.Name, res.RequestsPerSecond, res.OK, res.Errors)
		return nil
	}},
}

// runWorkloads runs every workload on every variant in turn, o.reps times; a failed run is
// recorded in the report and the rest go on.
func runWorkloads(ctx context.Context, b *harness.Bench, rep *report.Report, o options) {
	for r := range o.reps {
		for _, w := range workloads {
			if !selected(w.name, o.workloads) {
				continue
			}
			logf("repetition %d/%d: %s", r+1, o.reps, w.name)
			for _, v := range b.Variants {
				if ctx.Err() != nil {
					return
				}
				if err := w.run(ctx, b, v, rep, o); err != nil {
					msg := fmt.Sprintf("repetition %d, %s, %s: %v", r+1, w.name, v.Name, err)
					rep.Errors = append(rep.Errors, msg)
					logf("  FAILED %s", msg)
				}
			}
		}
	}
}

// proxyCPU runs f and returns the CPU seconds the variant's proxies used meanwhile.
func proxyCPU(v *harness.Variant, f func() error) (float64, error) {
	pids := v.ProxyPIDs()
	before, err := harness.CPUSeconds(pids)
	if err != nil {
		return 0, err
	}
	if err := f(); err != nil {
		return 0, err
	}
	after, err := harness.CPUSeconds(pids)
	if err != nil {
		return 0, err
	}
	return after - before, nil
}

// addCPU records cpu seconds per unit of work for a variant that has proxies.
func addCPU(rep *report.Report, metric string, v *harness.Variant, cpu, units float64) {
	if len(v.ProxyPIDs()) == 0 || units <= 0 {
		return
	}
	rep.Add(metric, v.Name, cpu/units)
}

func iperf(ctx context.Context, b *harness.Bench, v *harness.Variant, rep *report.Report, o options, streams int, metric, cpuMetric string) error {
	var res harness.IPerfResult
	cpu, err := proxyCPU(v, func() (err error) {
		res, err = harness.IPerf(ctx, b, v, streams, o.duration)
		return err
	})
	if err != nil {
		return err
	}
	rep.Add(metric, v.Name, res.BitsPerSecond/1e9)
	addCPU(rep, cpuMetric, v, cpu, float64(res.Bytes)/1e9)
	logf("  %-9s %6.2f Gbit/s, proxies %.2f CPU s", v.Name, res.BitsPerSecond/1e9, cpu)
	return nil
}

func rr(ctx context.Context, v *harness.Variant, rep *report.Report, o options, size int, p50, p99 string) error {
	rtts, err := harness.RequestResponse(ctx, v, size, o.rrWarmup, o.rrCount)
	if err != nil {
		return err
	}
	us := make([]float64, len(rtts))
	for i, d := range rtts {
		us[i] = float64(d.Nanoseconds()) / 1000
	}
	a, z := report.Percentile(us, 0.50), report.Percentile(us, 0.99)
	rep.Add(p50, v.Name, a)
	rep.Add(p99, v.Name, z)
	logf("  %-9s p50 %6.0f us, p99 %6.0f us", v.Name, a, z)
	return nil
}

func addDaemonFigures(rep *report.Report, d harness.DaemonResult) {
	ms := func(ds []time.Duration, q float64) float64 {
		vs := make([]float64, len(ds))
		for i, x := range ds {
			vs[i] = float64(x.Microseconds()) / 1000
		}
		return report.Percentile(vs, q)
	}
	for _, f := range []report.Figure{
		{ID: fRSSStart, Name: "meshlessd RSS, started, no pod", Value: d.RSSStartKiB / 1024, Unit: "MiB"},
		{ID: fRSSIdle, Name: fmt.Sprintf("meshlessd RSS idle, %d pods enrolled", d.Pods), Value: d.RSSIdleKiB / 1024, Unit: "MiB"},
		{ID: fRSSConns, Name: fmt.Sprintf("meshlessd RSS, %d open connections", d.Conns), Value: d.RSSConnsKiB / 1024, Unit: "MiB"},
		{ID: fRSSPair, Name: "meshlessd RSS per open connection between two of its pods", Value: (d.RSSConnsKiB - d.RSSIdleKiB) / float64(d.Conns), Unit: "KiB"},
		// Both pods are on this node, so the daemon proxies each connection twice: out of the
		// client pod and into the server pod. Across nodes, each node's daemon proxies one.
		{ID: fRSSConn, Name: "meshlessd RSS per proxied connection (2 per connection here: out and in)", Value: (d.RSSConnsKiB - d.RSSIdleKiB) / float64(2*d.Conns), Unit: "KiB"},
		{ID: fAddPlain, Name: fmt.Sprintf("CNI ADD p50 without meshless-cni (%d pods)", len(d.AddPlain)), Value: ms(d.AddPlain, 0.5), Unit: "ms"},
		{ID: fAddMesh, Name: fmt.Sprintf("CNI ADD p50 with meshless-cni (%d pods)", len(d.AddMesh)), Value: ms(d.AddMesh, 0.5), Unit: "ms"},
		{ID: fAdd99P, Name: "CNI ADD p99 without meshless-cni", Value: ms(d.AddPlain, 0.99), Unit: "ms"},
		{ID: fAdd99M, Name: "CNI ADD p99 with meshless-cni", Value: ms(d.AddMesh, 0.99), Unit: "ms"},
		{ID: fAddDelta, Name: "CNI ADD p50, with minus without meshless-cni", Value: ms(d.AddMesh, 0.5) - ms(d.AddPlain, 0.5), Unit: "ms"},
	} {
		rep.AddFigure(f)
	}
}

// machineNotes describes the machine, with the load averages (1, 5, 15 minutes) when the
// measurements started and ended: other work on the machine shows there.
func machineNotes(startLoad string) []string {
	notes := []string{fmt.Sprintf("%d CPUs; load average %s at the start, %s at the end", runtime.NumCPU(), startLoad, loadavg())}
	if out, err := exec.Command("uname", "-sr").Output(); err == nil {
		notes = append(notes, "kernel "+strings.TrimSpace(string(out)))
	}
	notes = append(notes,
		"CPU seconds are utime+stime of the proxies only (meshlessd; the stunnel or haproxy pair), per GB received by iperf3 and per 10k requests",
		"meshless logs one line per proxied connection (its default, log level info); the reference proxies are configured not to")
	return notes
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// selected tells whether the workload called name is in the -workloads list.
func selected(name, list string) bool {
	if list == "all" {
		return true
	}
	for part := range strings.SplitSeq(list, ",") {
		if part = strings.TrimSpace(part); part != "" && strings.Contains(name, part) {
			return true
		}
	}
	return false
}
