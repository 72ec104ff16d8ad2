package conformance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
)

// Defaults of a ClusterConfig.
const (
	DefaultTrustDomain = "cluster.local"
	DefaultNodePrefix  = "mlnode-"
	DefaultPodPrefix   = "mlpod-"
	DefaultCNIVersion  = "1.1.0"
	ModeStrict         = "strict"
	ModePermissive     = "permissive"
)

// The cluster's pod address space; node i (from 1) gets the i-th /24 and /64 of it, so every
// daemon can be given the whole space as its mesh CIDRs and nodes can be added at any time.
var (
	ClusterCIDR4 = netip.MustParsePrefix("10.244.0.0/16")
	ClusterCIDR6 = netip.MustParsePrefix("fd00:10:244::/48")
)

// ClusterConfig describes a simulated cluster. The zero value of every field but Bins is usable.
type ClusterConfig struct {
	Bins *Bins
	// Dir holds everything the cluster writes; empty means a new temporary directory that is
	// removed at cleanup.
	Dir         string
	TrustDomain string
	// IPv6 gives every node an IPv6 pod CIDR too (dual-stack pods).
	IPv6 bool
	// Mode is the default `--mode` of the nodes' daemons.
	Mode string
	// NodePrefix and PodPrefix start the names of the network namespaces the cluster creates.
	NodePrefix, PodPrefix string
	// Workloads maps "namespace/name" to a service account, as `meshlessd --workloads` reads it
	// (at start-up: set it before adding nodes). Unmapped pods are "default".
	Workloads map[string]string
	// CNIVersion is the cniVersion of the generated conflists.
	CNIVersion string
	// Join is how nodes reach each other's pods; empty means JoinHostGW.
	Join Join
}

// Cluster is a set of simulated nodes sharing one CA and one pod address space.
type Cluster struct {
	Env    Env
	Config ClusterConfig
	Dir    string

	mu           sync.Mutex
	caDir        string
	nodes        []*Node
	nextID       int
	fabric       string
	externals    []*External
	nextExternal int
}

// NewCluster prepares a cluster's directory; nodes are added with AddNode.
func NewCluster(env Env, cfg ClusterConfig) (*Cluster, error) {
	if cfg.Bins == nil {
		return nil, errors.New("cluster config: Bins is required (see BuildBinaries)")
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = DefaultTrustDomain
	}
	if cfg.Mode == "" {
		cfg.Mode = ModeStrict
	}
	if cfg.NodePrefix == "" {
		cfg.NodePrefix = DefaultNodePrefix
	}
	if cfg.PodPrefix == "" {
		cfg.PodPrefix = DefaultPodPrefix
	}
	if cfg.CNIVersion == "" {
		cfg.CNIVersion = DefaultCNIVersion
	}
	switch cfg.Join {
	case "":
		cfg.Join = JoinHostGW
	case JoinHostGW, JoinVXLAN:
	default:
		return nil, fmt.Errorf("cluster config: unknown join %q", cfg.Join)
	}
	dir := cfg.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "meshless-conformance-")
		if err != nil {
			return nil, fmt.Errorf("creating cluster dir: %w", err)
		}
		dir = d
		env.Cleanup(func() {
			if err := os.RemoveAll(d); err != nil {
				env.Logf("cleanup: %v", err)
			}
		})
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating cluster dir: %w", err)
	}
	return &Cluster{Env: env, Config: cfg, Dir: dir}, nil
}

// Nodes returns the nodes added so far.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*Node(nil), c.nodes...)
}

// MeshCIDRs returns the cluster's pod address space: the default `--mesh-cidr` of every daemon.
func (c *Cluster) MeshCIDRs() []netip.Prefix {
	if c.Config.IPv6 {
		return []netip.Prefix{ClusterCIDR4, ClusterCIDR6}
	}
	return []netip.Prefix{ClusterCIDR4}
}

// ServiceAccount returns the service account the daemons give the pod namespace/name.
func (c *Cluster) ServiceAccount(namespace, name string) string {
	if sa, ok := c.Config.Workloads[namespace+"/"+name]; ok {
		return sa
	}
	return "default"
}

// SPIFFEID returns the identity the daemons give the pod namespace/name.
func (c *Cluster) SPIFFEID(namespace, name string) string {
	return SPIFFEID(c.Config.TrustDomain, namespace, c.ServiceAccount(namespace, name))
}

// SPIFFEID formats a workload identity the way meshless does.
func SPIFFEID(trustDomain, namespace, serviceAccount string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, namespace, serviceAccount)
}

// CADir returns the cluster's CA directory, creating the CA with `meshlessd ca init` on first use.
func (c *Cluster) CADir(ctx context.Context) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.caDir != "" {
		return c.caDir, nil
	}
	dir := filepath.Join(c.Dir, "ca")
	if err := InitCA(ctx, c.Config.Bins, dir); err != nil {
		return "", err
	}
	c.caDir = dir
	return dir, nil
}

// InitCA creates a CA in dir with `meshlessd ca init`; a second CA plays a foreign cluster.
func InitCA(ctx context.Context, bins *Bins, dir string) error {
	if bins.Daemon == "" {
		return errors.New("meshlessd was not built (BuildBinaries builds it)")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating CA dir: %w", err)
	}
	if _, err := run(ctx, bins.Daemon, "ca", "init", "--dir", dir); err != nil {
		return fmt.Errorf("creating the CA: %w", err)
	}
	return nil
}

// writeWorkloads writes the cluster's workloads file for the daemons.
func (c *Cluster) writeWorkloads() (string, error) {
	path := filepath.Join(c.Dir, "workloads.json")
	m := c.Config.Workloads
	if m == nil {
		m = map[string]string{}
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return "", fmt.Errorf("writing workloads file: %w", err)
	}
	return path, nil
}
