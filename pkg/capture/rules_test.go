package capture

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func dualStackConfig() Config {
	return Config{
		Backend:              NFT,
		PodIPs:               []netip.Addr{netip.MustParseAddr("10.244.0.5"), netip.MustParseAddr("fd00:10:244::5")},
		NodeIPs:              []netip.Addr{netip.MustParseAddr("192.168.1.10"), netip.MustParseAddr("fd00:1::10"), netip.MustParseAddr("192.168.1.10")},
		ExcludeInboundPorts:  []uint16{9090, 9090},
		ExcludeOutboundPorts: []uint16{53, 443},
		ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("169.254.169.254/32"), netip.MustParsePrefix("fd00:ec2::254/128"), netip.MustParsePrefix("10.96.0.7/12")},
	}
}

func TestRulesIPv4(t *testing.T) {
	want := `*nat
:MESHLESS_OUTPUT - [0:0]
:MESHLESS_INBOUND - [0:0]
-A MESHLESS_OUTPUT -m mark --mark 0x5ec/0xfff -j RETURN
-A MESHLESS_OUTPUT -o lo -j RETURN
-A MESHLESS_OUTPUT -d 10.244.0.5/32 -j RETURN
-A MESHLESS_OUTPUT -d 169.254.169.254/32 -j RETURN
-A MESHLESS_OUTPUT -d 10.96.0.0/12 -j RETURN
-A MESHLESS_OUTPUT -p tcp -m tcp --dport 53 -j RETURN
-A MESHLESS_OUTPUT -p tcp -m tcp --dport 443 -j RETURN
-A MESHLESS_OUTPUT -p tcp -j REDIRECT --to-ports 15001
-A MESHLESS_INBOUND -i lo -j RETURN
-A MESHLESS_INBOUND -s 192.168.1.10/32 -j RETURN
-A MESHLESS_INBOUND -p tcp -m tcp --dport 9090 -j RETURN
-A MESHLESS_INBOUND -p tcp -j REDIRECT --to-ports 15006
COMMIT
*mangle
:MESHLESS_PRERT - [0:0]
:MESHLESS_MANGLE_OUT - [0:0]
-A MESHLESS_PRERT -i lo -m mark --mark 0x5ec/0xfff -j CONNMARK --set-xmark 0x5ed/0xfff
-A MESHLESS_MANGLE_OUT -m connmark --mark 0x5ed/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff
COMMIT
`
	if got := Rules(dualStackConfig(), 4); got != want {
		t.Errorf("Rules(v4) =\n%s\nwant\n%s", got, want)
	}
}

func TestRulesIPv6(t *testing.T) {
	got := Rules(dualStackConfig(), 6)
	for _, line := range []string{
		"-A MESHLESS_OUTPUT -d fd00:10:244::5/128 -j RETURN",
		"-A MESHLESS_OUTPUT -d fd00:ec2::254/128 -j RETURN",
		"-A MESHLESS_OUTPUT -p tcp -m tcp --dport 53 -j RETURN",
		"-A MESHLESS_OUTPUT -p tcp -m tcp --dport 443 -j RETURN",
		"-A MESHLESS_OUTPUT -d fe80::/10 -j RETURN",
		"-A MESHLESS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
		"-A MESHLESS_INBOUND -s fd00:1::10/128 -j RETURN",
		"-A MESHLESS_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
		"-A MESHLESS_INBOUND -p tcp -j REDIRECT --to-ports 15006",
		"-A MESHLESS_PRERT -i lo -m mark --mark 0x5ec/0xfff -j CONNMARK --set-xmark 0x5ed/0xfff",
	} {
		if !strings.Contains(got, line+"\n") {
			t.Errorf("Rules(v6) lacks %q:\n%s", line, got)
		}
	}
	// The pod's own link-local TCP is refused, after the exclusions, and not redirected.
	_, filter, ok := strings.Cut(got, "*filter\n")
	if !ok {
		t.Fatalf("Rules(v6) has no filter table:\n%s", got)
	}
	const refusal = `:MESHLESS_OUTPUT - [0:0]
-A MESHLESS_OUTPUT -m mark --mark 0x5ec/0xfff -j RETURN
-A MESHLESS_OUTPUT -o lo -j RETURN
-A MESHLESS_OUTPUT -d fd00:10:244::5/128 -j RETURN
-A MESHLESS_OUTPUT -d fd00:ec2::254/128 -j RETURN
-A MESHLESS_OUTPUT -p tcp -m tcp --dport 53 -j RETURN
-A MESHLESS_OUTPUT -p tcp -m tcp --dport 443 -j RETURN
-A MESHLESS_OUTPUT -p tcp -m tcp --tcp-flags RST RST -j RETURN
-A MESHLESS_OUTPUT -d fe80::/10 -p tcp -m tcp -j REJECT --reject-with tcp-reset
COMMIT
`
	if filter != refusal {
		t.Errorf("Rules(v6) filter table =\n%s\nwant\n%s", filter, refusal)
	}
	if i, j := strings.Index(got, "-d fe80::/10 -j RETURN"), strings.Index(got, "-j REDIRECT --to-ports 15001"); i > j {
		t.Errorf("Rules(v6) redirects before it lets link-local destinations pass:\n%s", got)
	}
	// No IPv4 address may leak into the IPv6 ruleset (ip6tables-restore would reject it).
	for _, v4 := range []string{"10.244.0.5", "192.168.1.10", "169.254.169.254", "10.96.0.0"} {
		if strings.Contains(got, v4) {
			t.Errorf("Rules(v6) mentions IPv4 address %s:\n%s", v4, got)
		}
	}
	if v4 := Rules(dualStackConfig(), 4); strings.Contains(v4, "fd00") {
		t.Errorf("Rules(v4) mentions an IPv6 address:\n%s", v4)
	}
}

func TestRulesDeduplicates(t *testing.T) {
	got := Rules(dualStackConfig(), 4)
	for _, line := range []string{"-s 192.168.1.10/32", "--dport 9090"} {
		if n := strings.Count(got, line); n != 1 {
			t.Errorf("%q appears %d times, want once:\n%s", line, n, got)
		}
	}
}

func TestRulesMappedAddressesAreIPv4(t *testing.T) {
	// A 16-byte net.IP holding an IPv4 address becomes ::ffff:a.b.c.d through netip.AddrFromSlice.
	c := Config{
		Backend:              Legacy,
		PodIPs:               []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.9")},
		NodeIPs:              []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.1")},
		ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("::ffff:10.1.0.0/112")},
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	if fams := c.normalized().routedFamilies(); !slices.Equal(fams, []int{4}) {
		t.Errorf("routedFamilies = %v, want [4]", fams)
	}
	got := Rules(c, 4)
	for _, line := range []string{"-d 10.0.0.9/32 -j RETURN", "-s 10.0.0.1/32 -j RETURN", "-d 10.1.0.0/16 -j RETURN"} {
		if !strings.Contains(got, line) {
			t.Errorf("Rules(v4) lacks %q:\n%s", line, got)
		}
	}
	if v6 := Rules(c, 6); strings.Contains(v6, "10.0.0") || strings.Contains(v6, "::ffff") {
		t.Errorf("Rules(v6) mentions the mapped addresses:\n%s", v6)
	}
}

func TestRulesSkipsInvalidValues(t *testing.T) {
	// Rules is pure and does not validate; garbage must not reach iptables-restore as text.
	c := Config{PodIPs: []netip.Addr{{}}, NodeIPs: []netip.Addr{{}}, ExcludeOutboundPorts: []uint16{0}, ExcludeOutboundCIDRs: []netip.Prefix{{}}}
	for _, family := range []int{4, 6} {
		if got := Rules(c, family); strings.Contains(got, "invalid") || strings.Contains(got, "--dport 0") {
			t.Errorf("Rules(v%d) renders invalid values:\n%s", family, got)
		}
	}
}

func TestRulesUnknownFamily(t *testing.T) {
	if got := Rules(dualStackConfig(), 5); got != "" {
		t.Errorf("Rules(family 5) = %q, want empty", got)
	}
}

func TestFamilies(t *testing.T) {
	v4 := Config{PodIPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}}
	v6 := Config{PodIPs: []netip.Addr{netip.MustParseAddr("fd00::2")}}
	dual := Config{PodIPs: []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")}}
	for _, tc := range []struct {
		name             string
		c                Config
		kernelIPv6       bool
		chains, routings []int
	}{
		{"IPv4-only pod", v4, true, []int{4, 6}, []int{4}},
		{"IPv4-only pod, kernel without IPv6", v4, false, []int{4}, []int{4}},
		{"IPv6-only pod", v6, true, []int{4, 6}, []int{4, 6}},
		{"dual-stack pod", dual, true, []int{4, 6}, []int{4, 6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			saved := kernelHasIPv6
			kernelHasIPv6 = func() bool { return tc.kernelIPv6 }
			t.Cleanup(func() { kernelHasIPv6 = saved })
			if got := tc.c.families(); !slices.Equal(got, tc.chains) {
				t.Errorf("families = %v, want %v", got, tc.chains)
			}
			if got := tc.c.routedFamilies(); !slices.Equal(got, tc.routings) {
				t.Errorf("routedFamilies = %v, want %v", got, tc.routings)
			}
		})
	}
}

func TestCountAppends(t *testing.T) {
	listed := []string{
		"-P OUTPUT ACCEPT",
		"-A OUTPUT -p tcp -j MESHLESS_OUTPUT",
		"-A OUTPUT -j KUBE-SERVICES",
		"-A OUTPUT -p tcp -j MESHLESS_OUTPUT",
		"-A OUTPUT -d 10.0.0.0/8 -j MESHLESS_OUTPUT_X",
	}
	if n := countAppends(listed, ""); n != 4 {
		t.Errorf("countAppends(all) = %d, want 4", n)
	}
	if n := countAppends(listed, ChainOutbound); n != 2 {
		t.Errorf("countAppends(%s) = %d, want 2", ChainOutbound, n)
	}
}

func TestValidate(t *testing.T) {
	good := dualStackConfig()
	if err := good.Validate(); err != nil {
		t.Fatalf("Validate(good) = %v", err)
	}
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"unknown backend", func(c *Config) { c.Backend = "iptables" }, `unknown iptables backend "iptables"`},
		{"empty backend", func(c *Config) { c.Backend = "" }, `unknown iptables backend ""`},
		{"no pod IPs", func(c *Config) { c.PodIPs = nil }, "no pod IPs"},
		{"zero pod IP", func(c *Config) { c.PodIPs = []netip.Addr{{}} }, "pod IP: invalid"},
		{"unspecified pod IP", func(c *Config) { c.PodIPs = []netip.Addr{netip.IPv4Unspecified()} }, "not a unicast address"},
		{"zoned node IP", func(c *Config) { c.NodeIPs = []netip.Addr{netip.MustParseAddr("fe80::1%eth0")} }, "has a zone"},
		{"multicast node IP", func(c *Config) { c.NodeIPs = []netip.Addr{netip.MustParseAddr("224.0.0.1")} }, "node IP: 224.0.0.1 is not a unicast"},
		{"inbound port 0", func(c *Config) { c.ExcludeInboundPorts = []uint16{80, 0} }, "excluded inbound port 0"},
		{"outbound port 0", func(c *Config) { c.ExcludeOutboundPorts = []uint16{0} }, "excluded outbound port 0"},
		{"zero CIDR", func(c *Config) { c.ExcludeOutboundCIDRs = []netip.Prefix{{}} }, "not a valid prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dualStackConfig()
			tc.mutate(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Validate() = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	// Every problem is reported, not just the first.
	bad := Config{ExcludeInboundPorts: []uint16{0}}
	err := bad.Validate()
	if err == nil {
		t.Fatal("Validate(empty) = nil")
	}
	for _, want := range []string{"backend", "no pod IPs", "inbound port 0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Validate(empty) = %v, want it to mention %q", err, want)
		}
	}
}

func TestApplyRejectsInvalidConfig(t *testing.T) {
	// Validation comes before anything touches a netns, so this needs no root.
	for name, f := range map[string]func(string, Config) error{"Apply": Apply, "Check": Check} {
		if err := f("/nonexistent/netns", Config{Backend: NFT}); err == nil || !strings.Contains(err.Error(), "no pod IPs") {
			t.Errorf("%s(no pod IPs) = %v, want a validation error", name, err)
		}
	}
	if err := Remove("/nonexistent/netns", Config{Backend: "x"}); err == nil || !strings.Contains(err.Error(), "unknown iptables backend") {
		t.Errorf("Remove(bad backend) = %v, want a validation error", err)
	}
}
