// Command e2e-k8s proves meshless on a real one-node Kubernetes cluster on this machine, with no
// registry and no internet (`make e2e-k8s`, which builds its inputs first).
//
// The whole cluster lives in a network namespace of its own (mlk8s-<random>): containerd, etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler, the kubelet and kube-proxy, with the
// node's address 192.0.2.10 on a veth interface and the pods behind Debian's bridge plugin. Only
// the network is separate: every process runs in the host's mount namespace (the program re-runs
// itself under `nsenter --net`, and the cluster's processes are its children), so containerd's
// pod namespaces under /var/run/netns and the kubelet's mounts are the host's, as on a real node.
// The CNI dirs are the host's /opt/cni/bin and /etc/cni/net.d, because install/'s DaemonSet
// mounts those paths; they, and meshlessd's hostPath dirs, are moved aside before the run and
// moved back after it.
//
// The program has two halves. The outer one (host network namespace) takes a lock, records what
// it changes in a journal, prepares the host, runs the inner half, and afterwards undoes
// everything whatever the inner half left, including after a crash (the next run replays the
// journal). The inner one (in the cluster's namespace) starts the cluster, installs meshless with
// `kubectl apply -k install/`, deploys workloads, runs the checks and prints the report.
//
//	e2e-k8s -kubernetes-bin DIR -meshless-image TAR -pause-image TAR -workload-image TAR [-repo DIR]
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

const (
	// nodeIP is the node's address (a documentation range: it never leaves the namespace).
	nodeIP    = "192.0.2.10"
	nodeIface = "mlk8s0"
	nodeName  = "mlk8s-node"
	// podCIDR is the bridge plugin's range; serviceCIDR is conformance/kubeapi's.
	podCIDR      = "10.244.0.0/24"
	bridgeName   = "cni0"
	debianCNIDir = "/usr/lib/cni"
	conflistName = "10-mlk8s-bridge.conflist"
)

type options struct {
	kubeBin       string
	meshlessImage string
	pauseImage    string
	workloadImage string
	repo          string
	timeout       time.Duration
	artifacts     string
	// inner-only: the journal's values, passed by the outer half.
	inner   bool
	netns   string
	dir     string
	cgroup  string
	netName string
}

func main() {
	var o options
	flag.StringVar(&o.kubeBin, "kubernetes-bin", os.Getenv("MESHLESS_KUBERNETES_BIN"), "dir with kube-apiserver, kubelet, kube-controller-manager, kube-scheduler, kube-proxy (scripts/k8s-binaries.sh)")
	flag.StringVar(&o.meshlessImage, "meshless-image", "bin/meshless-image.tar", "docker-archive of meshless/meshlessd:dev (make image)")
	flag.StringVar(&o.pauseImage, "pause-image", "bin/e2e-pause.tar", "docker-archive of the sandbox image")
	flag.StringVar(&o.workloadImage, "workload-image", "bin/e2e-workload.tar", "docker-archive of the workload image (busybox, meshless-testapp)")
	flag.StringVar(&o.repo, "repo", ".", "the meshless repository (install/ is applied from it)")
	flag.StringVar(&o.artifacts, "artifacts", "results/e2e-k8s", "where the report, the cluster's logs and the captures are kept (replaced by each run)")
	flag.DurationVar(&o.timeout, "timeout", 15*time.Minute, "stop the cluster and fail when the run takes longer")
	flag.BoolVar(&o.inner, "inner", false, "internal: run the cluster (in the namespace the outer half made)")
	flag.StringVar(&o.netns, "netns", "", "internal")
	flag.StringVar(&o.dir, "dir", "", "internal")
	flag.StringVar(&o.cgroup, "cgroup-root", "", "internal")
	flag.StringVar(&o.netName, "cni-network", "", "internal")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e-k8s: needs root (network namespaces, containerd, kubelet)")
		os.Exit(1)
	}
	if o.kubeBin == "" {
		fmt.Fprintln(os.Stderr, "e2e-k8s: -kubernetes-bin (or $MESHLESS_KUBERNETES_BIN) is required")
		os.Exit(2)
	}
	for _, p := range []*string{&o.kubeBin, &o.meshlessImage, &o.pauseImage, &o.workloadImage, &o.repo, &o.artifacts} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2e-k8s:", err)
			os.Exit(2)
		}
		*p = abs
	}
	if o.inner {
		os.Exit(runInner(o))
	}
	if err := preflight(o); err != nil {
		fmt.Fprintln(os.Stderr, "e2e-k8s:", err)
		os.Exit(1)
	}
	os.Exit(runOuter(o))
}

// preflight says what is missing before anything on the host changes.
func preflight(o options) error {
	var missing []string
	// kubectl is not a Debian package: these machines have it installed; the rest comes from
	// `make e2e-k8s-deps` and `make deps`.
	for _, cmd := range []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc", "nsenter", "ip", "tcpdump", "etcd", "kubectl", "iptables"} {
		if _, err := exec.LookPath(cmd); err != nil {
			missing = append(missing, cmd)
		}
	}
	for _, f := range []string{
		filepath.Join(o.kubeBin, "kube-apiserver"), filepath.Join(o.kubeBin, "kube-controller-manager"),
		filepath.Join(o.kubeBin, "kube-scheduler"), filepath.Join(o.kubeBin, "kubelet"), filepath.Join(o.kubeBin, "kube-proxy"),
		filepath.Join(debianCNIDir, "bridge"), filepath.Join(debianCNIDir, "host-local"),
		filepath.Join(debianCNIDir, "loopback"), filepath.Join(debianCNIDir, "portmap"),
		filepath.Join(o.repo, "bin", "meshlessd"), filepath.Join(o.repo, "install", "kustomization.yaml"),
		o.meshlessImage, o.pauseImage, o.workloadImage,
	} {
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing: %s (run it through `make e2e-k8s`)", strings.Join(missing, ", "))
	}
	// Pods on one bridge reach each other through a ClusterIP only if the bridge hands its
	// frames to iptables: without it the DNATed reply skips conntrack's un-DNAT.
	if _, err := os.Stat("/proc/sys/net/bridge/bridge-nf-call-iptables"); err != nil {
		return fmt.Errorf("br_netfilter is not loaded (modprobe br_netfilter): kube-proxy's ClusterIPs need it: %w", err)
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "e2e-k8s %s: %s\n", time.Now().UTC().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// runOuter is the host half: lock, journal, host setup, the inner half, teardown.
func runOuter(o options) int {
	lock, err := lockHost()
	if err != nil {
		logf("%v", err)
		return 1
	}
	defer lock.Close()
	if old, err := readJournal(); err != nil {
		logf("%v", err)
		return 1
	} else if old != nil {
		logf("an earlier run was interrupted; undoing what it left (netns %s, dir %s)", old.Netns, old.Dir)
		if err := teardownHost(old, logf); err != nil {
			logf("could not undo the earlier run: %v (see %s)", err, journalPath)
			return 1
		}
	}

	suffix := randomHex(5)
	j := &journal{
		Netns:      "mlk8s-" + suffix,
		Dir:        filepath.Join(os.TempDir(), "mlk8s-"+suffix),
		CgroupRoot: "/mlk8s-" + suffix,
		NetName:    "mlk8s-" + suffix,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()

	start := time.Now()
	status := 1
	if err := setupHost(ctx, j, bridgeConflist(j.NetName, filepath.Join(j.Dir, "cni-ipam"))); err != nil {
		logf("host setup: %v", err)
	} else {
		logf("host ready in %s: netns %s, dir %s, cgroup root %s", time.Since(start).Round(time.Millisecond), j.Netns, j.Dir, j.CgroupRoot)
		status = runInnerProcess(ctx, o, j)
	}
	tStart := time.Now()
	if err := teardownHost(j, logf); err != nil {
		logf("TEARDOWN FAILED: %v (the journal %s is kept; the next run retries)", err, journalPath)
		return 1
	}
	logf("host restored in %s (netns, CNI dirs, meshless dirs, cgroups, sysctls)", time.Since(tStart).Round(time.Millisecond))
	logf("total %s", time.Since(start).Round(time.Second))
	return status
}

// runInnerProcess re-runs this program in the cluster's network namespace. A signal to the outer
// half is passed on, so that the inner half tears the cluster down in order.
func runInnerProcess(ctx context.Context, o options, j *journal) int {
	exe, err := os.Executable()
	if err != nil {
		logf("%v", err)
		return 1
	}
	args := []string{"--net=" + j.netnsPath(), "--", exe, "-inner",
		"-netns", j.Netns, "-dir", j.Dir, "-cgroup-root", j.CgroupRoot, "-cni-network", j.NetName,
		"-kubernetes-bin", o.kubeBin, "-meshless-image", o.meshlessImage, "-pause-image", o.pauseImage,
		"-workload-image", o.workloadImage, "-repo", o.repo, "-artifacts", o.artifacts}
	cmd := exec.Command("nsenter", args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		logf("starting the inner half: %v", err)
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return exitCode(err)
	case <-ctx.Done():
		logf("%v: stopping the cluster", context.Cause(ctx))
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(2 * time.Minute):
			_ = cmd.Process.Kill()
			<-done
		}
		return 1
	}
}

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() > 0 {
		return ee.ExitCode()
	}
	logf("inner half: %v", err)
	return 1
}

// bridgeConflist is the primary CNI: Debian's bridge with host-local addresses (kept in the run
// dir) and portmap, as a cluster without a CNI vendor would have it.
func bridgeConflist(name, ipamDir string) []byte {
	return fmt.Appendf(nil, `{
  "cniVersion": "1.0.0",
  "name": %q,
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": %q
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
`, name, bridgeName, podCIDR, ipamDir)
}
