// Command bench is `make bench`: issue 6's benchmark of meshless against plaintext and the usual
// mTLS proxies. On one simulated node (the conformance library: network namespaces, the real CNI
// chain) it runs every workload against every variant, interleaved (plaintext, meshless,
// stunnel4, haproxy, then again) for -reps repetitions, and takes medians; then it measures
// meshless alone on a second node (daemon memory with many pods and many open connections, CNI
// ADD time with and without meshless-cni). It prints one table and writes bench.json and
// bench.md to -out. No figure is a pass or fail: issue 6's targets are reported, not asserted.
// It needs root and the tools `make bench-deps` installs.
//
//	go run ./bench/cmd/bench [-quick] [-out results/bench] [-reps 3] [-duration 5s] ...
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/meshless/meshless/bench/harness"
	"github.com/meshless/meshless/bench/report"
	"github.com/meshless/meshless/conformance"
)

// options are the command's flags.
type options struct {
	out, hey, binDir   string
	quick, daemon      bool
	workloads          string
	reps               int
	duration           time.Duration
	rrCount, rrWarmup  int
	wrkConns, wrkThr   int
	heyConc            int
	pods, conns        int
	nodePfx, podPrefix string
}

func parseFlags() options {
	var o options
	flag.StringVar(&o.out, "out", "results/bench", "directory for bench.json and bench.md")
	flag.StringVar(&o.hey, "hey", "", "path of hey (default: scripts/bench-deps.sh's cache, else hey in PATH)")
	flag.StringVar(&o.binDir, "bin", "", "directory for the binaries built (default: a temporary one)")
	flag.BoolVar(&o.quick, "quick", false, "short runs (about 2 minutes): -reps 3 -duration 1s -rr 300 unless set")
	flag.BoolVar(&o.daemon, "daemon", true, "also measure meshless alone (daemon memory, CNI ADD time)")
	flag.StringVar(&o.workloads, "workloads", "all", "workloads to run: all, none (with -daemon: meshless alone), or a comma-separated list of name parts (iperf3,hey)")
	flag.IntVar(&o.reps, "reps", 5, "repetitions of every workload on every variant (medians are taken over them)")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "length of each iperf3, wrk and hey run")
	flag.IntVar(&o.rrCount, "rr", 2000, "round trips measured per request/response run")
	flag.IntVar(&o.rrWarmup, "rr-warmup", 200, "round trips before measuring, per request/response run")
	flag.IntVar(&o.wrkConns, "wrk-connections", 8, "wrk's keep-alive connections")
	flag.IntVar(&o.wrkThr, "wrk-threads", 1, "wrk's threads")
	flag.IntVar(&o.heyConc, "hey-concurrency", 8, "hey's concurrent workers")
	flag.IntVar(&o.pods, "pods", 100, "pods enrolled for the daemon's idle memory and the CNI ADD times")
	flag.IntVar(&o.conns, "conns", 1000, "open connections for the daemon's memory per connection")
	flag.StringVar(&o.nodePfx, "node-prefix", "mlbn-", "prefix of the nodes' network namespaces")
	flag.StringVar(&o.podPrefix, "pod-prefix", "mlbp-", "prefix of the pods' network namespaces")
	flag.Parse()
	if o.quick {
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		quick := map[string]func(){
			"reps":     func() { o.reps = 3 },
			"duration": func() { o.duration = time.Second },
			"rr":       func() { o.rrCount = 300 },
		}
		for name, apply := range quick {
			if !set[name] {
				apply()
			}
		}
	}
	return o
}

func main() {
	o := parseFlags()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (network namespaces, iptables); try: sudo make bench")
		os.Exit(2)
	}
	if o.reps < 1 {
		fmt.Fprintln(os.Stderr, "bench: -reps must be at least 1")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	env := &conformance.CleanupStack{Log: func(string, ...any) {}}
	failedRuns, err := run(ctx, env, o)
	if err != nil {
		// The harness's own messages (and the daemons' log tails) explain what broke.
		env.Fail()
		env.Log = func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
	}
	env.Run()
	switch {
	case err != nil:
		fmt.Fprintln(os.Stderr, "\nbench FAILED:", err)
		os.Exit(1)
	case failedRuns > 0:
		fmt.Fprintf(os.Stderr, "\nbench: %d runs FAILED (listed in the report)\n", failedRuns)
		os.Exit(1)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

// run sets up, measures and writes the report. A run of a workload that fails is recorded in
// the report and counted; the error is about the benchmark as a whole.
func run(ctx context.Context, env *conformance.CleanupStack, o options) (int, error) {
	tools, err := harness.FindTools(o.hey)
	if err != nil {
		return 0, err
	}
	binDir := o.binDir
	if binDir == "" {
		if binDir, err = os.MkdirTemp("", "meshless-bench-bin-"); err != nil {
			return 0, err
		}
		env.Cleanup(func() { os.RemoveAll(binDir) })
	}
	logf("building meshless-cni, meshlessd, meshless-testapp and the CNI plugins ...")
	bins, err := conformance.BuildBinaries(ctx, binDir)
	if err != nil {
		return 0, err
	}
	logf("setting up the node, four pods, their servers and the reference proxy pairs ...")
	b, err := harness.Setup(ctx, env, harness.Config{Bins: bins, Tools: tools, NodePrefix: o.nodePfx, PodPrefix: o.podPrefix})
	if err != nil {
		return 0, err
	}
	rep := newReport(o, tools)
	rep.Started = time.Now()
	startLoad := loadavg()
	if o.workloads != "none" {
		runWorkloads(ctx, b, rep, o)
	}
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	if o.daemon {
		logf("meshless alone: a fresh meshlessd, %d mesh and %d plain pods, %d open connections ...", o.pods, o.pods, o.conns)
		d, err := harness.MeasureDaemon(ctx, b.Cluster, o.pods, o.conns, logf)
		if err != nil {
			rep.Errors = append(rep.Errors, fmt.Sprintf("meshless alone: %v", err))
			logf("meshless alone: %v", err)
		} else {
			addDaemonFigures(rep, d)
		}
	}
	rep.Finished = time.Now()
	rep.Notes = append(rep.Notes, machineNotes(startLoad)...)
	if err := writeReport(rep, o.out); err != nil {
		return 0, err
	}
	fmt.Println()
	if err := rep.WriteText(os.Stdout); err != nil {
		return 0, err
	}
	fmt.Printf("\nwritten: %s, %s\n", filepath.Join(o.out, "bench.json"), filepath.Join(o.out, "bench.md"))
	return len(rep.Errors), nil
}

func writeReport(rep *report.Report, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the report: %w", err)
	}
	f, err := os.Create(filepath.Join(dir, "bench.md"))
	if err != nil {
		return err
	}
	werr := rep.WriteMarkdown(f)
	return errors.Join(werr, f.Close(), os.WriteFile(filepath.Join(dir, "bench.json"), append(js, '\n'), 0o644))
}
