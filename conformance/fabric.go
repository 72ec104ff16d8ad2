package conformance

import (
	"context"
	"fmt"
	"net/netip"
)

// Join says how nodes reach each other's pod CIDRs.
type Join string

const (
	// JoinHostGW routes each node's pod CIDR via that node's underlay address, as flannel's
	// host-gw backend and Calico without encapsulation do: pod packets cross the underlay as they are.
	JoinHostGW Join = "host-gw"
	// JoinVXLAN carries pod packets in a VXLAN overlay between the nodes, as flannel's vxlan
	// backend does.
	JoinVXLAN Join = "vxlan"
)

// The underlay: one L2 segment (a bridge in its own namespace) that every node and external host
// is plugged into. Documentation ranges, so no address can belong to anything real.
var (
	UnderlayCIDR4 = netip.MustParsePrefix("192.0.2.0/24")
	UnderlayCIDR6 = netip.MustParsePrefix("2001:db8::/64")
	overlayCIDR4  = netip.MustParsePrefix("198.18.0.0/24")
	overlayCIDR6  = netip.MustParsePrefix("2001:db8:1::/64")
)

const (
	underlayIface = "ul0"
	vxlanIface    = "vx0"
	vxlanID       = "4242"
	vxlanPort     = "4789"
	// The underlay carries jumbo frames so that VXLAN-encapsulated 1500-byte pod packets fit.
	underlayMTU = "9000"
	fabricName  = "fabric"
)

// hostAddr returns the i-th address of p.
func hostAddr(p netip.Prefix, i int) netip.Addr {
	if p.Addr().Is4() {
		a := p.Masked().Addr().As4()
		a[3] = byte(i)
		return netip.AddrFrom4(a)
	}
	a := p.Masked().Addr().As16()
	a[15] = byte(i)
	return netip.AddrFrom16(a)
}

func prefixLen(a netip.Addr, p netip.Prefix) string {
	return fmt.Sprintf("%s/%d", a, p.Bits())
}

// fabricNetns returns the underlay's namespace, creating it on first use.
func (c *Cluster) fabricNetns(ctx context.Context) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fabric != "" {
		return c.fabric, nil
	}
	name, err := NewNetns(ctx, c.Env, c.Config.NodePrefix+"fab-")
	if err != nil {
		return "", err
	}
	cmds := [][]string{
		{"ip", "-n", name, "link", "add", fabricName, "type", "bridge"},
		{"ip", "-n", name, "link", "set", fabricName, "mtu", underlayMTU, "up"},
	}
	if err := runAll(ctx, cmds); err != nil {
		return "", err
	}
	c.fabric = name
	return name, nil
}

// plugIn connects netns to the underlay with a veth named ul0 holding the i-th underlay addresses.
func (c *Cluster) plugIn(ctx context.Context, netns string, i int) (netip.Addr, netip.Addr, error) {
	fabric, err := c.fabricNetns(ctx)
	if err != nil {
		return netip.Addr{}, netip.Addr{}, err
	}
	a4, a6 := hostAddr(UnderlayCIDR4, i), hostAddr(UnderlayCIDR6, i)
	port := fmt.Sprintf("p%d", i)
	cmds := [][]string{
		{"ip", "-n", netns, "link", "add", underlayIface, "mtu", underlayMTU, "type", "veth", "peer", "name", port, "mtu", underlayMTU, "netns", fabric},
		{"ip", "-n", fabric, "link", "set", port, "master", fabricName, "up"},
		{"ip", "-n", netns, "addr", "add", prefixLen(a4, UnderlayCIDR4), "dev", underlayIface},
		{"ip", "-n", netns, "addr", "add", prefixLen(a6, UnderlayCIDR6), "dev", underlayIface, "nodad"},
		{"ip", "-n", netns, "link", "set", underlayIface, "up"},
		{"ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"},
	}
	return a4, a6, runAll(ctx, cmds)
}

// joinNode plugs a new node into the underlay and makes its pod CIDRs and the other nodes' reach
// each other the cluster's way; external hosts learn the new node's pod CIDRs too.
func (c *Cluster) joinNode(ctx context.Context, n *Node, id int) error {
	var err error
	if n.Underlay, n.Underlay6, err = c.plugIn(ctx, n.Netns, id); err != nil {
		return fmt.Errorf("node %s: underlay: %w", n.Name, err)
	}
	n.overlay, n.overlay6 = hostAddr(overlayCIDR4, id), hostAddr(overlayCIDR6, id)
	if c.Config.Join == JoinVXLAN {
		cmds := [][]string{
			{"ip", "-n", n.Netns, "link", "add", vxlanIface, "type", "vxlan", "id", vxlanID, "local", n.Underlay.String(), "dstport", vxlanPort, "dev", underlayIface},
			{"ip", "-n", n.Netns, "link", "set", vxlanIface, "mtu", "1500", "up"},
			{"ip", "-n", n.Netns, "addr", "add", prefixLen(n.overlay, overlayCIDR4), "dev", vxlanIface},
			{"ip", "-n", n.Netns, "addr", "add", prefixLen(n.overlay6, overlayCIDR6), "dev", vxlanIface, "nodad"},
		}
		if err := runAll(ctx, cmds); err != nil {
			return fmt.Errorf("node %s: vxlan: %w", n.Name, err)
		}
	}
	for _, peer := range c.Nodes() {
		if err := c.route(ctx, n, peer); err != nil {
			return err
		}
		if err := c.route(ctx, peer, n); err != nil {
			return err
		}
	}
	for _, ext := range c.Externals() {
		if err := ext.routeTo(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// route makes from's pod traffic reach to's pod CIDRs.
func (c *Cluster) route(ctx context.Context, from, to *Node) error {
	via4, via6, dev := to.Underlay, to.Underlay6, underlayIface
	var cmds [][]string
	if c.Config.Join == JoinVXLAN {
		via4, via6, dev = to.overlay, to.overlay6, vxlanIface
		// Flood to the peer's VTEP; the kernel learns MAC addresses from what comes back.
		cmds = append(cmds, []string{"bridge", "-n", from.Netns, "fdb", "append", "00:00:00:00:00:00", "dev", vxlanIface, "dst", to.Underlay.String()})
	}
	cmds = append(cmds, []string{"ip", "-n", from.Netns, "route", "replace", to.PodCIDR.String(), "via", via4.String(), "dev", dev})
	if to.PodCIDR6.IsValid() {
		cmds = append(cmds, []string{"ip", "-n", from.Netns, "-6", "route", "replace", to.PodCIDR6.String(), "via", via6.String(), "dev", dev})
	}
	if err := runAll(ctx, cmds); err != nil {
		return fmt.Errorf("route %s -> %s: %w", from.Name, to.Name, err)
	}
	return nil
}

// PodInterface returns the interface of this node on which traffic between its pods and other
// nodes' pods is seen unencapsulated: the underlay veth with host-gw, the VXLAN device otherwise.
func (n *Node) PodInterface() string {
	if n.Cluster.Config.Join == JoinVXLAN {
		return vxlanIface
	}
	return underlayIface
}

// External is a host outside every pod CIDR (it plays the internet, or a VM outside the
// cluster): a namespace on the underlay that routes to the nodes' pod CIDRs via the nodes.
type External struct {
	Cluster *Cluster
	Netns   string
	// Addr and Addr6 are its addresses on the underlay, outside the mesh CIDRs.
	Addr, Addr6 netip.Addr
}

// AddExternal creates an external host on the underlay.
func (c *Cluster) AddExternal(ctx context.Context) (*External, error) {
	c.mu.Lock()
	c.nextExternal++
	i := 200 + c.nextExternal
	c.mu.Unlock()
	if i > 250 {
		return nil, fmt.Errorf("too many external hosts")
	}
	name, err := NewNetns(ctx, c.Env, c.Config.NodePrefix+"ext-")
	if err != nil {
		return nil, err
	}
	e := &External{Cluster: c, Netns: name}
	if e.Addr, e.Addr6, err = c.plugIn(ctx, name, i); err != nil {
		return nil, fmt.Errorf("external host: %w", err)
	}
	for _, n := range c.Nodes() {
		if err := e.routeTo(ctx, n); err != nil {
			return nil, err
		}
	}
	c.mu.Lock()
	c.externals = append(c.externals, e)
	c.mu.Unlock()
	return e, nil
}

// Externals returns the external hosts added so far.
func (c *Cluster) Externals() []*External {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*External(nil), c.externals...)
}

func (e *External) routeTo(ctx context.Context, n *Node) error {
	cmds := [][]string{{"ip", "-n", e.Netns, "route", "replace", n.PodCIDR.String(), "via", n.Underlay.String()}}
	if n.PodCIDR6.IsValid() {
		cmds = append(cmds, []string{"ip", "-n", e.Netns, "-6", "route", "replace", n.PodCIDR6.String(), "via", n.Underlay6.String()})
	}
	return runAll(ctx, cmds)
}

// NetnsPath returns the path of the external host's network namespace.
func (e *External) NetnsPath() string { return NetnsPath(e.Netns) }

func runAll(ctx context.Context, cmds [][]string) error {
	for _, c := range cmds {
		if _, err := run(ctx, c[0], c[1:]...); err != nil {
			return err
		}
	}
	return nil
}
