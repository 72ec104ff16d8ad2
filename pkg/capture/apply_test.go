package capture

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

var backends = []Backend{Legacy, NFT}

func podConfig(b Backend, dualStack bool) Config {
	c := Config{
		Backend:              b,
		PodIPs:               []netip.Addr{netip.MustParseAddr("10.77.0.2")},
		NodeIPs:              []netip.Addr{netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("fd77::1")},
		ExcludeInboundPorts:  []uint16{9090},
		ExcludeOutboundPorts: []uint16{9001},
		ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("169.254.169.254/32"), netip.MustParsePrefix("fd00:ec2::254/128")},
	}
	if dualStack {
		c.PodIPs = append(c.PodIPs, netip.MustParseAddr("fd77::2"))
	}
	return c
}

// save returns iptables-<backend>-save (or ip6tables-...) output of the netns.
func save(t *testing.T, netns string, b Backend, family int) string {
	t.Helper()
	return inNetns(t, netns, toolName(b, family, "-save"))
}

// assertInstalledOnce checks the save output holds each chain with exactly its rules, entered by
// exactly one jump, in the chain's table.
func assertInstalledOnce(t *testing.T, saved string, c Config, family int) {
	t.Helper()
	for _, ch := range chains(c.normalized(), family) {
		var rules, jumps int
		for _, l := range savedTable(saved, ch.table) {
			if strings.HasPrefix(l, "-A "+ch.name+" ") {
				rules++
			}
			if strings.HasPrefix(l, "-A "+ch.parent+" ") && strings.HasSuffix(l, " -j "+ch.name) {
				jumps++
			}
		}
		if rules != len(ch.rules) || jumps != 1 {
			t.Errorf("IPv%d %s %s: %d rules (want %d), %d jumps (want 1):\n%s", family, ch.table, ch.name, rules, len(ch.rules), jumps, saved)
		}
	}
}

// savedTable returns the lines of one table in iptables-save output.
func savedTable(saved, table string) []string {
	_, after, ok := strings.Cut(saved, "*"+table+"\n")
	if !ok {
		return nil
	}
	lines, _, _ := strings.Cut(after, "COMMIT\n")
	return strings.Split(lines, "\n")
}

func assertRouting(t *testing.T, netns string, family int, want bool) {
	t.Helper()
	flag := fmt.Sprintf("-%d", family)
	rules := inNetns(t, netns, "ip", flag, "rule", "show")
	routes := inNetns(t, netns, "ip", flag, "route", "show", "table", "all")
	hasRule := strings.Contains(rules, "32000:") && strings.Contains(rules, "fwmark 0x5ed/0xfff lookup 15006")
	hasRoute := strings.Contains(routes, "local default dev lo table 15006")
	if hasRule != want || hasRoute != want {
		t.Errorf("IPv%d policy routing present = rule %v, route %v; want %v\nrules:\n%s\nroutes:\n%s", family, hasRule, hasRoute, want, rules, routes)
	}
}

// assertLoopbackGSO checks that lo in the netns at path builds packets up to loopbackGSOMax, for
// IPv6 and, where the kernel has the IPv4 limit (Linux 6.3), for IPv4.
func assertLoopbackGSO(t *testing.T, path string) {
	t.Helper()
	var attrs *netlink.LinkAttrs
	err := ns.WithNetNSPath(path, func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			attrs = lo.Attrs()
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if attrs.TSOMaxSize < loopbackGSOMax {
		t.Logf("lo takes packets of %d bytes at most on this kernel; GSO limits not checked", attrs.TSOMaxSize)
		return
	}
	if attrs.GSOMaxSize != loopbackGSOMax {
		t.Errorf("lo gso_max_size = %d, want %d", attrs.GSOMaxSize, loopbackGSOMax)
	}
	if attrs.GSOIPv4MaxSize != 0 && attrs.GSOIPv4MaxSize != loopbackGSOMax {
		t.Errorf("lo gso_ipv4_max_size = %d, want %d", attrs.GSOIPv4MaxSize, loopbackGSOMax)
	}
}

func TestApplyCheckRemove(t *testing.T) {
	needRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			netns, path := newNetns(t)
			c := podConfig(b, true)

			// A namespace that never saw Apply: Check reports what is missing, Remove has nothing to do.
			if err := Check(path, c); err == nil || !strings.Contains(err.Error(), "IPv6 mangle chain MESHLESS_MANGLE_OUT is missing") {
				t.Errorf("Check before Apply = %v, want it to report missing chains", err)
			}
			if err := Remove(path, c); err != nil {
				t.Errorf("Remove before Apply = %v, want nil", err)
			}

			for i := range 2 {
				if err := Apply(path, c); err != nil {
					t.Fatalf("Apply #%d: %v", i+1, err)
				}
			}
			for _, family := range []int{4, 6} {
				assertInstalledOnce(t, save(t, netns, b, family), c, family)
				assertRouting(t, netns, family, true)
			}
			assertLoopbackGSO(t, path)
			if err := Check(path, c); err != nil {
				t.Fatalf("Check after Apply: %v", err)
			}

			// Each kind of damage done by hand is found by Check and repaired by Apply.
			ipt4, ipt6 := toolName(b, 4, ""), toolName(b, 6, "")
			for _, tc := range []struct {
				name   string
				damage []string
				want   string
			}{
				{"rule deleted", []string{ipt4, "-t", "nat", "-D", ChainOutbound, "-o", "lo", "-j", "RETURN"},
					`IPv4 nat chain MESHLESS_OUTPUT holds 5 rules, want 6`},
				{"IPv6 rule deleted", []string{ipt6, "-t", "nat", "-D", ChainInbound, "-s", "fd77::1/128", "-j", "RETURN"},
					`IPv6 nat chain MESHLESS_INBOUND lacks rule "-s fd77::1/128 -j RETURN"`},
				{"rule replaced", []string{ipt4, "-t", "nat", "-R", ChainInbound, "2", "-s", "10.77.0.99/32", "-j", "RETURN"},
					`IPv4 nat chain MESHLESS_INBOUND lacks rule "-s 10.77.0.1/32 -j RETURN"`},
				{"rule added", []string{ipt4, "-t", "mangle", "-A", ChainMangleOut, "-j", "ACCEPT"},
					`IPv4 mangle chain MESHLESS_MANGLE_OUT holds 2 rules, want 1`},
				{"jump deleted", []string{ipt4, "-t", "mangle", "-D", "PREROUTING", "-j", ChainPrerouting},
					`IPv4 mangle PREROUTING lacks the jump "-j MESHLESS_PRERT"`},
				{"chain flushed and deleted", []string{"sh", "-c", fmt.Sprintf("%[1]s -t nat -D OUTPUT -p tcp -j %[2]s && %[1]s -t nat -F %[2]s && %[1]s -t nat -X %[2]s", ipt6, ChainOutbound)},
					`IPv6 nat chain MESHLESS_OUTPUT is missing`},
				{"ip rule deleted", []string{"ip", "-4", "rule", "del", "pref", "32000"},
					`IPv4 ip rule fwmark 0x5ed/0xfff lookup 15006 pref 32000 is missing`},
				{"route deleted", []string{"ip", "-6", "route", "del", "local", "default", "dev", "lo", "table", "15006"},
					"IPv6 route `local default dev lo table 15006` is missing"},
			} {
				inNetns(t, netns, tc.damage...)
				err := Check(path, c)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("%s: Check = %v, want an error containing %q", tc.name, err, tc.want)
				}
				if err := Apply(path, c); err != nil {
					t.Fatalf("%s: Apply to repair: %v", tc.name, err)
				}
				if err := Check(path, c); err != nil {
					t.Fatalf("%s: Check after repair: %v", tc.name, err)
				}
			}

			// A second jump is reported too (Apply never adds one, but someone else might).
			inNetns(t, netns, ipt4, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", ChainOutbound)
			if err := Check(path, c); err == nil || !strings.Contains(err.Error(), "jumps to MESHLESS_OUTPUT 2 times") {
				t.Errorf("Check with a duplicate jump = %v", err)
			}

			for i := range 2 {
				if err := Remove(path, c); err != nil {
					t.Fatalf("Remove #%d: %v", i+1, err)
				}
			}
			for _, family := range []int{4, 6} {
				if s := save(t, netns, b, family); strings.Contains(s, "MESHLESS") {
					t.Errorf("IPv%d rules left after Remove:\n%s", family, s)
				}
				assertRouting(t, netns, family, false)
			}
			if err := Check(path, c); err == nil || !strings.Contains(err.Error(), "MESHLESS_OUTPUT is missing") {
				t.Errorf("Check after Remove = %v, want it to report missing chains", err)
			}
		})
	}
}

// TestIPv4OnlyPodGetsIPv6Chains: a pod without an IPv6 address gets the IPv6 chains all the same
// (its link-local address must be no way around the capture), but no IPv6 policy routing, which
// only the daemon's IPv6 sockets need. A pod captured before the IPv6 chains existed fails Check,
// and LacksIPv6Refusal reports it, until they are applied.
func TestIPv4OnlyPodGetsIPv6Chains(t *testing.T) {
	needRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			netns, path := newNetns(t)
			c := podConfig(b, false)
			if err := Apply(path, c); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			if err := Check(path, c); err != nil {
				t.Fatalf("Check: %v", err)
			}
			for _, family := range []int{4, 6} {
				assertInstalledOnce(t, save(t, netns, b, family), c, family)
			}
			assertRouting(t, netns, 4, true)
			assertRouting(t, netns, 6, false)
			assertLacksIPv6Refusal(t, path, c, false)

			tools, err := resolveTools(b, []int{6})
			if err != nil {
				t.Fatal(err)
			}
			if err := ns.WithNetNSPath(path, func(ns.NetNS) error { return removeFamily(tools[0], c) }); err != nil {
				t.Fatalf("remove the IPv6 chains: %v", err)
			}
			if err := Check(path, c); err == nil || !strings.Contains(err.Error(), "IPv6 filter chain MESHLESS_OUTPUT is missing") {
				t.Errorf("Check without the IPv6 chains = %v, want it to report them missing", err)
			}
			assertLacksIPv6Refusal(t, path, c, true)
			// A dual-stack pod's link-local address is captured, no way around: it is never
			// reported, whatever its filter chain.
			assertLacksIPv6Refusal(t, path, podConfig(b, true), false)
			if err := Apply(path, c); err != nil {
				t.Fatalf("Apply again: %v", err)
			}
			if err := Check(path, c); err != nil {
				t.Errorf("Check after applying again: %v", err)
			}
			assertLacksIPv6Refusal(t, path, c, false)
			if err := Remove(path, c); err != nil {
				t.Fatalf("Remove: %v", err)
			}
			for _, family := range []int{4, 6} {
				if s := save(t, netns, b, family); strings.Contains(s, "MESHLESS") {
					t.Errorf("IPv%d rules left after Remove:\n%s", family, s)
				}
			}
			assertRouting(t, netns, 4, false)
		})
	}
}

func assertLacksIPv6Refusal(t *testing.T, path string, c Config, want bool) {
	t.Helper()
	if got, err := LacksIPv6Refusal(path, c.Backend, c.PodIPs); err != nil || got != want {
		t.Errorf("LacksIPv6Refusal(%v) = %v, %v; want %v", c.PodIPs, got, err, want)
	}
}

// TestMissingTool: a program that is nowhere is an error callers can tell apart (exec.ErrNotFound)
// and that names the program and where it was looked for.
func TestMissingTool(t *testing.T) {
	_, err := lookTool("ip6tables-meshless-missing-restore")
	if !errors.Is(err, exec.ErrNotFound) || !strings.Contains(err.Error(), "ip6tables-meshless-missing-restore") || !strings.Contains(err.Error(), "/usr/sbin") {
		t.Errorf("lookTool(missing) = %v, want exec.ErrNotFound naming the program and /usr/sbin", err)
	}
}

func TestMissingNetns(t *testing.T) {
	needRoot(t)
	path := filepath.Join(t.TempDir(), "gone")
	c := podConfig(NFT, true)
	if err := Remove(path, c); err != nil {
		t.Errorf("Remove(missing netns) = %v, want nil", err)
	}
	if err := Apply(path, c); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("Apply(missing netns) = %v, want an error naming the path", err)
	}
	if err := Check(path, c); err == nil {
		t.Error("Check(missing netns) = nil, want an error")
	}
	notNetns := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notNetns, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Apply(notNetns, c); err == nil {
		t.Error("Apply(regular file) = nil, want an error")
	}
}

// TestDetectBackend runs the detection in namespaces of its own, where it sees only the rules
// the test put there.
func TestDetectBackend(t *testing.T) {
	needRoot(t)
	detectIn := func(path string) (Backend, error) {
		var b Backend
		err := ns.WithNetNSPath(path, func(ns.NetNS) error {
			var err error
			b, err = DetectBackend()
			return err
		})
		return b, err
	}
	for _, tc := range []struct {
		name string
		rule string // program adding a rule, "" for none
		want Backend
	}{
		{"empty", "", NFT},
		{"legacy rules", "iptables-legacy", Legacy},
		{"legacy IPv6 rules", "ip6tables-legacy", Legacy},
		{"nft rules", "iptables-nft", NFT},
	} {
		t.Run(tc.name, func(t *testing.T) {
			netns, path := newNetns(t)
			if tc.rule != "" {
				inNetns(t, netns, tc.rule, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "7", "-j", "ACCEPT")
			}
			got, err := detectIn(path)
			if err != nil || got != tc.want {
				t.Errorf("DetectBackend = %q, %v; want %q", got, err, tc.want)
			}
		})
	}

	// The first decision is recorded and kept, whatever a later probe would say.
	dir := t.TempDir()
	legacyNetns, legacyPath := newNetns(t)
	inNetns(t, legacyNetns, "iptables-legacy", "-A", "INPUT", "-j", "ACCEPT")
	var first, second Backend
	err := ns.WithNetNSPath(legacyPath, func(ns.NetNS) error {
		var err error
		first, err = LoadOrDetectBackend(dir)
		return err
	})
	if err != nil || first != Legacy {
		t.Fatalf("LoadOrDetectBackend = %q, %v; want %q", first, err, Legacy)
	}
	_, emptyPath := newNetns(t)
	err = ns.WithNetNSPath(emptyPath, func(ns.NetNS) error {
		var err error
		second, err = LoadOrDetectBackend(dir)
		return err
	})
	if err != nil || second != Legacy {
		t.Errorf("LoadOrDetectBackend again = %q, %v; want the recorded %q", second, err, Legacy)
	}
	if rec, err := os.ReadFile(filepath.Join(dir, BackendFile)); err != nil || string(rec) != "legacy\n" {
		t.Errorf("record = %q, %v", rec, err)
	}
}
