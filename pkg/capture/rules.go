package capture

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// chain is one of our dedicated chains: its rules, and the one jump that enters it.
type chain struct {
	table  string     // "nat" or "mangle"
	name   string     // our chain
	parent string     // the built-in chain holding the jump
	jump   []string   // rule spec of the jump in parent
	rules  [][]string // rule specs, in order
}

// chains returns the ruleset of one family (4 or 6). Only c's addresses of that family appear in
// it; duplicates (and, for callers that skipped Validate, invalid values) are dropped so that a
// sloppy config still yields a tidy chain.
func chains(c Config, family int) []chain {
	hostBits := 32
	if family == 6 {
		hostBits = 128
	}
	hostsOf := func(addrs []netip.Addr) []string {
		var out []string
		for _, a := range addrs {
			a = a.Unmap()
			if a.IsValid() && a.Is4() == (family == 4) {
				out = appendUnique(out, netip.PrefixFrom(a, hostBits).String())
			}
		}
		return out
	}
	var cidrs []string
	for _, p := range c.ExcludeOutboundCIDRs {
		if p.IsValid() && p.Addr().Unmap().Is4() == (family == 4) {
			cidrs = appendUnique(cidrs, p.Masked().String())
		}
	}
	socketMark := hexMark(SocketMark) + "/" + hexMark(MarkMask)
	connMark := hexMark(ConnMark) + "/" + hexMark(MarkMask)
	returnFromPort := func(p uint16) []string {
		return []string{"-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(int(p)), "-j", "RETURN"}
	}

	// Outbound: everything the daemon sends itself (its mark), loopback, the pod's own addresses
	// and the exclusions leave as they are; all other TCP goes to the daemon.
	out := [][]string{
		{"-m", "mark", "--mark", socketMark, "-j", "RETURN"},
		{"-o", "lo", "-j", "RETURN"},
	}
	for _, h := range hostsOf(c.PodIPs) {
		out = append(out, []string{"-d", h, "-j", "RETURN"})
	}
	for _, p := range cidrs {
		out = append(out, []string{"-d", p, "-j", "RETURN"})
	}
	for _, p := range uniquePorts(c.ExcludeOutboundPorts) {
		out = append(out, returnFromPort(p))
	}
	out = append(out, []string{"-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(OutboundPort)})

	// Inbound: loopback (the daemon's own connection to the app arrives there) and the node's
	// addresses (kubelet probes must work in strict mode) reach the app directly.
	in := [][]string{{"-i", "lo", "-j", "RETURN"}}
	for _, h := range hostsOf(c.NodeIPs) {
		in = append(in, []string{"-s", h, "-j", "RETURN"})
	}
	for _, p := range uniquePorts(c.ExcludeInboundPorts) {
		in = append(in, returnFromPort(p))
	}
	in = append(in, []string{"-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(InboundPort)})

	return []chain{
		{table: "nat", name: ChainOutbound, parent: "OUTPUT", jump: []string{"-p", "tcp", "-j", ChainOutbound}, rules: out},
		{table: "nat", name: ChainInbound, parent: "PREROUTING", jump: []string{"-p", "tcp", "-j", ChainInbound}, rules: in},
		{
			table: "mangle", name: ChainPrerouting, parent: "PREROUTING", jump: []string{"-j", ChainPrerouting},
			// The daemon's transparent connection to the app runs over lo with the socket mark:
			// remember it in the conntrack entry ...
			rules: [][]string{{"-i", "lo", "-m", "mark", "--mark", socketMark, "-j", "CONNMARK", "--set-xmark", connMark}},
		},
		{
			table: "mangle", name: ChainMangleOut, parent: "OUTPUT", jump: []string{"-j", ChainMangleOut},
			// ... so that the app's replies, addressed to the spoofed client, get the fwmark that
			// the policy rule routes to lo, where the daemon's socket receives them.
			rules: [][]string{{"-m", "connmark", "--mark", connMark, "-j", "CONNMARK", "--restore-mark",
				"--nfmask", hexMark(MarkMask), "--ctmask", hexMark(MarkMask)}},
		},
	}
}

// Rules returns the iptables-restore input (for use with --noflush) that defines the chains of
// one family (4 or 6; any other value yields ""). Declaring a chain flushes it, so applying the
// input again replaces the chains' contents instead of adding to them. The jumps into the chains
// are not part of it: Apply adds each one only when it is missing.
func Rules(c Config, family int) string {
	if family != 4 && family != 6 {
		return ""
	}
	return restoreInput(chains(c.normalized(), family), nil)
}

// restoreInput renders chs, plus the jumps of the chains in missing, grouped by table.
func restoreInput(chs []chain, missing []chain) string {
	var b strings.Builder
	for _, table := range []string{"nat", "mangle"} {
		fmt.Fprintf(&b, "*%s\n", table)
		for _, ch := range chs {
			if ch.table == table {
				fmt.Fprintf(&b, ":%s - [0:0]\n", ch.name)
			}
		}
		for _, ch := range chs {
			if ch.table != table {
				continue
			}
			for _, r := range ch.rules {
				fmt.Fprintf(&b, "-A %s %s\n", ch.name, strings.Join(r, " "))
			}
		}
		// Jumps go first in the built-in chains, ahead of anything else that might sit there.
		for _, ch := range missing {
			if ch.table == table {
				fmt.Fprintf(&b, "-I %s 1 %s\n", ch.parent, strings.Join(ch.jump, " "))
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

func hexMark(v int) string { return "0x" + strconv.FormatInt(int64(v), 16) }

func appendUnique(s []string, v string) []string {
	if slices.Contains(s, v) {
		return s
	}
	return append(s, v)
}

func uniquePorts(ports []uint16) []uint16 {
	var out []uint16
	for _, p := range ports {
		if p != 0 && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}
