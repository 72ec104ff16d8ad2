// Package capture installs, verifies and removes the traffic redirection of one pod: iptables
// chains in the pod's network namespace that send the pod's TCP connections to the node daemon
// (outbound to OutboundPort, inbound to InboundPort), plus the mark rules and policy routing that
// bring the application's replies to a spoofed client address back to the daemon.
//
// Everything happens inside the pod netns. IPv4 rules are always installed, and IPv6 rules
// whenever the kernel has IPv6, so that a pod's IPv6 link-local address is no way around the
// capture; IPv6 policy routing only when the pod has an IPv6 address. The iptables backend
// (legacy or nft) is decided once per node (LoadOrDetectBackend) and used for every pod, so that
// the pod's rules live in the same backend as the node's.
package capture

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
)

// Ports, marks and routing identifiers shared with the daemon's data path (pkg/tunnel).
const (
	OutboundPort = 15001 // nat OUTPUT REDIRECT target inside the pod netns
	InboundPort  = 15006 // nat PREROUTING REDIRECT target inside the pod netns
	SocketMark   = 0x5ec // SO_MARK on every socket meshlessd opens in a pod netns
	ConnMark     = 0x5ed // connmark/fwmark that routes the app's replies back to the daemon's transparent socket
	MarkMask     = 0xfff // only these bits are ours (kube-proxy uses 0x4000/0x8000, Calico 0xffff0000)
	RouteTable   = 15006 // policy routing table holding `local default dev lo`
	RulePriority = 32000 // ip rule priority for `fwmark ConnMark/MarkMask lookup RouteTable`
)

// Names of the dedicated chains; each is entered by exactly one jump from a built-in chain.
const (
	ChainOutbound   = "MESHLESS_OUTPUT"     // nat, from OUTPUT: redirects the pod's outgoing TCP to OutboundPort
	ChainInbound    = "MESHLESS_INBOUND"    // nat, from PREROUTING: redirects incoming TCP to InboundPort
	ChainPrerouting = "MESHLESS_PRERT"      // mangle, from PREROUTING: tags the daemon's transparent connections
	ChainMangleOut  = "MESHLESS_MANGLE_OUT" // mangle, from OUTPUT: marks the app's replies for policy routing
)

// Backend names an iptables backend.
type Backend string

// The iptables backends: the classic x_tables kernel interface, and x_tables rules stored in nftables.
const (
	Legacy Backend = "legacy"
	NFT    Backend = "nft"
)

// Config describes the capture of one pod.
type Config struct {
	Backend              Backend
	PodIPs               []netip.Addr   // the pod's own addresses (v4 and/or v6); v6 policy routing only when one is v6
	NodeIPs              []netip.Addr   // the node's addresses: inbound from these is not captured (probes)
	ExcludeInboundPorts  []uint16       // destination ports of incoming connections that reach the app directly
	ExcludeOutboundPorts []uint16       // destination ports of outgoing connections that are not captured
	ExcludeOutboundCIDRs []netip.Prefix // destinations of outgoing connections that are not captured
}

// Validate reports every problem of c at once. IPv4-mapped IPv6 addresses count as IPv4, because
// that is what a 16-byte net.IP holding an IPv4 address turns into.
func (c Config) Validate() error {
	var errs []error
	if c.Backend != Legacy && c.Backend != NFT {
		errs = append(errs, fmt.Errorf("unknown iptables backend %q (want %q or %q)", c.Backend, Legacy, NFT))
	}
	if len(c.PodIPs) == 0 {
		errs = append(errs, errors.New("no pod IPs: the pod needs at least one address to be captured"))
	}
	for _, a := range c.PodIPs {
		if err := checkAddr(a); err != nil {
			errs = append(errs, fmt.Errorf("pod IP: %w", err))
		}
	}
	for _, a := range c.NodeIPs {
		if err := checkAddr(a); err != nil {
			errs = append(errs, fmt.Errorf("node IP: %w", err))
		}
	}
	for _, p := range c.ExcludeInboundPorts {
		if p == 0 {
			errs = append(errs, errors.New("excluded inbound port 0: ports are 1 to 65535"))
		}
	}
	for _, p := range c.ExcludeOutboundPorts {
		if p == 0 {
			errs = append(errs, errors.New("excluded outbound port 0: ports are 1 to 65535"))
		}
	}
	for _, p := range c.ExcludeOutboundCIDRs {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("excluded outbound CIDR %q is not a valid prefix", p))
		} else if p.Addr().Zone() != "" {
			errs = append(errs, fmt.Errorf("excluded outbound CIDR %s has a zone; iptables cannot match zones", p))
		}
	}
	return errors.Join(errs...)
}

func checkAddr(a netip.Addr) error {
	switch {
	case !a.IsValid():
		return errors.New("invalid (zero) address")
	case a.Zone() != "":
		return fmt.Errorf("%s has a zone; iptables cannot match zones", a)
	case a.IsUnspecified(), a.IsMulticast():
		return fmt.Errorf("%s is not a unicast address", a)
	}
	return nil
}

// normalized returns c with IPv4-mapped addresses and prefixes turned into plain IPv4, so that
// each ends up in the right family's rules.
func (c Config) normalized() Config {
	n := c
	n.PodIPs = unmapAll(c.PodIPs)
	n.NodeIPs = unmapAll(c.NodeIPs)
	n.ExcludeOutboundCIDRs = make([]netip.Prefix, 0, len(c.ExcludeOutboundCIDRs))
	for _, p := range c.ExcludeOutboundCIDRs {
		if p.IsValid() && p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		n.ExcludeOutboundCIDRs = append(n.ExcludeOutboundCIDRs, p)
	}
	return n
}

func unmapAll(addrs []netip.Addr) []netip.Addr {
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, a.Unmap())
	}
	return out
}

// families lists the IP families whose chains a pod gets: IPv4 always (an IPv4 connection from a
// v6-only pod must not bypass capture), and IPv6 whenever the kernel has it, whether or not the
// pod has an IPv6 address. A pod without one still has an IPv6 link-local address on its
// interface, and on a shared bridge (the bridge plugin, flannel) its neighbours reach it there.
// The daemon serves IPv6 only for pods with an IPv6 address, so such a pod's IPv6 chains refuse
// its TCP both ways (see chains) instead of letting it cross the node in plaintext.
func (c Config) families() []int {
	if c.hasIPv6() || kernelHasIPv6() {
		return []int{4, 6}
	}
	return []int{4}
}

// routedFamilies lists the IP families whose policy routing a pod gets: IPv4 always, as for the
// chains, and IPv6 when the pod has an IPv6 address. The routing serves the daemon's transparent
// sockets, and the daemon opens IPv6 ones only for such a pod; a pod netns with IPv6 switched
// off (disable_ipv6) would also refuse the route.
func (c Config) routedFamilies() []int {
	if c.hasIPv6() {
		return []int{4, 6}
	}
	return []int{4}
}

func (c Config) hasIPv6() bool {
	for _, a := range c.PodIPs {
		if a.Unmap().Is6() {
			return true
		}
	}
	return false
}

// kernelHasIPv6 reports whether the kernel has IPv6 (not booted with ipv6.disable=1, which also
// takes ip6tables away). It is a variable so that tests can play such a kernel.
var kernelHasIPv6 = sync.OnceValue(func() bool {
	_, err := os.Stat("/proc/sys/net/ipv6")
	return err == nil
})
