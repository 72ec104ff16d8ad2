// Package adopt brings into the mesh the pods of a node that run without meshless-cni having
// seen them: pods that were running before meshless was installed, and pods that a rebooted node
// started before the DaemonSet chained the plugin again. It finds each such pod's network
// namespace by the pod's IP and runs the chained meshless-cni ADD for it, exactly as the runtime
// would have: the same configuration, the same enrollment and the same capture rules. It also
// runs that ADD again for pods the plugin has seen (Recapture), to give them rules that a later
// version added.
package adopt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshless/meshless/pkg/cniconf"
	"github.com/meshless/meshless/pkg/enroll"
	"github.com/meshless/meshless/pkg/kube"
)

// ContainerIDPrefix starts the container ID under which an adopted pod is enrolled: the
// runtime's sandbox ID is not known here, and the prefix tells operators where the pod came from.
const ContainerIDPrefix = "adopted-"

// podAnnotationsCapability is how containerd passes a pod's annotations to the plugins that
// declare the capability; adoption passes them the same way.
const podAnnotationsCapability = "io.kubernetes.cri.pod-annotations"

// Config is what an Adopter works from.
type Config struct {
	// Pods lists the node's pods as the Kubernetes API shows them.
	Pods func() []*kube.Pod
	// Known reports whether the daemon already knows the pod with this UID (enrolled or skipped).
	Known func(uid string) bool
	// NetnsDir is where the runtime pins pods' network namespaces (/var/run/netns).
	NetnsDir string
	// CNIConfDir and CNIBinDir are the host's CNI directories, where the chain is.
	CNIConfDir, CNIBinDir string
	Log                   *slog.Logger
}

// Adopter finds and adopts the pods the plugin has not seen.
type Adopter struct {
	cfg Config

	mu sync.Mutex
	// failed remembers why each pod could not be adopted, so that each reason is logged once
	// rather than every round.
	failed map[string]string
}

// New returns an Adopter.
func New(cfg Config) *Adopter {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Adopter{cfg: cfg, failed: make(map[string]string)}
}

// Run adopts pods every interval until ctx ends.
func (a *Adopter) Run(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		a.Once(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// Once adopts every running pod of the node that the daemon does not know, and returns how
// many it adopted.
func (a *Adopter) Once(ctx context.Context) int {
	var candidates []*kube.Pod
	for _, p := range a.cfg.Pods() {
		if adoptable(p) && !a.cfg.Known(string(p.UID)) {
			candidates = append(candidates, p)
		}
	}
	if len(candidates) == 0 {
		return 0
	}
	list, entry, err := cniconf.Chained(a.cfg.CNIConfDir)
	if err != nil {
		a.cfg.Log.Info("pods running without meshless wait for the CNI chain", "pods", len(candidates), "reason", err)
		return 0
	}
	byIP, err := scanNetns(a.cfg.NetnsDir)
	if err != nil {
		a.cfg.Log.Error("cannot look for running pods' network namespaces", "dir", a.cfg.NetnsDir, "reason", err)
		return 0
	}
	adopted := 0
	for _, p := range candidates {
		if err := a.adopt(ctx, p, list.Name, list.CNIVersion, entry.Bytes, byIP); err != nil {
			a.noteFailure(p, err)
			continue
		}
		a.mu.Lock()
		delete(a.failed, string(p.UID))
		a.mu.Unlock()
		adopted++
	}
	return adopted
}

// adoptable is a pod whose network the runtime set up with CNI and that runs now.
func adoptable(p *kube.Pod) bool {
	return !p.Spec.HostNetwork && p.DeletionTimestamp == nil && p.Status.Phase == kube.PodRunning && len(p.Status.PodIPs) > 0
}

func (a *Adopter) noteFailure(p *kube.Pod, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.failed[string(p.UID)] == err.Error() {
		return
	}
	a.failed[string(p.UID)] = err.Error()
	a.cfg.Log.Warn("running pod not adopted; will retry", "pod", p.Name, "namespace", p.Namespace, "reason", err)
}

// attachment is where a pod's address lives: its network namespace and interface.
type attachment struct {
	netns, ifName string
	addr          net.IPNet
}

// adopt runs meshless-cni ADD for the pod, with a prevResult describing the pod's interface.
func (a *Adopter) adopt(ctx context.Context, p *kube.Pod, network, cniVersion string, entry []byte, byIP map[netip.Addr][]attachment) error {
	var (
		at  *attachment
		ips []*current.IPConfig
	)
	for _, pip := range p.Status.PodIPs {
		ip, err := netip.ParseAddr(pip.IP)
		if err != nil {
			return fmt.Errorf("pod IP %q: %w", pip.IP, err)
		}
		found := byIP[ip.Unmap()]
		switch {
		case len(found) == 0:
			return fmt.Errorf("no network namespace in %s holds the pod's IP %s", a.cfg.NetnsDir, ip)
		case len(found) > 1:
			return fmt.Errorf("%d network namespaces in %s hold the pod's IP %s; not guessing", len(found), a.cfg.NetnsDir, ip)
		case at != nil && (found[0].netns != at.netns || found[0].ifName != at.ifName):
			return fmt.Errorf("the pod's IPs are on different interfaces (%s in %s, %s in %s)", at.ifName, at.netns, found[0].ifName, found[0].netns)
		}
		at = &found[0]
		ips = append(ips, &current.IPConfig{Interface: current.Int(0), Address: found[0].addr})
	}
	prev := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{{Name: at.ifName, Sandbox: at.netns}},
		IPs:        ips,
	}
	stdin, err := pluginInput(entry, network, cniVersion, prev, p.Annotations)
	if err != nil {
		return err
	}
	id := ContainerIDPrefix + string(p.UID)
	if err := runADD(ctx, a.cfg.CNIBinDir, stdin, enroll.Pod{
		ContainerID: id, Netns: at.netns, IfName: at.ifName, Namespace: p.Namespace, Name: p.Name, UID: string(p.UID),
	}); err != nil {
		return err
	}
	a.cfg.Log.Info("running pod adopted", "pod", p.Name, "namespace", p.Namespace, "container_id", id, "netns", at.netns, "interface", at.ifName)
	return nil
}

// Recapture runs the chained meshless-cni ADD again for a pod the daemon serves, with the
// container ID, netns and interface it was enrolled with. The plugin treats it as an ADD the
// runtime retried: the pod keeps its enrollment and its rules, and gets the chains and jumps
// they lack. It is how pods that an earlier meshless-cni captured get the rules that came
// later, without being recreated.
func Recapture(ctx context.Context, confDir, binDir string, p enroll.Pod) error {
	list, entry, err := cniconf.Chained(confDir)
	if err != nil {
		return err
	}
	prev := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{{Name: p.IfName, Sandbox: p.Netns}},
	}
	for _, ip := range p.IPs {
		// The enrollment keeps no prefix length, and the plugin reads only the addresses.
		bits := ip.BitLen()
		prev.IPs = append(prev.IPs, &current.IPConfig{Interface: current.Int(0), Address: net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(bits, bits)}})
	}
	stdin, err := pluginInput(entry.Bytes, list.Name, list.CNIVersion, prev, p.Annotations)
	if err != nil {
		return err
	}
	return runADD(ctx, binDir, stdin, p)
}

// runADD runs binDir's meshless-cni ADD for the pod, with the CNI_ARGS a Kubernetes runtime
// passes.
func runADD(ctx context.Context, binDir string, stdin []byte, p enroll.Pod) error {
	args := &invoke.Args{
		Command:     "ADD",
		ContainerID: p.ContainerID,
		NetNS:       p.Netns,
		IfName:      p.IfName,
		Path:        binDir,
		PluginArgs: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", p.Namespace},
			{"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID},
			{"K8S_POD_UID", p.UID},
		},
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	plugin := filepath.Join(binDir, cniconf.PluginType)
	if _, err := invoke.ExecPluginWithResult(ctx, plugin, stdin, args, nil); err != nil {
		return fmt.Errorf("%s ADD: %w", plugin, err)
	}
	return nil
}

// pluginInput is the plugin's stdin as a runtime builds it from a conflist: our entry with the
// list's name and version, the previous plugins' result and, when our entry declares the
// capability, the pod's annotations as runtimeConfig.
func pluginInput(entry []byte, network, cniVersion string, prev *current.Result, annotations map[string]string) ([]byte, error) {
	var conf map[string]any
	if err := json.Unmarshal(entry, &conf); err != nil {
		return nil, fmt.Errorf("meshless-cni entry: %w", err)
	}
	conf["name"] = network
	conf["cniVersion"] = cniVersion
	prevAt, err := prev.GetAsVersion(cniVersion)
	if err != nil {
		return nil, fmt.Errorf("prevResult as CNI %s: %w", cniVersion, err)
	}
	conf["prevResult"] = prevAt
	if caps, ok := conf["capabilities"].(map[string]any); ok && caps[podAnnotationsCapability] == true {
		if annotations == nil {
			annotations = map[string]string{}
		}
		conf["runtimeConfig"] = map[string]any{podAnnotationsCapability: annotations}
	}
	return json.Marshal(conf)
}

// scanNetns maps every global address found in the network namespaces pinned in dir to where it
// is.
func scanNetns(dir string) (map[netip.Addr][]attachment, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := make(map[netip.Addr][]attachment)
	var errs []error
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		var fs unix.Statfs_t
		if e.IsDir() || unix.Statfs(path, &fs) != nil || fs.Type != unix.NSFS_MAGIC {
			continue
		}
		err := ns.WithNetNSPath(path, func(ns.NetNS) error {
			addrs, err := netlinksafe.AddrList(nil, netlink.FAMILY_ALL)
			if err != nil {
				return err
			}
			for _, ad := range addrs {
				ip, ok := netip.AddrFromSlice(ad.IP)
				if !ok || !ip.Unmap().IsGlobalUnicast() {
					continue
				}
				link, err := netlink.LinkByIndex(ad.LinkIndex)
				if err != nil {
					return err
				}
				out[ip.Unmap()] = append(out[ip.Unmap()], attachment{netns: path, ifName: link.Attrs().Name, addr: *ad.IPNet})
			}
			return nil
		})
		// A namespace removed while we scan is not an error.
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("netns %s: %w", path, err))
		}
	}
	if len(out) == 0 && len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}
