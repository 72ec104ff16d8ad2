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
	table  string // "nat", "mangle" or "filter"
	name   string // our chain
	parent string // the built-in chain holding the jump
	jump   rule   // the jump in parent
	rules  []rule // in order
}

// rule is one of our rules, in a form that renders both as iptables arguments (spec) and as the
// nftables expressions iptables-nft makes of those arguments (nft.go).
type rule struct {
	in, out  string       // -i, -o
	src, dst netip.Prefix // -s, -d
	tcp      bool         // -p tcp
	dport    uint16       // -m tcp --dport; only with tcp
	rst      bool         // -m tcp --tcp-flags RST RST; only with tcp
	mark     bool         // -m mark --mark SocketMark/MarkMask
	connmark bool         // -m connmark --mark ConnMark/MarkMask
	verdict  verdict
	jumpTo   string // the chain of a jump
	toPort   uint16 // the port of a redirect
}

// verdict is what a rule does with a packet it matches.
type verdict int

const (
	verdictReturn      verdict = iota // -j RETURN
	verdictJump                       // -j jumpTo
	verdictRedirect                   // -j REDIRECT --to-ports toPort
	verdictSetConnMark                // -j CONNMARK --set-xmark ConnMark/MarkMask
	verdictRestoreMark                // -j CONNMARK --restore-mark (the MarkMask bits)
	verdictResetIPv6                  // -m tcp -j REJECT --reject-with tcp-reset, in IPv6 rules only
)

// spec returns the rule's iptables arguments, in the order iptables-save prints them.
func (r rule) spec() []string {
	var a []string
	if r.src.IsValid() {
		a = append(a, "-s", r.src.String())
	}
	if r.dst.IsValid() {
		a = append(a, "-d", r.dst.String())
	}
	if r.in != "" {
		a = append(a, "-i", r.in)
	}
	if r.out != "" {
		a = append(a, "-o", r.out)
	}
	if r.tcp {
		a = append(a, "-p", "tcp")
	}
	if r.dport != 0 {
		a = append(a, "-m", "tcp", "--dport", strconv.Itoa(int(r.dport)))
	} else if r.rst {
		a = append(a, "-m", "tcp", "--tcp-flags", "RST", "RST")
	} else if r.verdict == verdictResetIPv6 {
		// The kernel takes tcp-reset only from a rule it knows to be TCP's. iptables-nft tells
		// it so for `-p tcp` alone, but the nftables package only for a rule with the tcp match.
		a = append(a, "-m", "tcp")
	}
	if r.mark {
		a = append(a, "-m", "mark", "--mark", hexMark(SocketMark)+"/"+hexMark(MarkMask))
	}
	if r.connmark {
		a = append(a, "-m", "connmark", "--mark", hexMark(ConnMark)+"/"+hexMark(MarkMask))
	}
	switch r.verdict {
	case verdictReturn:
		a = append(a, "-j", "RETURN")
	case verdictJump:
		a = append(a, "-j", r.jumpTo)
	case verdictRedirect:
		a = append(a, "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(r.toPort)))
	case verdictSetConnMark:
		a = append(a, "-j", "CONNMARK", "--set-xmark", hexMark(ConnMark)+"/"+hexMark(MarkMask))
	case verdictRestoreMark:
		a = append(a, "-j", "CONNMARK", "--restore-mark", "--nfmask", hexMark(MarkMask), "--ctmask", hexMark(MarkMask))
	case verdictResetIPv6:
		a = append(a, "-j", "REJECT", "--reject-with", "tcp-reset")
	}
	return a
}

// chains returns the ruleset of one family (4 or 6). Only c's addresses of that family appear in
// it; duplicates (and, for callers that skipped Validate, invalid values) are dropped so that a
// sloppy config still yields a tidy chain.
func chains(c Config, family int) []chain {
	hostBits := 32
	if family == 6 {
		hostBits = 128
	}
	hostsOf := func(addrs []netip.Addr) []netip.Prefix {
		var out []netip.Prefix
		for _, a := range addrs {
			a = a.Unmap()
			if a.IsValid() && a.Is4() == (family == 4) {
				out = appendUnique(out, netip.PrefixFrom(a, hostBits))
			}
		}
		return out
	}
	var cidrs []netip.Prefix
	for _, p := range c.ExcludeOutboundCIDRs {
		if p.IsValid() && p.Addr().Unmap().Is4() == (family == 4) {
			cidrs = appendUnique(cidrs, p.Masked())
		}
	}

	// Outbound: everything the daemon sends itself (its mark), loopback, the pod's own addresses
	// and the exclusions leave as they are; all other TCP goes to the daemon.
	out := []rule{{mark: true}, {out: "lo"}}
	for _, h := range hostsOf(c.PodIPs) {
		out = append(out, rule{dst: h})
	}
	for _, p := range cidrs {
		out = append(out, rule{dst: p})
	}
	for _, p := range uniquePorts(c.ExcludeOutboundPorts) {
		out = append(out, rule{tcp: true, dport: p})
	}

	// Inbound: loopback (the daemon's own connection to the app arrives there) and the node's
	// addresses (kubelet probes must work in strict mode) reach the app directly.
	in := []rule{{in: "lo"}}
	for _, h := range hostsOf(c.NodeIPs) {
		in = append(in, rule{src: h})
	}
	for _, p := range uniquePorts(c.ExcludeInboundPorts) {
		in = append(in, rule{tcp: true, dport: p})
	}

	// IPv6 TCP that cannot be captured is refused with a reset, after the same exclusions. Not
	// redirected to a port where nothing listens: a redirect of the pod's own connection to a
	// link-local address goes to ::1 bound to the pod's interface, which has no route. Not an
	// ICMPv6 error: the kernel does not deliver one about a link-local destination to the local
	// socket. Either way the app would wait out its connect timeout.
	var refusal []chain
	if family == 6 {
		reject := rule{tcp: true, verdict: verdictResetIPv6}
		if c.hasIPv6() {
			// A dual-stack pod's own connections to link-local addresses: the rest is captured.
			reject.dst = linkLocalIPv6
		}
		// The resets of the inbound refusal leave through OUTPUT: they must not be refused there.
		refuse := append(slices.Clip(out), rule{tcp: true, rst: true}, reject)
		refusal = []chain{{table: "filter", name: ChainOutbound, parent: "OUTPUT", jump: rule{tcp: true, verdict: verdictJump, jumpTo: ChainOutbound}, rules: refuse}}
		if !c.hasIPv6() {
			// A pod without an IPv6 address still has an IPv6 link-local one, which the daemon
			// does not serve (see Config.families): all its IPv6 TCP is refused, both ways.
			return append(refusal, chain{table: "filter", name: ChainInbound, parent: "INPUT", jump: rule{tcp: true, verdict: verdictJump, jumpTo: ChainInbound}, rules: append(in, reject)})
		}
		out = append(out, rule{dst: linkLocalIPv6})
	}
	out = append(out, rule{tcp: true, verdict: verdictRedirect, toPort: OutboundPort})
	in = append(in, rule{tcp: true, verdict: verdictRedirect, toPort: InboundPort})

	return append([]chain{
		{table: "nat", name: ChainOutbound, parent: "OUTPUT", jump: rule{tcp: true, verdict: verdictJump, jumpTo: ChainOutbound}, rules: out},
		{table: "nat", name: ChainInbound, parent: "PREROUTING", jump: rule{tcp: true, verdict: verdictJump, jumpTo: ChainInbound}, rules: in},
		{
			table: "mangle", name: ChainPrerouting, parent: "PREROUTING", jump: rule{verdict: verdictJump, jumpTo: ChainPrerouting},
			// The daemon's transparent connection to the app runs over lo with the socket mark:
			// remember it in the conntrack entry ...
			rules: []rule{{in: "lo", mark: true, verdict: verdictSetConnMark}},
		},
		{
			table: "mangle", name: ChainMangleOut, parent: "OUTPUT", jump: rule{verdict: verdictJump, jumpTo: ChainMangleOut},
			// ... so that the app's replies, addressed to the spoofed client, get the fwmark that
			// the policy rule routes to lo, where the daemon's socket receives them.
			rules: []rule{{connmark: true, verdict: verdictRestoreMark}},
		},
	}, refusal...)
}

// linkLocalIPv6 holds the IPv6 link-local addresses, which every interface has.
var linkLocalIPv6 = netip.MustParsePrefix("fe80::/10")

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

// tablesOf lists the tables chs live in, in order of first appearance.
func tablesOf(chs []chain) []string {
	var tables []string
	for _, ch := range chs {
		tables = appendUnique(tables, ch.table)
	}
	return tables
}

// restoreInput renders chs, plus the jumps of the chains in missing, grouped by table.
func restoreInput(chs []chain, missing []chain) string {
	var b strings.Builder
	for _, table := range tablesOf(chs) {
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
				fmt.Fprintf(&b, "-A %s %s\n", ch.name, strings.Join(r.spec(), " "))
			}
		}
		// Jumps go first in the built-in chains, ahead of anything else that might sit there.
		for _, ch := range missing {
			if ch.table == table {
				fmt.Fprintf(&b, "-I %s 1 %s\n", ch.parent, strings.Join(ch.jump.spec(), " "))
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

func hexMark(v int) string { return "0x" + strconv.FormatInt(int64(v), 16) }

func appendUnique[T comparable](s []T, v T) []T {
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
