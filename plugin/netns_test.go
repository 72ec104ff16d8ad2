package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshless/meshless/pkg/capture"
	"github.com/meshless/meshless/pkg/enroll"
)

// backends returns the iptables backends installed on this machine.
func backends(t *testing.T) []capture.Backend {
	t.Helper()
	var out []capture.Backend
	for _, b := range []capture.Backend{capture.Legacy, capture.NFT} {
		if _, err := sbinTool("iptables-" + string(b) + "-restore"); err == nil {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		t.Skip("neither iptables-legacy nor iptables-nft is installed")
	}
	return out
}

// sbinTool finds an administration program even when the test's PATH lacks the sbin directories.
func sbinTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", name)
}

// meshlessState lists what meshless installs in a netns, for both backends and families:
// chains and jumps (from iptables-save) and the policy rule; empty when nothing is there.
func meshlessState(t *testing.T, netnsName string) []string {
	t.Helper()
	var found []string
	for _, b := range []capture.Backend{capture.Legacy, capture.NFT} {
		for _, save := range []string{"iptables-" + string(b) + "-save", "ip6tables-" + string(b) + "-save"} {
			tool, err := sbinTool(save)
			if err != nil {
				continue
			}
			out, err := inNetns(t, netnsName, tool)
			if err != nil {
				t.Fatalf("%s: %v: %s", save, err, out)
			}
			for _, line := range strings.Split(out, "\n") {
				if strings.Contains(line, "MESHLESS") {
					found = append(found, save+": "+line)
				}
			}
		}
	}
	for _, fam := range []string{"-4", "-6"} {
		out, err := inNetns(t, netnsName, "ip", fam, "rule", "show")
		if err != nil {
			t.Fatalf("ip rule: %v: %s", err, out)
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, fmt.Sprint(capture.RulePriority)+":") {
				found = append(found, "ip "+fam+" rule: "+line)
			}
		}
	}
	return found
}

// TestLifecycle runs ADD, CHECK, DEL in a real netns for every supported version and backend,
// with the daemon publishing its backend (the rules go in while it enrolls the pod), and once per
// backend with a daemon that does not (the rules go in after the enrollment).
func TestLifecycle(t *testing.T) {
	needRoot(t)
	for _, backend := range backends(t) {
		for _, v := range cniVersions {
			t.Run(string(backend)+"/"+v, func(t *testing.T) { testLifecycle(t, backend, v, true) })
		}
		t.Run(string(backend)+"/unpublished", func(t *testing.T) { testLifecycle(t, backend, "1.1.0", false) })
	}
}

func testLifecycle(t *testing.T, backend capture.Backend, v string, published bool) {
	d := startDaemon(t, string(backend))
	if published {
		d.publish(t, string(backend))
	}
	name, path := podNetns(t)
	prev := podResult(path)
	keys := map[string]any{"socketPath": d.socket, "excludeInboundPorts": []int{15020}, "excludeOutboundCIDRs": []string{"169.254.169.254/32"}, "logLevel": "debug"}
	conf := netconf(t, v, keys, prev)
	const id = "c0ffee01"
	in := invocation{command: "ADD", containerID: id, netns: path, ifName: "eth0", args: k8sArgs, stdin: conf}

	// ADD: the result is prevResult, unchanged, in the network's version; logs only on stderr.
	o := run(t, in)
	o.ok(t)
	var got map[string]any
	if err := json.Unmarshal(o.stdout, &got); err != nil {
		t.Fatalf("stdout is not one JSON result: %v: %s", err, o.stdout)
	}
	if want := resultAs(t, prev, v); !reflect.DeepEqual(got, want) {
		t.Errorf("ADD result\n got %v\nwant %v", got, want)
	}
	if !strings.Contains(string(o.stderr), "pod enrolled") {
		t.Errorf("stderr lacks the enrollment log: %s", o.stderr)
	}

	// The daemon got the pod as Kubernetes named it, with the pod's own addresses only.
	pod, ok := d.pod(id)
	want := enroll.Pod{ContainerID: id, IfName: "eth0", Netns: path, Namespace: "shop", Name: "web-0",
		UID: "8b8f7f0e-3c1a-4e0b-9a57-3f0d2b8a1c11", IPs: []netip.Addr{netip.MustParseAddr("10.99.0.5"), netip.MustParseAddr("fd00:99::5")}}
	if !ok || !reflect.DeepEqual(pod, want) {
		t.Errorf("daemon has pod %+v (%v), want %+v", pod, ok, want)
	}

	// The rules are those of the pod's capture configuration, in the daemon's backend.
	parsed, err := parseConfig(conf)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := captureConfig(parsed, backend, want.IPs)
	if err != nil {
		t.Fatal(err)
	}
	if err := capture.Check(path, cc); err != nil {
		t.Errorf("capture.Check after ADD: %v", err)
	}

	// ADD again (a runtime retry) leaves one copy of everything.
	run(t, in).ok(t)
	if err := capture.Check(path, cc); err != nil {
		t.Errorf("capture.Check after a second ADD: %v", err)
	}

	// CHECK exists from 0.4.0: it passes, then fails once a rule is deleted by hand.
	check := in
	check.command = "CHECK"
	check.stdin = netconf(t, v, keys, prev)
	if v != "0.3.0" && v != "0.3.1" {
		run(t, check).ok(t)
		iptables, err := sbinTool("iptables-" + string(backend))
		if err != nil {
			t.Fatal(err)
		}
		if out, err := inNetns(t, name, iptables, "-t", "nat", "-D", capture.ChainInbound, "-i", "lo", "-j", "RETURN"); err != nil {
			t.Fatalf("delete a rule by hand: %v: %s", err, out)
		}
		e := run(t, check).cniError(t)
		if !strings.Contains(e.Msg, "capture rules missing in netns "+path) || !strings.Contains(e.Msg, "re-create the pod") {
			t.Errorf("CHECK error = %+v", e)
		}
		// ADD again repairs the rules.
		run(t, in).ok(t)
		run(t, check).ok(t)
	}

	// DEL forgets the pod, twice without complaint, and leaves the rules to die with the netns.
	del := invocation{command: "DEL", containerID: id, netns: path, ifName: "eth0", args: k8sArgs, stdin: conf}
	run(t, del).ok(t)
	if _, ok := d.pod(id); ok {
		t.Error("daemon still has the pod after DEL")
	}
	run(t, del).ok(t)
	if len(meshlessState(t, name)) == 0 {
		t.Error("DEL removed the capture rules; they must stay until the netns goes")
	}
	if v != "0.3.0" && v != "0.3.1" {
		e := run(t, check).cniError(t)
		if !strings.Contains(e.Msg, "not enrolled") {
			t.Errorf("CHECK after DEL = %+v", e)
		}
	}

	// DEL once the netns is gone, as a runtime does after a crash.
	ip(t, "netns", "del", name)
	run(t, del).ok(t)
	del.netns = ""
	run(t, del).ok(t)
}

// TestAddDaemonDown: ADD fails with a message that names the socket, and the netns is untouched.
func TestAddDaemonDown(t *testing.T) {
	needRoot(t)
	name, path := podNetns(t)
	sock := missingSocket(t)
	o := run(t, invocation{command: "ADD", containerID: "c0ffee01", netns: path, ifName: "eth0", args: k8sArgs,
		stdin: netconf(t, "1.0.0", map[string]any{"socketPath": sock}, podResult(path))})
	e := o.cniError(t)
	if e.Code != types.ErrTryAgainLater || !strings.Contains(e.Msg, "meshlessd not reachable at "+sock) ||
		!strings.Contains(e.Msg, "is the meshless DaemonSet running on this node?") {
		t.Errorf("error = %+v", e)
	}
	if left := meshlessState(t, name); len(left) > 0 {
		t.Errorf("rules left in the netns: %q", left)
	}

	// A daemon that published its backend and died: the rules that went in come out again.
	t.Run("published", func(t *testing.T) {
		if err := enroll.PublishBackend(sock, string(backends(t)[0])); err != nil {
			t.Fatal(err)
		}
		e := run(t, invocation{command: "ADD", containerID: "c0ffee01", netns: path, ifName: "eth0", args: k8sArgs,
			stdin: netconf(t, "1.0.0", map[string]any{"socketPath": sock}, podResult(path))}).cniError(t)
		if e.Code != types.ErrTryAgainLater || !strings.Contains(e.Msg, "meshlessd not reachable at "+sock) {
			t.Errorf("error = %+v", e)
		}
		if left := meshlessState(t, name); len(left) > 0 {
			t.Errorf("rules left in the netns: %q", left)
		}
	})

	t.Run("not ready", func(t *testing.T) {
		d := startDaemon(t, "nft")
		d.status.Ready = false
		e := run(t, invocation{command: "ADD", containerID: "c0ffee01", netns: path, ifName: "eth0", args: k8sArgs,
			stdin: netconf(t, "1.0.0", map[string]any{"socketPath": d.socket}, podResult(path))}).cniError(t)
		if e.Code != types.ErrTryAgainLater || !strings.Contains(e.Msg, "not ready") {
			t.Errorf("error = %+v", e)
		}
		if left := meshlessState(t, name); len(left) > 0 {
			t.Errorf("rules left in the netns: %q", left)
		}
	})
}

// TestAddCaptureFails: when the rules cannot go in after the daemon enrolled the pod, the
// enrollment is withdrawn and ADD fails: no pod is left enrolled without capture.
func TestAddCaptureFails(t *testing.T) {
	needRoot(t)
	for _, published := range []string{"", string(backends(t)[0])} {
		t.Run("published="+published, func(t *testing.T) { testAddCaptureFails(t, published) })
	}
}

func testAddCaptureFails(t *testing.T, published string) {
	d := startDaemon(t, "iptables-of-the-future")
	if published != "" {
		d.publish(t, published)
	}
	name, path := podNetns(t)
	e := run(t, invocation{command: "ADD", containerID: "c0ffee02", netns: path, ifName: "eth0", args: k8sArgs,
		stdin: netconf(t, "1.1.0", map[string]any{"socketPath": d.socket}, podResult(path))}).cniError(t)
	if e.Code != types.ErrInternal || !strings.Contains(e.Msg, "iptables-of-the-future") {
		t.Errorf("error = %+v", e)
	}
	if _, ok := d.pod("c0ffee02"); ok {
		t.Error("the pod is still enrolled after its capture failed")
	}
	if !slices.Contains(d.removed(), "c0ffee02") {
		t.Errorf("the plugin did not withdraw the enrollment (removes: %v)", d.removed())
	}
	if left := meshlessState(t, name); len(left) > 0 {
		t.Errorf("rules left in the netns: %q", left)
	}
}

// TestAddEnrollFails: when the daemon refuses the pod, no rules are left in the netns, also
// when they went in while the daemon was asked.
func TestAddEnrollFails(t *testing.T) {
	needRoot(t)
	eachDaemon(t, func(t *testing.T, d *fakeDaemon) {
		d.enrollErr = errors.New("cannot open listeners in the pod netns: boom")
		name, path := podNetns(t)
		e := run(t, invocation{command: "ADD", containerID: "c0ffee01", netns: path, ifName: "eth0", args: k8sArgs,
			stdin: netconf(t, "1.1.0", map[string]any{"socketPath": d.socket}, podResult(path))}).cniError(t)
		if e.Code != types.ErrInternal || !strings.Contains(e.Msg, "boom") || !strings.Contains(e.Msg, "shop/web-0") {
			t.Errorf("error = %+v", e)
		}
		if left := meshlessState(t, name); len(left) > 0 {
			t.Errorf("rules left in the netns after the failed ADD: %q", left)
		}
	})
}

// eachDaemon runs f against a daemon of every backend, one that publishes its backend beside its
// socket (the rules go in while it enrolls the pod) and one that does not (they go in after).
func eachDaemon(t *testing.T, f func(t *testing.T, d *fakeDaemon)) {
	for _, backend := range backends(t) {
		for _, published := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/published=%v", backend, published), func(t *testing.T) {
				d := startDaemon(t, string(backend))
				if published {
					d.publish(t, string(backend))
				}
				f(t, d)
			})
		}
	}
}

// TestReAddEnrollFails: a retried ADD whose enrollment fails leaves the rules the first ADD put
// in: the pod may be running, and removing them would let its traffic out in plaintext.
func TestReAddEnrollFails(t *testing.T) {
	needRoot(t)
	backend := backends(t)[0]
	d := startDaemon(t, string(backend))
	d.publish(t, string(backend))
	_, path := podNetns(t)
	conf := netconf(t, "1.1.0", map[string]any{"socketPath": d.socket}, podResult(path))
	in := invocation{command: "ADD", containerID: "c0ffee05", netns: path, ifName: "eth0", args: k8sArgs, stdin: conf}
	run(t, in).ok(t)
	d.mu.Lock()
	d.enrollErr = errors.New("boom")
	d.mu.Unlock()
	if e := run(t, in).cniError(t); !strings.Contains(e.Msg, "boom") {
		t.Errorf("error = %+v", e)
	}
	parsed, err := parseConfig(conf)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := captureConfig(parsed, backend, []netip.Addr{netip.MustParseAddr("10.99.0.5"), netip.MustParseAddr("fd00:99::5")})
	if err != nil {
		t.Fatal(err)
	}
	if err := capture.Check(path, cc); err != nil {
		t.Errorf("the first ADD's rules after the failed retry: %v", err)
	}
}

// TestAddSkipped: a pod the daemon skips gets no rules, also when they went in while the daemon
// was asked, and ADD returns prevResult.
func TestAddSkipped(t *testing.T) {
	needRoot(t)
	eachDaemon(t, func(t *testing.T, d *fakeDaemon) {
		d.skip = `annotation meshless.io/inject is "false"`
		name, path := podNetns(t)
		o := run(t, invocation{command: "ADD", containerID: "c0ffee03", netns: path, ifName: "eth0", args: k8sArgs,
			stdin: netconf(t, "1.1.0", map[string]any{"socketPath": d.socket}, podResult(path))})
		o.ok(t)
		if !strings.Contains(string(o.stderr), "pod skipped by meshlessd") {
			t.Errorf("stderr does not log the skip: %s", o.stderr)
		}
		if left := meshlessState(t, name); len(left) > 0 {
			t.Errorf("rules left in the netns of a skipped pod: %q", left)
		}
	})
}

// TestAddPublishedBackendDiffers: when the published backend is not the one the daemon enrolls
// with, the rules end up in the daemon's backend only.
func TestAddPublishedBackendDiffers(t *testing.T) {
	needRoot(t)
	bs := backends(t)
	if len(bs) < 2 {
		t.Skip("needs both iptables backends")
	}
	d := startDaemon(t, string(capture.NFT))
	d.publish(t, string(capture.Legacy))
	name, path := podNetns(t)
	conf := netconf(t, "1.1.0", map[string]any{"socketPath": d.socket}, podResult(path))
	run(t, invocation{command: "ADD", containerID: "c0ffee04", netns: path, ifName: "eth0", args: k8sArgs, stdin: conf}).ok(t)
	for _, line := range meshlessState(t, name) {
		if strings.Contains(line, "legacy") {
			t.Errorf("rules left in the published backend: %q", line)
		}
	}
	parsed, err := parseConfig(conf)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := captureConfig(parsed, capture.NFT, []netip.Addr{netip.MustParseAddr("10.99.0.5"), netip.MustParseAddr("fd00:99::5")})
	if err != nil {
		t.Fatal(err)
	}
	if err := capture.Check(path, cc); err != nil {
		t.Errorf("rules in the daemon's backend: %v", err)
	}
}

// TestAddWithoutKubernetesArgs: plain libcni use enrolls the pod under the documented fallback.
func TestAddWithoutKubernetesArgs(t *testing.T) {
	needRoot(t)
	backend := backends(t)[0]
	d := startDaemon(t, string(backend))
	_, path := podNetns(t)
	const id = "4F2A9C81D0E55B77AA"
	o := run(t, invocation{command: "ADD", containerID: id, netns: path, ifName: "eth0",
		stdin: netconf(t, "1.1.0", map[string]any{"socketPath": d.socket}, podResult(path))})
	o.ok(t)
	pod, ok := d.pod(id)
	if !ok || pod.Namespace != "default" || pod.Name != "4f2a9c81d0e5" || pod.UID != "" {
		t.Errorf("daemon has %+v (%v), want default/4f2a9c81d0e5", pod, ok)
	}
	if !strings.Contains(string(o.stderr), "no K8S_POD_NAMESPACE/K8S_POD_NAME") {
		t.Errorf("stderr does not warn about the fallback: %s", o.stderr)
	}
	if !slices.Equal(pod.IPs, []netip.Addr{netip.MustParseAddr("10.99.0.5"), netip.MustParseAddr("fd00:99::5")}) {
		t.Errorf("IPs = %v", pod.IPs)
	}
}
