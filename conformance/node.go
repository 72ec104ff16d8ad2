package conformance

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/meshless/meshless/internal/promtest"
)

// Fixed names inside a node's network namespace (each node has its own, so they cannot clash).
const (
	BridgeName = "cni0"
	// HealthAddr is meshlessd's --health-addr: the node namespace's own loopback.
	HealthAddr = "127.0.0.1:15021"
	// NetworkName is the name of the pod network in both conflists: sharing it means sharing
	// host-local's allocations, so mesh and plain pods never get the same address.
	NetworkName = "k8s-pod-network"
	// PodAnnotationsCapability is the CNI capability through which containerd passes a pod's
	// annotations to the plugins that declare it.
	PodAnnotationsCapability = "io.kubernetes.cri.pod-annotations"
)

// NodeConfig describes one simulated node; zero fields take the cluster's defaults.
type NodeConfig struct {
	// Name is meshlessd's --node-name; empty means the node's network namespace name.
	Name string
	// PodCIDR and PodCIDR6 are the node's pod ranges; empty means the node's slice of
	// ClusterCIDR4 (and ClusterCIDR6 when the cluster is dual-stack).
	PodCIDR, PodCIDR6 netip.Prefix
	Mode              string
	TrustDomain       string
	// CADir is the CA the daemon mints from; empty means the cluster's CA.
	CADir string
	// MeshCIDRs are the daemon's --mesh-cidr values; empty means the cluster's pod space.
	MeshCIDRs []netip.Prefix
	// PluginConf is merged into the meshless-cni entry of the node's conflist
	// (excludeInboundPorts, excludeOutboundPorts, excludeOutboundCIDRs, ...).
	PluginConf map[string]any
	// SVIDTTL is the daemon's --svid-ttl; zero leaves the daemon's default.
	SVIDTTL time.Duration
	// DaemonArgs are appended to `meshlessd run`.
	DaemonArgs []string
	// DaemonEnv is added to meshlessd's environment ("KEY=VALUE"), GODEBUG=fips140=on say.
	DaemonEnv []string
	// NoDaemon leaves meshlessd out: the node can only run plain pods. The harness's own tests
	// use it; so can a node that plays a cluster without meshless.
	NoDaemon bool
}

// Node is a simulated node: a network namespace holding the pod bridge and running meshlessd.
type Node struct {
	Cluster *Cluster
	Config  NodeConfig
	// Name is the daemon's node name; Netns the network namespace's name.
	Name, Netns string
	Dir         string
	// Gateway and Gateway6 are the bridge's addresses, the pods' default gateway and the source of
	// the node's own connections to its pods (kubelet probes).
	PodCIDR, PodCIDR6 netip.Prefix
	Gateway, Gateway6 netip.Addr
	// Underlay and Underlay6 are the node's addresses on the network between nodes.
	Underlay, Underlay6 netip.Addr
	overlay, overlay6   netip.Addr
	Socket, StateDir    string
	LogPath, CNILog     string
	ConfDir, CacheDir   string
	WorkloadsPath       string

	cni      *libcni.CNIConfig
	cniLog   *os.File
	lo, mesh []byte // the loopback and default mesh conflists

	mu     sync.Mutex
	daemon *Process
}

// AddNode creates a node: its namespace, directories, conflists and (unless cfg.NoDaemon) a
// running, ready meshlessd.
func (c *Cluster) AddNode(ctx context.Context, cfg NodeConfig) (*Node, error) {
	c.mu.Lock()
	c.nextID++
	id := c.nextID
	c.mu.Unlock()
	if id > 255 {
		return nil, errors.New("a cluster holds at most 255 nodes")
	}
	if !cfg.PodCIDR.IsValid() {
		a := ClusterCIDR4.Addr().As4()
		a[2] = byte(id)
		cfg.PodCIDR = netip.PrefixFrom(netip.AddrFrom4(a), 24)
	}
	if !cfg.PodCIDR6.IsValid() && c.Config.IPv6 {
		a := ClusterCIDR6.Addr().As16()
		a[7] = byte(id)
		cfg.PodCIDR6 = netip.PrefixFrom(netip.AddrFrom16(a), 64)
	}
	if cfg.Mode == "" {
		cfg.Mode = c.Config.Mode
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = c.Config.TrustDomain
	}
	if len(cfg.MeshCIDRs) == 0 {
		cfg.MeshCIDRs = c.MeshCIDRs()
	}
	if !cfg.NoDaemon && !c.Config.Bins.Meshless() {
		return nil, errors.New("a node with meshlessd needs BuildBinaries (not BuildHarnessBinaries)")
	}
	env := c.Env
	netnsName, err := NewNetns(ctx, env, c.Config.NodePrefix)
	if err != nil {
		return nil, err
	}
	n := &Node{
		Cluster: c, Config: cfg, Name: cfg.Name, Netns: netnsName,
		Dir:     filepath.Join(c.Dir, netnsName),
		PodCIDR: cfg.PodCIDR, PodCIDR6: cfg.PodCIDR6,
		Gateway: cfg.PodCIDR.Masked().Addr().Next(),
	}
	if n.Name == "" {
		n.Name = netnsName
	}
	if cfg.PodCIDR6.IsValid() {
		n.Gateway6 = cfg.PodCIDR6.Masked().Addr().Next()
	}
	n.Socket = filepath.Join(n.Dir, "cni.sock")
	n.StateDir = filepath.Join(n.Dir, "state")
	n.LogPath = filepath.Join(n.Dir, "meshlessd.log")
	n.CNILog = filepath.Join(n.Dir, "cni.log")
	n.ConfDir = filepath.Join(n.Dir, "net.d")
	n.CacheDir = filepath.Join(n.Dir, "cni-cache")
	if len(n.Socket) > 100 {
		return nil, fmt.Errorf("socket path %s is too long for a unix socket: use a shorter TMPDIR", n.Socket)
	}
	for _, d := range []string{n.Dir, n.StateDir, n.ConfDir, n.CacheDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("creating %s: %w", d, err)
		}
	}
	n.cniLog, err = os.OpenFile(n.CNILog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	env.Cleanup(func() { n.cniLog.Close() })
	// Plugins write their diagnostics to stderr; keep them with the node for post-mortems.
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{c.Config.Bins.Dir}, n.CacheDir, &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: n.cniLog}})
	if err := n.writeConfLists(); err != nil {
		return nil, err
	}
	env.Cleanup(func() {
		if env.Failed() {
			n.dumpLogs()
		}
	})
	if err := c.joinNode(ctx, n, id); err != nil {
		return nil, err
	}
	if !cfg.NoDaemon {
		if n.WorkloadsPath, err = c.writeWorkloads(); err != nil {
			return nil, err
		}
		if cfg.CADir == "" {
			if n.Config.CADir, err = c.CADir(ctx); err != nil {
				return nil, err
			}
		}
		if err := n.Start(ctx); err != nil {
			return nil, err
		}
	}
	c.mu.Lock()
	c.nodes = append(c.nodes, n)
	c.mu.Unlock()
	env.Logf("node %s: netns %s, pods %s %s, dir %s", n.Name, n.Netns, n.PodCIDR, optPrefix(n.PodCIDR6), n.Dir)
	return n, nil
}

func optPrefix(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

// NetnsPath returns the path of the node's network namespace.
func (n *Node) NetnsPath() string { return NetnsPath(n.Netns) }

// ConfList returns a conflist for this node: [bridge + host-local] plus, when mesh is true, a
// meshless-cni entry with the node's PluginConf and then extra merged in.
func (n *Node) ConfList(mesh bool, extra map[string]any) ([]byte, error) {
	ranges := [][]map[string]string{{{"subnet": n.PodCIDR.String()}}}
	routes := []map[string]string{{"dst": "0.0.0.0/0"}}
	if n.PodCIDR6.IsValid() {
		ranges = append(ranges, []map[string]string{{"subnet": n.PodCIDR6.String()}})
		routes = append(routes, map[string]string{"dst": "::/0"})
	}
	plugins := []map[string]any{{
		"type":      "bridge",
		"bridge":    BridgeName,
		"isGateway": true,
		"ipMasq":    false,
		"ipam": map[string]any{
			"type":    "host-local",
			"ranges":  ranges,
			"routes":  routes,
			"dataDir": filepath.Join(n.Dir, "ipam"),
		},
	}}
	if mesh {
		// The capability, as meshlessd install-cni declares it.
		entry := map[string]any{"type": "meshless-cni", "socketPath": n.Socket, "logLevel": "debug",
			"capabilities": map[string]bool{PodAnnotationsCapability: true}}
		maps.Copy(entry, n.Config.PluginConf)
		maps.Copy(entry, extra)
		plugins = append(plugins, entry)
	}
	return json.MarshalIndent(map[string]any{
		"cniVersion": n.Cluster.Config.CNIVersion,
		"name":       NetworkName,
		"plugins":    plugins,
	}, "", "  ")
}

// writeConfLists writes the node's conflists where a runtime would read them, and keeps the
// bytes for pods that do not override the plugin config.
func (n *Node) writeConfLists() error {
	var err error
	if n.mesh, err = n.ConfList(true, nil); err != nil {
		return err
	}
	plain, err := n.ConfList(false, nil)
	if err != nil {
		return err
	}
	n.lo = fmt.Appendf(nil, `{"cniVersion": %q, "name": "cni-loopback", "plugins": [{"type": "loopback"}]}`, n.Cluster.Config.CNIVersion)
	for name, b := range map[string][]byte{"10-meshless.conflist": n.mesh, "20-plain.conflist": plain, "99-loopback.conflist": n.lo} {
		if err := os.WriteFile(filepath.Join(n.ConfDir, name), b, 0o644); err != nil {
			return fmt.Errorf("writing conflist: %w", err)
		}
	}
	return nil
}

// Do runs f on a thread inside the node's network namespace. Programs f starts inherit the
// namespace (that is how CNI plugins see the node as their host); goroutines f starts do not.
func (n *Node) Do(f func() error) error {
	return ns.WithNetNSPath(n.NetnsPath(), func(ns.NetNS) error { return f() })
}

// Exec runs argv inside the node's network namespace and returns its stdout.
func (n *Node) Exec(ctx context.Context, argv ...string) ([]byte, error) {
	return Exec(ctx, n.Netns, argv...)
}

// Dial connects from the node's network namespace, as the kubelet's probes do.
func (n *Node) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	return DialIn(ctx, n.NetnsPath(), network, address)
}

// DaemonArgs returns the `meshlessd run` command line of this node.
func (n *Node) DaemonArgs() []string {
	args := []string{
		n.Cluster.Config.Bins.Daemon, "run",
		"--node-name", n.Name,
		"--trust-domain", n.Config.TrustDomain,
		"--ca-dir", n.Config.CADir,
		"--state-dir", n.StateDir,
		"--socket", n.Socket,
		"--mode", n.Config.Mode,
		"--workloads", n.WorkloadsPath,
		"--health-addr", HealthAddr,
		"--log-level", "debug",
		// Where it runs meshless-cni itself (adopting pods, repairing their capture): this
		// node's chain, never the machine's.
		"--cni-conf-dir", n.ConfDir,
		"--cni-bin-dir", n.Cluster.Config.Bins.Dir,
	}
	for _, p := range n.Config.MeshCIDRs {
		args = append(args, "--mesh-cidr", p.String())
	}
	if n.Config.SVIDTTL > 0 {
		args = append(args, "--svid-ttl", n.Config.SVIDTTL.String())
	}
	return append(args, n.Config.DaemonArgs...)
}

// Start starts meshlessd in the node's namespace and waits until /readyz answers 200.
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.Config.NoDaemon {
		return fmt.Errorf("node %s has no daemon", n.Name)
	}
	if n.daemon != nil {
		if done, _ := n.daemon.Exited(); !done {
			return fmt.Errorf("meshlessd on %s is already running", n.Name)
		}
	}
	argv := n.DaemonArgs()
	if len(n.Config.DaemonEnv) > 0 {
		// env(1) execs the daemon, so the process (and its pid) is still meshlessd.
		argv = append(append([]string{"env"}, n.Config.DaemonEnv...), argv...)
	}
	p, err := StartProcess(n.Cluster.Env, n.Dir, "meshlessd", n.Netns, argv...)
	if err != nil {
		return err
	}
	n.daemon = p
	if err := n.waitReady(ctx, p); err != nil {
		return fmt.Errorf("meshlessd on %s: %w\n%s", n.Name, err, tail(p.Output(), 40))
	}
	return nil
}

// Stop stops meshlessd gracefully (SIGTERM, SIGKILL after 10s) and waits for it to exit.
func (n *Node) Stop() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.daemon == nil {
		return nil
	}
	return n.daemon.Stop(10 * time.Second)
}

// Kill kills meshlessd (SIGKILL), as a crash or an OOM kill would.
func (n *Node) Kill() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.daemon == nil {
		return nil
	}
	return n.daemon.Kill()
}

// Restart stops meshlessd and starts it again.
func (n *Node) Restart(ctx context.Context) error {
	if err := n.Stop(); err != nil {
		return err
	}
	return n.Start(ctx)
}

// Running reports whether meshlessd is running.
func (n *Node) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.daemon == nil {
		return false
	}
	done, _ := n.daemon.Exited()
	return !done
}

// Daemon returns the current meshlessd process (nil before the first Start).
func (n *Node) Daemon() *Process {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.daemon
}

// Ready asks meshlessd's /readyz, from inside the node's namespace where it listens.
func (n *Node) Ready(ctx context.Context) error {
	_, err := n.healthGet(ctx, "/readyz")
	return err
}

// Metrics reads meshlessd's /metrics, as Prometheus would scrape it, and returns every sample
// by its name and labels (see promtest.Parse). A body that Prometheus's own parser rejects is
// an error.
func (n *Node) Metrics(ctx context.Context) (map[string]float64, error) {
	body, err := n.healthGet(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	samples, err := promtest.Parse(bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("/metrics on %s: %w", n.Name, err)
	}
	return samples, nil
}

// healthGet GETs path from meshlessd's health server and returns the body of a 200 answer.
func (n *Node) healthGet(ctx context.Context, path string) ([]byte, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return n.Dial(ctx, network, addr)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+HealthAddr+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	return body, nil
}

func (n *Node) waitReady(ctx context.Context, p *Process) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var last error
	for {
		if done, err := p.Exited(); done {
			return fmt.Errorf("exited before becoming ready: %v", err)
		}
		attempt, cancelAttempt := context.WithTimeout(ctx, 2*time.Second)
		last = n.Ready(attempt)
		cancelAttempt()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not ready: %w (last: %v)", ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Logs returns the records meshlessd has logged on this node, across restarts.
func (n *Node) Logs() (Log, error) { return ReadLog(n.LogPath) }

// WaitLog waits until meshlessd has logged a record matching every key/value pair in kv
// (see Log.Find), and returns the first such record.
func (n *Node) WaitLog(ctx context.Context, kv ...any) (Record, error) {
	for {
		l, err := n.Logs()
		if err != nil {
			return nil, err
		}
		if found := l.Find(kv...); len(found) > 0 {
			return found[0], nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no log record %v on %s: %w", kv, n.Name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// dumpLogs reports the end of the node's logs; a failed test shows the daemon's view.
func (n *Node) dumpLogs() {
	for _, path := range []string{n.LogPath, n.CNILog} {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		n.Cluster.Env.Logf("--- %s (last 60 lines) ---\n%s", path, tail(string(b), 60))
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
