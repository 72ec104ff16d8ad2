package capture

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
)

// NodeAddrs lists the global unicast addresses of the current netns (the plugin runs in the
// node's), sorted, for Config.NodeIPs. Loopback and link-local addresses are left out: probes to a
// pod's routable address come from a routable source, while link-local addresses (169.254.1.1,
// fe80::...) are reused across hosts and pods, so exempting them would let neighbours bypass capture.
func NodeAddrs() ([]netip.Addr, error) {
	// netlinksafe retries a dump that an address change interrupted (NLM_F_DUMP_INTR): on a busy
	// node, other pods' new veths get their link-local addresses at any moment.
	list, err := netlinksafe.AddrList(nil, netlink.FAMILY_ALL)
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
