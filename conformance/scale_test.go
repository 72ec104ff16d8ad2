package conformance_test

// 100 pods enrolled on one node (issue 3): how long CNI ADD takes with meshless-cni chained
// against the same conflist without it, and how much memory meshlessd holds for them. Both are
// figures for the report, not thresholds; the test asserts only that every pod was enrolled and
// that pods still talk.

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
	"github.com/meshless/meshless/pkg/enroll"
)

const (
	scaleNS   = "scale"
	scalePods = 100
)

func TestScale100Pods(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins: binaries(t), NodePrefix: "mlxn-", PodPrefix: "mlxp-",
		Workloads: map[string]string{scaleNS + "/mesh-000": "first-sa", fmt.Sprintf("%s/mesh-%03d", scaleNS, scalePods-1): "last-sa"},
	})
	if err != nil {
		t.Fatal(err)
	}
	node, err := c.AddNode(ctx, conformance.NodeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	// `ip netns exec` execs its command, so the process started is meshlessd itself.
	pid := node.Daemon().Pid()
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err != nil || strings.TrimSpace(string(comm)) != "meshlessd" {
		t.Fatalf("process %d is %q (%v), not meshlessd", pid, comm, err)
	}
	time.Sleep(time.Second)
	conformance.Figure(t, "scale_rss_0_pods", procStatusKiB(t, pid, "VmRSS")/1024, "MiB")

	// Mesh and plain pods alternate, so both see the same bridge and the same machine load.
	var pods []*conformance.Pod
	var mesh, plain []time.Duration
	start := time.Now()
	for i := range scalePods {
		p, err := node.AddPod(ctx, conformance.PodConfig{Namespace: scaleNS, Name: fmt.Sprintf("mesh-%03d", i)})
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
		mesh = append(mesh, p.AddTime)
		q, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: scaleNS, Name: fmt.Sprintf("plain-%03d", i)})
		if err != nil {
			t.Fatal(err)
		}
		plain = append(plain, q.AddTime)
	}
	t.Logf("%d mesh and %d plain pods added in %s", scalePods, scalePods, time.Since(start).Round(time.Millisecond))
	for _, q := range []float64{0.50, 0.99} {
		name := fmt.Sprintf("p%02.0f", q*100)
		conformance.Figure(t, "scale_add_"+name+"_meshless", ms(percentile(mesh, q)), "ms")
		conformance.Figure(t, "scale_add_"+name+"_plain", ms(percentile(plain, q)), "ms")
	}

	out, err := node.Exec(ctx, c.Config.Bins.Daemon, "status", "--socket", node.Socket)
	if err != nil {
		t.Fatal(err)
	}
	var st enroll.Status
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("meshlessd status: %v: %s", err, out)
	}
	if st.Pods != scalePods || !st.Ready {
		t.Errorf("meshlessd status: %+v, want %d pods, ready", st, scalePods)
	}
	logs, err := node.Logs()
	if err != nil {
		t.Fatal(err)
	}
	enrolled := map[string]bool{}
	for _, r := range logs.Find("msg", "pod enrolled", "namespace", scaleNS) {
		enrolled[r.String("pod")] = true
	}
	for _, p := range pods {
		if !enrolled[p.Name] {
			t.Errorf("no enrollment of %s in meshlessd's log", p)
		}
	}
	if len(enrolled) != scalePods {
		t.Errorf("meshlessd logged %d enrolled pods, want the %d mesh pods", len(enrolled), scalePods)
	}

	// The first and the last pod still talk, with their own identities.
	first, last := pods[0], pods[len(pods)-1]
	if _, err := last.StartServer(ctx, xPort); err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(last.IPv4(), xPort)
	since := logLen(t, node)
	exchange(t, first, target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 1 << 20})
	requireIdentities(t, first, last, target, since, since, 1)

	// Idle: no connection open, nothing enrolling.
	time.Sleep(2 * time.Second)
	conformance.Figure(t, "scale_rss_100_pods", procStatusKiB(t, pid, "VmRSS")/1024, "MiB")
	conformance.Figure(t, "scale_rss_peak", procStatusKiB(t, pid, "VmHWM")/1024, "MiB")
	if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		conformance.Figure(t, "scale_open_fds_100_pods", float64(len(fds)), "fds")
	}
}

// procStatusKiB reads a "kB" field of /proc/<pid>/status, or fails the test.
func procStatusKiB(t *testing.T, pid int, field string) float64 {
	t.Helper()
	kib, err := conformance.StatusKiB(pid, field)
	if err != nil {
		t.Fatal(err)
	}
	return kib
}

// percentile returns the nearest-rank q-quantile of ds.
func percentile(ds []time.Duration, q float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(i, 0)]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
