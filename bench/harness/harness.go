// Package harness builds what `make bench` measures, on the conformance library: one simulated
// node running meshlessd, with two plain pods (attached by bridge + host-local only) and two
// meshless pods (meshless-cni chained) on its bridge. The plain pods also carry an stunnel4 pair
// and an haproxy pair, client side in the client pod and server side in the server pod, speaking
// TLS 1.3 with client certificates minted from the cluster's CA. Every server pod runs the same
// servers: iperf3, nginx serving a 1 KiB file, and meshless-testapp's echo server.
//
// A Variant says where a client application in its client pod connects to reach a server port,
// and which processes are the proxies whose CPU time is charged to it. The workloads (iperf3,
// request/response, wrk, hey) run against a Variant.
package harness

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/meshless/meshless/conformance"
)

// The servers' ports inside every server pod.
const (
	IPerfPort = 5201
	EchoPort  = 8080
	HTTPPort  = 8081
)

// HTTPPath is nginx's 1 KiB body.
const HTTPPath = "/1k"

// HTTPBodySize is the size of the body at HTTPPath.
const HTTPBodySize = 1024

// Variant names, in the order they are run.
const (
	Plaintext = "plaintext"
	Meshless  = "meshless"
	Stunnel   = "stunnel4"
	HAProxy   = "haproxy"
)

// Tools are the programs the benchmark runs, by path.
type Tools struct {
	IPerf3, Wrk, Hey, Nginx, Stunnel, HAProxy string
}

// HeyVersion is the version of hey (github.com/rakyll/hey) that scripts/bench-deps.sh installs.
const HeyVersion = "v0.1.5"

// DefaultHey is where scripts/bench-deps.sh caches hey: $MESHLESS_CACHE (default
// /var/cache/meshless)/hey-HeyVersion/hey.
func DefaultHey() string {
	cache := os.Getenv("MESHLESS_CACHE")
	if cache == "" {
		cache = "/var/cache/meshless"
	}
	return filepath.Join(cache, "hey-"+HeyVersion, "hey")
}

// FindTools locates the tools in PATH (and /usr/sbin, where nginx and haproxy live). hey is the
// given path when not empty, else DefaultHey when that exists, else hey in PATH. The error
// names every missing tool.
func FindTools(hey string) (Tools, error) {
	var missing []error
	look := func(name string) string {
		for _, p := range []string{name, "/usr/sbin/" + name, "/usr/bin/" + name} {
			if path, err := exec.LookPath(p); err == nil {
				return path
			}
		}
		missing = append(missing, fmt.Errorf("%s not found", name))
		return ""
	}
	t := Tools{IPerf3: look("iperf3"), Wrk: look("wrk"), Nginx: look("nginx"), Stunnel: look("stunnel"), HAProxy: look("haproxy")}
	if hey == "" {
		if _, err := os.Stat(DefaultHey()); err == nil {
			hey = DefaultHey()
		}
	}
	if hey == "" {
		t.Hey = look("hey")
	} else if _, err := os.Stat(hey); err != nil {
		missing = append(missing, fmt.Errorf("hey: %w", err))
	} else {
		t.Hey = hey
	}
	if err := errors.Join(missing...); err != nil {
		return t, fmt.Errorf("benchmark tools missing (make bench-deps installs them): %w", err)
	}
	return t, nil
}

// Config describes a benchmark setup.
type Config struct {
	Bins  *conformance.Bins
	Tools Tools
	// NodePrefix and PodPrefix start the names of the network namespaces created.
	NodePrefix, PodPrefix string
}

// Variant is one way for the client pod's applications to reach the server pod's.
type Variant struct {
	Name           string
	Client, Server *conformance.Pod
	// Reference marks the proxy pairs meshless is compared with.
	Reference bool
	// target maps a server port to the address a client application connects to.
	target  func(port uint16) netip.AddrPort
	proxies func() []int
}

// Target returns the address a client application connects to in order to reach the server's
// port: the server pod itself, or the local proxy in the client pod.
func (v *Variant) Target(port uint16) netip.AddrPort { return v.target(port) }

// ProxyPIDs returns the processes that carry this variant's traffic besides the applications
// and the kernel (none for plaintext).
func (v *Variant) ProxyPIDs() []int {
	if v.proxies == nil {
		return nil
	}
	return v.proxies()
}

// Bench is a set-up benchmark: the cluster, its node, and the variants in run order.
type Bench struct {
	Cluster  *conformance.Cluster
	Node     *conformance.Node
	Variants []*Variant
	Tools    Tools
	// Certs are the proxies' credentials.
	Certs Certs
}

// Variant returns the variant of that name, or nil.
func (b *Bench) Variant(name string) *Variant {
	for _, v := range b.Variants {
		if v.Name == name {
			return v
		}
	}
	return nil
}

// Setup creates the cluster, the node with meshlessd, the four pods, their servers and the
// reference proxy pairs. Everything is registered with env for teardown.
func Setup(ctx context.Context, env conformance.Env, cfg Config) (*Bench, error) {
	cluster, err := conformance.NewCluster(env, conformance.ClusterConfig{
		Bins: cfg.Bins, NodePrefix: cfg.NodePrefix, PodPrefix: cfg.PodPrefix,
	})
	if err != nil {
		return nil, err
	}
	node, err := cluster.AddNode(ctx, NodeConfig())
	if err != nil {
		return nil, err
	}
	b := &Bench{Cluster: cluster, Node: node, Tools: cfg.Tools}
	pods := map[string]*conformance.Pod{}
	for _, p := range []struct {
		name string
		mesh bool
	}{{"plain-client", false}, {"plain-server", false}, {"mesh-client", true}, {"mesh-server", true}} {
		add := node.AddPlainPod
		if p.mesh {
			add = node.AddPod
		}
		if pods[p.name], err = add(ctx, conformance.PodConfig{Namespace: "bench", Name: p.name}); err != nil {
			return nil, err
		}
	}
	for _, name := range []string{"plain-server", "mesh-server"} {
		if err := startServers(ctx, b, pods[name]); err != nil {
			return nil, err
		}
	}
	caDir, err := cluster.CADir(ctx)
	if err != nil {
		return nil, err
	}
	if b.Certs, err = MintCerts(caDir, filepath.Join(cluster.Dir, "proxy-certs"), cluster.Config.TrustDomain); err != nil {
		return nil, err
	}
	direct := func(server *conformance.Pod) func(uint16) netip.AddrPort {
		return func(port uint16) netip.AddrPort { return netip.AddrPortFrom(server.IPv4(), port) }
	}
	plainClient, plainServer := pods["plain-client"], pods["plain-server"]
	b.Variants = append(b.Variants,
		&Variant{Name: Plaintext, Client: plainClient, Server: plainServer, target: direct(plainServer)},
		&Variant{Name: Meshless, Client: pods["mesh-client"], Server: pods["mesh-server"], target: direct(pods["mesh-server"]),
			proxies: func() []int {
				if d := node.Daemon(); d != nil {
					return []int{d.Pid()}
				}
				return nil
			}},
	)
	for _, start := range []func(context.Context, *Bench, *conformance.Pod, *conformance.Pod) (*Variant, error){startStunnel, startHAProxy} {
		v, err := start(ctx, b, plainClient, plainServer)
		if err != nil {
			return nil, err
		}
		b.Variants = append(b.Variants, v)
	}
	return b, nil
}

// NodeConfig is the benchmark's node: meshlessd and meshless-cni at their default log level
// (info: one line per proxied connection), not the harness's debug. To compare settings,
// MESHLESS_BENCH_DAEMON_ARGS ("--pq=false ...") is added to meshlessd's arguments and
// MESHLESS_BENCH_DAEMON_ENV ("KEY=VALUE ...") to its environment.
func NodeConfig() conformance.NodeConfig {
	return conformance.NodeConfig{
		DaemonArgs: append([]string{"--log-level", "info"}, strings.Fields(os.Getenv("MESHLESS_BENCH_DAEMON_ARGS"))...),
		DaemonEnv:  strings.Fields(os.Getenv("MESHLESS_BENCH_DAEMON_ENV")),
		PluginConf: map[string]any{"logLevel": "info"},
	}
}
