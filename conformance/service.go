package conformance

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"
)

// ServiceCIDR4 is the simulated cluster's Service range, outside the pod space as in Kubernetes.
// Daemons treat it as mesh only when it is among their MeshCIDRs, as a real deployment lists the
// cluster's pod and service CIDRs.
var ServiceCIDR4 = netip.MustParsePrefix("10.96.0.0/16")

// AddServiceDNAT makes vip a Service-like virtual address in the node's namespace, the way
// kube-proxy's iptables mode does: new TCP connections to vip, from the node's pods (nat
// PREROUTING) and from the node itself (nat OUTPUT), are DNATed to one of backends. Backends take
// turns (statistic nth, one rule per backend) rather than kube-proxy's random pick, so that a test
// reaches every backend in a known number of connections. The rules live in a chain of their own,
// removed at cleanup.
func (n *Node) AddServiceDNAT(ctx context.Context, vip netip.AddrPort, backends ...netip.AddrPort) error {
	if len(backends) == 0 {
		return errors.New("a service needs at least one backend")
	}
	ipt := "iptables"
	if vip.Addr().Is6() {
		ipt = "ip6tables"
	}
	for _, b := range backends {
		if b.Addr().Is6() != vip.Addr().Is6() {
			return fmt.Errorf("backend %s is not of the family of %s", b, vip)
		}
	}
	chain := "MLSVC-" + randomSuffix(4)
	nat := func(args ...string) []string { return append([]string{ipt, "-w", "-t", "nat"}, args...) }
	if _, err := n.Exec(ctx, nat("-N", chain)...); err != nil {
		return fmt.Errorf("service %s on %s: %w", vip, n.Name, err)
	}
	match := []string{"-d", netip.PrefixFrom(vip.Addr(), vip.Addr().BitLen()).String(), "-p", "tcp", "--dport", strconv.Itoa(int(vip.Port())), "-j", chain}
	var jumps []string // the built-in chains that jump to ours so far
	env := n.Cluster.Env
	env.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var cmds [][]string
		for _, parent := range jumps {
			cmds = append(cmds, nat(append([]string{"-D", parent}, match...)...))
		}
		cmds = append(cmds, nat("-F", chain), nat("-X", chain))
		for _, c := range cmds {
			if _, err := n.Exec(ctx, c...); err != nil {
				env.Logf("cleanup of service %s on %s: %v", vip, n.Name, err)
			}
		}
	})
	for i, b := range backends {
		rule := nat("-A", chain, "-p", "tcp")
		// Rule i takes every (len-i)th of the connections that rules before it left, so each
		// backend gets one in len.
		if left := len(backends) - i; left > 1 {
			rule = append(rule, "-m", "statistic", "--mode", "nth", "--every", strconv.Itoa(left), "--packet", "0")
		}
		if _, err := n.Exec(ctx, append(rule, "-j", "DNAT", "--to-destination", b.String())...); err != nil {
			return fmt.Errorf("service %s on %s: %w", vip, n.Name, err)
		}
	}
	for _, parent := range []string{"PREROUTING", "OUTPUT"} {
		if _, err := n.Exec(ctx, nat(append([]string{"-A", parent}, match...)...)...); err != nil {
			return fmt.Errorf("service %s on %s: %w", vip, n.Name, err)
		}
		jumps = append(jumps, parent)
	}
	env.Logf("service %s on %s: DNAT to %v (chain %s)", vip, n.Name, backends, chain)
	return nil
}
