package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/meshless/meshless/internal/testserve"
	"github.com/meshless/meshless/pkg/enroll"
	"github.com/meshless/meshless/pkg/enrollhttp"
)

// runAsPluginEnv makes the test binary act as meshless-cni, so that tests run the real
// command line (skel, stdout, stderr, exit status) without building anything.
const runAsPluginEnv = "MESHLESS_CNI_TEST_RUN_PLUGIN"

func TestMain(m *testing.M) {
	if os.Getenv(runAsPluginEnv) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// invocation is one run of the plugin.
type invocation struct {
	command     string
	containerID string
	netns       string
	ifName      string
	args        string // CNI_ARGS
	stdin       []byte
}

// outcome is what the plugin printed and how it exited.
type outcome struct {
	stdout, stderr []byte
	exitCode       int
}

// cniError decodes stdout as a CNI error, failing the test unless the plugin failed with one.
func (o outcome) cniError(t *testing.T) *types.Error {
	t.Helper()
	if o.exitCode == 0 {
		t.Fatalf("plugin succeeded, want an error; stdout %s; stderr %s", o.stdout, o.stderr)
	}
	e := &types.Error{}
	dec := json.NewDecoder(bytes.NewReader(o.stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(e); err != nil || e.Code == 0 || e.Msg == "" {
		t.Fatalf("stdout is not a CNI error (%v): %s", err, o.stdout)
	}
	return e
}

// ok fails the test unless the plugin succeeded.
func (o outcome) ok(t *testing.T) {
	t.Helper()
	if o.exitCode != 0 {
		t.Fatalf("plugin failed with exit code %d: stdout %s; stderr %s", o.exitCode, o.stdout, o.stderr)
	}
}

func run(t *testing.T, in invocation) outcome {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = []string{
		runAsPluginEnv + "=1",
		"PATH=" + os.Getenv("PATH"),
		"CNI_COMMAND=" + in.command,
		"CNI_CONTAINERID=" + in.containerID,
		"CNI_NETNS=" + in.netns,
		"CNI_IFNAME=" + in.ifName,
		"CNI_ARGS=" + in.args,
		"CNI_PATH=/opt/cni/bin",
	}
	cmd.Stdin = bytes.NewReader(in.stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run plugin: %v", err)
	}
	return outcome{stdout: stdout.Bytes(), stderr: stderr.Bytes(), exitCode: cmd.ProcessState.ExitCode()}
}

// netconf is the configuration libcni hands the plugin: the network's name and version, the
// plugin's own keys, and prevResult (when prev is not nil) in that version.
func netconf(t *testing.T, cniVersion string, keys map[string]any, prev *current.Result) []byte {
	t.Helper()
	conf := map[string]any{"cniVersion": cniVersion, "name": "mlnet", "type": "meshless-cni"}
	for k, v := range keys {
		conf[k] = v
	}
	if prev != nil {
		conf["prevResult"] = resultAs(t, prev, cniVersion)
	}
	b, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// resultAs returns r converted to version v, as a JSON value.
func resultAs(t *testing.T, r *current.Result, v string) map[string]any {
	t.Helper()
	conv, err := r.GetAsVersion(v)
	if err != nil {
		t.Fatalf("convert result to %s: %v", v, err)
	}
	b, err := json.Marshal(conv)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// podResult is what a bridge-like primary plugin returns for a dual-stack pod: the bridge and
// the host end of the veth (not in the sandbox, the bridge holding the gateway address), and
// eth0 in the sandbox holding the pod's addresses.
func podResult(netnsPath string) *current.Result {
	zero, two := 0, 2
	return &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: "mlbr0", Mac: "0a:58:0a:63:00:01"},
			{Name: "veth1a2b3c4d", Mac: "0a:58:0a:63:00:02"},
			{Name: "eth0", Mac: "0a:58:0a:63:00:05", Sandbox: netnsPath},
		},
		IPs: []*current.IPConfig{
			{Interface: &zero, Address: mustCIDR("10.99.0.1/24")},
			{Interface: &two, Address: mustCIDR("10.99.0.5/24"), Gateway: net.ParseIP("10.99.0.1")},
			{Interface: &two, Address: mustCIDR("fd00:99::5/64"), Gateway: net.ParseIP("fd00:99::1")},
		},
		Routes: []*types.Route{{Dst: mustCIDR("0.0.0.0/0"), GW: net.ParseIP("10.99.0.1")}},
	}
}

func mustCIDR(s string) net.IPNet {
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	n.IP = ip
	return *n
}

// fakeDaemon is meshlessd's enrollment API (the real Handler) over a fake Service.
type fakeDaemon struct {
	socket string

	mu        sync.Mutex
	pods      map[string]enroll.Pod
	removes   []string
	keeps     [][]string
	status    enroll.Status
	enrollErr error
	skip      string // the reason the daemon gives for skipping every pod; "" to serve them
}

func startDaemon(t *testing.T, backend string) *fakeDaemon {
	t.Helper()
	// Short directory: unix socket paths are limited to 108 bytes and test names are long.
	dir, err := os.MkdirTemp("", "mlplug")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &fakeDaemon{
		socket: filepath.Join(dir, "cni.sock"),
		pods:   map[string]enroll.Pod{},
		status: enroll.Status{Node: "node-1", Backend: backend, Ready: true, TrustDomain: "cluster.local", Mode: "strict"},
	}
	l, err := enroll.Listen(d.socket)
	if err != nil {
		t.Fatal(err)
	}
	testserve.Serve(t, l, enrollhttp.Handler(d))
	return d
}

func (d *fakeDaemon) Enroll(_ context.Context, p enroll.Pod) (enroll.Enrollment, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.enrollErr != nil {
		return enroll.Enrollment{}, d.enrollErr
	}
	d.pods[p.ContainerID] = p
	if d.skip != "" {
		return enroll.Enrollment{Pod: p, Skipped: d.skip, EnrolledAt: time.Now(), Backend: d.status.Backend}, nil
	}
	return enroll.Enrollment{Pod: p, SPIFFEID: "spiffe://cluster.local/ns/" + p.Namespace + "/sa/default", EnrolledAt: time.Now(), Backend: d.status.Backend}, nil
}

// publish publishes backend beside the daemon's socket, as meshlessd does when it starts.
func (d *fakeDaemon) publish(t *testing.T, backend string) {
	t.Helper()
	if err := enroll.PublishBackend(d.socket, backend); err != nil {
		t.Fatal(err)
	}
}

func (d *fakeDaemon) Remove(_ context.Context, id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.removes = append(d.removes, id)
	delete(d.pods, id)
	return nil
}

func (d *fakeDaemon) Get(_ context.Context, id string) (enroll.Enrollment, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.pods[id]
	if !ok {
		return enroll.Enrollment{}, fmt.Errorf("container %s: %w", id, enroll.ErrNotFound)
	}
	return enroll.Enrollment{Pod: p, Backend: d.status.Backend}, nil
}

func (d *fakeDaemon) GC(_ context.Context, keep []string) ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.keeps = append(d.keeps, keep)
	var removed []string
	for id := range d.pods {
		if !slices.Contains(keep, id) {
			removed = append(removed, id)
			delete(d.pods, id)
		}
	}
	return removed, nil
}

func (d *fakeDaemon) Status(context.Context) enroll.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.status
}

func (d *fakeDaemon) pod(id string) (enroll.Pod, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.pods[id]
	return p, ok
}

// removed returns the container IDs the daemon was told to remove, in order.
func (d *fakeDaemon) removed() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.removes)
}

// missingSocket is a socket path where nothing listens.
func missingSocket(t *testing.T) string {
	dir, err := os.MkdirTemp("", "mlplug")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "cni.sock")
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces and iptables)")
	}
}

// podNetns creates a network namespace named mlplug-<random> (MESHLESS_TEST_NETNS_PREFIX
// replaces mlplug-, so that concurrent runs on one machine can tell their namespaces apart) with lo up and an eth0
// holding the addresses of podResult, and deletes it when the test ends.
func podNetns(t *testing.T) (name, path string) {
	t.Helper()
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	prefix := "mlplug-"
	if p := os.Getenv("MESHLESS_TEST_NETNS_PREFIX"); p != "" {
		prefix = p
	}
	name = prefix + hex.EncodeToString(b)
	ip(t, "netns", "add", name)
	t.Cleanup(func() {
		// Tests may delete the namespace themselves.
		if _, err := os.Stat(filepath.Join("/var/run/netns", name)); err == nil {
			ip(t, "netns", "del", name)
		}
	})
	ip(t, "-n", name, "link", "set", "lo", "up")
	// veth rather than dummy: not every kernel has the dummy module; the peer stays in the netns.
	ip(t, "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
	ip(t, "-n", name, "addr", "add", "10.99.0.5/24", "dev", "eth0")
	ip(t, "-n", name, "addr", "add", "fd00:99::5/64", "dev", "eth0", "nodad")
	ip(t, "-n", name, "link", "set", "eth0", "up")
	return name, filepath.Join("/var/run/netns", name)
}

func ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// inNetns runs a command in the named netns and returns its output.
func inNetns(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", name}, args...)...).CombinedOutput()
	return string(out), err
}

// podFor is an enrolled pod as the fake daemon stores it.
func podFor(containerID string) enroll.Pod {
	return enroll.Pod{ContainerID: containerID, IfName: "eth0", Netns: "/proc/self/ns/net", Namespace: "default", Name: containerID,
		IPs: []netip.Addr{netip.MustParseAddr("10.99.0.9")}}
}
