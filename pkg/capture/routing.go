package capture

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// routing is the policy routing of the netns its caller's thread is in when it is opened. All
// its requests go over one rtnetlink socket made there: the package-level netlink functions
// would open and close a socket for each of the handful of requests a pod's routing takes.
type routing struct {
	h netlinksafe.Handle
}

func openRouting() (*routing, error) {
	h, err := netlinksafe.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink: %w", err)
	}
	return &routing{h: h}, nil
}

func (r *routing) close() { r.h.Close() }

func netlinkFamily(family int) int {
	if family == 6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

// policyRule is `fwmark ConnMark/MarkMask lookup RouteTable pref RulePriority`.
func policyRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = netlinkFamily(family)
	r.Priority = RulePriority
	r.Table = RouteTable
	r.Mark = ConnMark
	mask := uint32(MarkMask)
	r.Mask = &mask
	return r
}

const ruleFilter = netlink.RT_FILTER_PRIORITY | netlink.RT_FILTER_TABLE | netlink.RT_FILTER_MARK | netlink.RT_FILTER_MASK

func (r *routing) listPolicyRules(family int) ([]netlink.Rule, error) {
	rules, err := r.h.RuleListFiltered(netlinkFamily(family), policyRule(family), ruleFilter)
	if err != nil {
		return nil, fmt.Errorf("list IPv%d ip rules: %w", family, err)
	}
	return rules, nil
}

// localRoute is `local 0.0.0.0/0 dev lo table RouteTable` (or `local ::/0 ...`): whatever carries
// the fwmark is delivered to a local socket, the daemon's transparent one.
func localRoute(family int, lo netlink.Link) *netlink.Route {
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if family == 6 {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &netlink.Route{
		Family:    netlinkFamily(family),
		LinkIndex: lo.Attrs().Index,
		Dst:       dst,
		Table:     RouteTable,
		Type:      unix.RTN_LOCAL,
		Scope:     netlink.SCOPE_HOST,
	}
}

// listLocalRoutes returns the routes of RouteTable that do what localRoute does.
func (r *routing) listLocalRoutes(family int, lo netlink.Link) ([]netlink.Route, error) {
	filter := &netlink.Route{Table: RouteTable}
	routes, err := r.h.RouteListFiltered(netlinkFamily(family), filter, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list IPv%d routes of table %d: %w", family, RouteTable, err)
	}
	var out []netlink.Route
	for _, rt := range routes {
		isDefault := rt.Dst == nil
		if rt.Dst != nil {
			ones, _ := rt.Dst.Mask.Size()
			isDefault = ones == 0
		}
		if rt.Type == unix.RTN_LOCAL && rt.LinkIndex == lo.Attrs().Index && isDefault {
			out = append(out, rt)
		}
	}
	return out, nil
}

// prepareLoopback sets lo up and lets it carry large TCP packets (see raiseLoopbackGSO), and
// returns it for the policy routing's route.
func (r *routing) prepareLoopback() (netlink.Link, error) {
	lo, err := r.h.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("find lo: %w", err)
	}
	r.raiseLoopbackGSO(lo)
	if lo.Attrs().Flags&net.FlagUp != 0 {
		return lo, nil
	}
	if err := r.h.LinkSetUp(lo); err != nil {
		return nil, fmt.Errorf("set lo up: %w", err)
	}
	return lo, nil
}

// loopbackGSOMax is the largest TCP packet the pod's lo builds: a relay's large write (256 KiB),
// where lo's default of 64 KiB cuts it into four. Both ends of the app's captured connections
// are on lo (the app and the daemon's capture ports, then the daemon and the app), and every
// packet costs at each netfilter hook and in both TCP stacks. Packets over 64 KiB are BIG TCP:
// IPv6 since Linux 5.19, IPv4 since 6.3.
const loopbackGSOMax = 256 << 10

// raiseLoopbackGSO raises lo's GSO limits to loopbackGSOMax. An older kernel refuses a size over
// 64 KiB, or ignores the IPv4 one; lo then keeps its default, which costs only speed, so the
// errors are dropped.
func (r *routing) raiseLoopbackGSO(lo netlink.Link) {
	if lo.Attrs().GSOMaxSize < loopbackGSOMax {
		_ = r.h.LinkSetGSOMaxSize(lo, loopbackGSOMax)
	}
	if lo.Attrs().GSOIPv4MaxSize < loopbackGSOMax {
		_ = r.h.LinkSetGSOIPv4MaxSize(lo, loopbackGSOMax)
	}
}

// apply puts in one family's policy rule, unless it is there, and its route to lo.
func (r *routing) apply(family int, lo netlink.Link) error {
	rules, err := r.listPolicyRules(family)
	if err != nil {
		return err
	}
	if len(rules) == 0 {
		if err := r.h.RuleAdd(policyRule(family)); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add IPv%d ip rule fwmark %#x/%#x lookup %d: %w", family, ConnMark, MarkMask, RouteTable, err)
		}
	}
	if err := r.h.RouteReplace(localRoute(family, lo)); err != nil {
		return fmt.Errorf("add IPv%d local default route to table %d: %w", family, RouteTable, err)
	}
	return nil
}

// check returns the problems of one family's policy routing; err is for failures to look.
func (r *routing) check(family int) (problems []error, err error) {
	rules, err := r.listPolicyRules(family)
	if err != nil {
		return nil, err
	}
	if len(rules) == 0 {
		problems = append(problems, fmt.Errorf("IPv%d ip rule fwmark %#x/%#x lookup %d pref %d is missing",
			family, ConnMark, MarkMask, RouteTable, RulePriority))
	}
	lo, err := r.h.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("find lo: %w", err)
	}
	routes, err := r.listLocalRoutes(family, lo)
	if err != nil {
		return nil, err
	}
	if len(routes) == 0 {
		problems = append(problems, fmt.Errorf("IPv%d route `local default dev lo table %d` is missing", family, RouteTable))
	}
	return problems, nil
}

// remove deletes one family's policy rules and routes; what is missing is not an error.
func (r *routing) remove(family int) error {
	rules, err := r.listPolicyRules(family)
	if err != nil {
		return err
	}
	for i := range rules {
		if err := r.h.RuleDel(&rules[i]); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete IPv%d ip rule %s: %w", family, rules[i], err)
		}
	}
	lo, err := r.h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	routes, err := r.listLocalRoutes(family, lo)
	if err != nil {
		return err
	}
	for i := range routes {
		if err := r.h.RouteDel(&routes[i]); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("delete IPv%d route %s: %w", family, routes[i], err)
		}
	}
	return nil
}
