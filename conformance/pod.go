package conformance

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// PodConfig describes a pod; Name is required, the rest has defaults.
type PodConfig struct {
	Namespace string // default "default"
	Name      string
	UID       string // default: a random UUID
	// ContainerID is the sandbox ID the runtime passes as CNI_CONTAINERID and
	// K8S_POD_INFRA_CONTAINER_ID; default: 64 random hex digits, like containerd's.
	ContainerID string
	// PluginConf is merged into this pod's meshless-cni entry over the node's.
	PluginConf map[string]any
	// Annotations, when not nil, are passed as containerd passes a pod's annotations: as the
	// io.kubernetes.cri.pod-annotations capability argument (runtimeConfig) of the plugins that
	// declare it, as meshless-cni's entry does.
	Annotations map[string]string
}

// Pod is a network namespace attached to a node's bridge through libcni.
type Pod struct {
	Node                 *Node
	Namespace, Name, UID string
	ContainerID, Netns   string
	Dir                  string
	Mesh                 bool
	ConfList             []byte
	Result               *current.Result
	// AddTime is how long the last successful CNI ADD of the pod's network took (the conflist
	// only: not the namespace or loopback), as a runtime would measure it.
	AddTime      time.Duration
	list, loList *libcni.NetworkConfigList
	rt           *libcni.RuntimeConf
	deleted      bool
}

// AddPod creates a pod through the node's conflist [bridge + host-local, meshless-cni].
func (n *Node) AddPod(ctx context.Context, cfg PodConfig) (*Pod, error) {
	if n.Config.NoDaemon {
		return nil, fmt.Errorf("node %s runs no meshlessd: use AddPlainPod", n.Name)
	}
	list := n.mesh
	if cfg.PluginConf != nil {
		var err error
		if list, err = n.ConfList(true, cfg.PluginConf); err != nil {
			return nil, err
		}
	}
	return n.addPod(ctx, cfg, list)
}

// AddPlainPod creates a pod attached without meshless-cni: a workload outside the mesh.
func (n *Node) AddPlainPod(ctx context.Context, cfg PodConfig) (*Pod, error) {
	list, err := n.ConfList(false, nil)
	if err != nil {
		return nil, err
	}
	return n.addPod(ctx, cfg, list)
}

// AddPodWithConfList creates a pod through an arbitrary conflist (for broken or unusual
// configurations). The pod is torn down with the same conflist.
func (n *Node) AddPodWithConfList(ctx context.Context, cfg PodConfig, conflist []byte) (*Pod, error) {
	return n.addPod(ctx, cfg, conflist)
}

func (n *Node) addPod(ctx context.Context, cfg PodConfig, conflist []byte) (*Pod, error) {
	if cfg.Name == "" {
		return nil, errors.New("pod config: Name is required")
	}
	if cfg.Namespace == "" {
		cfg.Namespace = "default"
	}
	if cfg.UID == "" {
		cfg.UID = newUUID()
	}
	if cfg.ContainerID == "" {
		cfg.ContainerID = randomSuffix(32)
	}
	list, err := libcni.ConfListFromBytes(conflist)
	if err != nil {
		return nil, fmt.Errorf("parsing conflist: %w", err)
	}
	mesh := false
	for _, pl := range list.Plugins {
		mesh = mesh || pl.Network.Type == "meshless-cni"
	}
	loList, err := libcni.ConfListFromBytes(n.lo)
	if err != nil {
		return nil, fmt.Errorf("parsing loopback conflist: %w", err)
	}
	env := n.Cluster.Env
	netnsName, err := NewNetns(ctx, env, n.Cluster.Config.PodPrefix)
	if err != nil {
		return nil, err
	}
	p := &Pod{
		Node: n, Namespace: cfg.Namespace, Name: cfg.Name, UID: cfg.UID,
		ContainerID: cfg.ContainerID, Netns: netnsName, Dir: filepath.Join(n.Dir, netnsName),
		Mesh: mesh, ConfList: conflist, list: list, loList: loList,
	}
	if err := os.MkdirAll(p.Dir, 0o755); err != nil {
		return nil, err
	}
	p.rt = &libcni.RuntimeConf{
		ContainerID: cfg.ContainerID,
		NetNS:       NetnsPath(netnsName),
		IfName:      "eth0",
		// What containerd passes for a Kubernetes pod.
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", cfg.Namespace},
			{"K8S_POD_NAME", cfg.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", cfg.ContainerID},
			{"K8S_POD_UID", cfg.UID},
		},
	}
	if cfg.Annotations != nil {
		p.rt.CapabilityArgs = map[string]any{PodAnnotationsCapability: cfg.Annotations}
	}
	// Registered after the namespace, so it runs first: the runtime tears down the network
	// before it removes the sandbox.
	env.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := p.teardown(ctx); err != nil {
			env.Logf("cleanup of pod %s/%s: %v", p.Namespace, p.Name, err)
		}
	})
	loRT := *p.rt
	loRT.IfName = "lo"
	if err := n.Do(func() error {
		_, err := n.cni.AddNetworkList(ctx, loList, &loRT)
		return err
	}); err != nil {
		return nil, fmt.Errorf("loopback ADD for %s/%s: %w", cfg.Namespace, cfg.Name, err)
	}
	if err := p.Add(ctx); err != nil {
		// A runtime tears a failed sandbox down with DEL; the result is the ADD's error.
		if derr := p.Del(ctx); derr != nil {
			env.Logf("DEL after failed ADD of %s/%s: %v", cfg.Namespace, cfg.Name, derr)
		}
		return nil, err
	}
	env.Logf("pod %s/%s on %s: netns %s, IPs %v, mesh %v", p.Namespace, p.Name, n.Name, p.Netns, p.IPs(), mesh)
	return p, nil
}

// Add runs CNI ADD for the pod's network (again, for a pod that was deleted or to test re-ADD
// with the same container ID) and records the result.
func (p *Pod) Add(ctx context.Context) error {
	var res types.Result
	var took time.Duration
	err := p.Node.Do(func() error {
		start := time.Now()
		var err error
		res, err = p.Node.cni.AddNetworkList(ctx, p.list, p.rt)
		took = time.Since(start)
		return err
	})
	if err != nil {
		return fmt.Errorf("CNI ADD for %s/%s: %w", p.Namespace, p.Name, err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return fmt.Errorf("converting ADD result: %w", err)
	}
	p.Result, p.deleted, p.AddTime = r, false, took
	return nil
}

// Check runs CNI CHECK for the pod's network.
func (p *Pod) Check(ctx context.Context) error {
	err := p.Node.Do(func() error { return p.Node.cni.CheckNetworkList(ctx, p.list, p.rt) })
	if err != nil {
		return fmt.Errorf("CNI CHECK for %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// Del runs CNI DEL for the pod's network. The namespace stays until cleanup, as a runtime
// removes the sandbox after DEL.
func (p *Pod) Del(ctx context.Context) error {
	err := p.Node.Do(func() error { return p.Node.cni.DelNetworkList(ctx, p.list, p.rt) })
	if err != nil {
		return fmt.Errorf("CNI DEL for %s/%s: %w", p.Namespace, p.Name, err)
	}
	p.deleted = true
	return nil
}

func (p *Pod) teardown(ctx context.Context) error {
	var errs []error
	if !p.deleted {
		errs = append(errs, p.Del(ctx))
	}
	loRT := *p.rt
	loRT.IfName = "lo"
	errs = append(errs, p.Node.Do(func() error { return p.Node.cni.DelNetworkList(ctx, p.loList, &loRT) }))
	return errors.Join(errs...)
}

// RuntimeConf returns a copy of the runtime arguments libcni passes for this pod.
func (p *Pod) RuntimeConf() libcni.RuntimeConf { return *p.rt }

// NetnsPath returns the path of the pod's network namespace (CNI_NETNS).
func (p *Pod) NetnsPath() string { return NetnsPath(p.Netns) }

// IPs returns the pod's addresses from its CNI result.
func (p *Pod) IPs() []netip.Addr {
	if p.Result == nil {
		return nil
	}
	var ips []netip.Addr
	for _, ipc := range p.Result.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
			ips = append(ips, a.Unmap())
		}
	}
	return ips
}

// IPv4 returns the pod's IPv4 address (invalid if it has none).
func (p *Pod) IPv4() netip.Addr { return p.ip(true) }

// IPv6 returns the pod's IPv6 address (invalid if it has none).
func (p *Pod) IPv6() netip.Addr { return p.ip(false) }

func (p *Pod) ip(v4 bool) netip.Addr {
	for _, a := range p.IPs() {
		if a.Is4() == v4 {
			return a
		}
	}
	return netip.Addr{}
}

// HostVeth returns the name of the pod's veth peer on the node's bridge, for captures per pod.
func (p *Pod) HostVeth() string {
	if p.Result == nil {
		return ""
	}
	for _, i := range p.Result.Interfaces {
		if i.Sandbox == "" && i.Name != BridgeName {
			return i.Name
		}
	}
	return ""
}

// SPIFFEID returns the identity the daemons give this pod.
func (p *Pod) SPIFFEID() string { return p.Node.Cluster.SPIFFEID(p.Namespace, p.Name) }

// Exec runs argv inside the pod's network namespace and returns its stdout.
func (p *Pod) Exec(ctx context.Context, argv ...string) ([]byte, error) {
	return Exec(ctx, p.Netns, argv...)
}

// Start starts a long-running program in the pod, logging to the pod's dir/name.log; it is
// killed at cleanup.
func (p *Pod) Start(name string, argv ...string) (*Process, error) {
	return StartProcess(p.Node.Cluster.Env, p.Dir, name, p.Netns, argv...)
}

// Dial connects from inside the pod's network namespace; the connection is subject to the pod's
// capture rules like any application's.
func (p *Pod) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	return DialIn(ctx, p.NetnsPath(), network, address)
}

// LinkLocal returns the pod's IPv6 link-local address on its CNI interface, with the interface
// as its zone, once duplicate address detection has finished with it (a tentative address cannot
// be used). Every pod has one, whether or not CNI gave it an IPv6 address.
func (p *Pod) LinkLocal(ctx context.Context) (netip.Addr, error) {
	ifname := p.rt.IfName
	for {
		out, err := p.Exec(ctx, "ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "link", "-tentative")
		if err != nil {
			return netip.Addr{}, fmt.Errorf("addresses of %s on %s: %w: %s", p, ifname, err, out)
		}
		for f := range strings.FieldsSeq(string(out)) {
			if pfx, err := netip.ParsePrefix(f); err == nil && pfx.Addr().IsLinkLocalUnicast() {
				return pfx.Addr().WithZone(ifname), nil
			}
		}
		select {
		case <-ctx.Done():
			return netip.Addr{}, fmt.Errorf("%s has no usable IPv6 link-local address on %s: %w", p, ifname, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// String names the pod for messages.
func (p *Pod) String() string { return p.Namespace + "/" + p.Name }

// newUUID returns a random (version 4) UUID, as the API server assigns pod UIDs.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return fmt.Sprintf("00000000-0000-4000-8000-%012x", time.Now().UnixNano()&0xffffffffffff)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
