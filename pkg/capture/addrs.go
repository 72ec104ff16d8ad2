package capture

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
)

// NodeAddrs lists the global unicast addresses of the current netns (the plugin runs in the
// node's), sorted, for Config.NodeIPs of a pod with the addresses podIPs: the IPv4 ones, and the
// IPv6 ones only when the pod has an IPv6 address, since only then can kubelet probe it over IPv6
// (a pod without one gets IPv6 rules all the same, see Config.families). Not asking for IPv6
// otherwise saves time: each pod's veth gives the node an IPv6 link-local address, so the node's
// list of them grows with its pods. Loopback and link-local addresses are left out: probes to a
// pod's routable address come from a routable source, while link-local addresses (169.254.1.1,
// fe80::...) are reused across hosts and pods, so exempting them would let neighbours bypass
// capture.
func NodeAddrs(podIPs []netip.Addr) ([]netip.Addr, error) {
	family := netlink.FAMILY_V4
	if (Config{PodIPs: podIPs}).hasIPv6() {
		family = netlink.FAMILY_ALL
	}
	// netlinksafe retries a dump that an address change interrupted (NLM_F_DUMP_INTR): on a busy
	// node, other pods' new veths get their link-local addresses at any moment.
	list, err := netlinksafe.AddrList(nil, family)
	if err != nil {
		return nil, fmt.Errorf("list node addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsGlobalUnicast() && !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}
