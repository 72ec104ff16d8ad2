package capture

import (
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
)

// tablesFreeIn runs holdsNoTables inside the netns at path.
func tablesFreeIn(t *testing.T, path string, b Backend, family int, tables []string) bool {
	t.Helper()
	var free bool
	err := ns.WithNetNSPath(path, func(ns.NetNS) error {
		var err error
		free, err = holdsNoTables(b, family, tables)
		return err
	})
	if err != nil {
		t.Fatalf("holdsNoTables(%s, IPv%d, %v): %v", b, family, tables, err)
	}
	return free
}

func TestHoldsNoTables(t *testing.T) {
	needRoot(t)
	natMangle, filter := []string{"nat", "mangle"}, []string{"filter"}
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			netns, path := newNetns(t)
			for _, family := range []int{4, 6} {
				if !tablesFreeIn(t, path, b, family, natMangle) || !tablesFreeIn(t, path, b, family, filter) {
					t.Errorf("new netns: IPv%d reported as holding tables", family)
				}
			}
			// A filter rule is not in a table the IPv4 chains use: the netns still needs no
			// iptables-save for them. The IPv6 filter table is the one a pod without an IPv6
			// address has its IPv6 chains in.
			inNetns(t, netns, toolName(b, 4, ""), "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "7", "-j", "ACCEPT")
			if !tablesFreeIn(t, path, b, 4, natMangle) || tablesFreeIn(t, path, b, 4, filter) {
				t.Error("IPv4 filter rule: want nat and mangle free, filter not")
			}
			if !tablesFreeIn(t, path, b, 6, filter) {
				t.Error("IPv4 filter rule: want the IPv6 filter table free")
			}
			// Someone else's mangle rule makes the netns one to look at.
			inNetns(t, netns, toolName(b, 6, ""), "-t", "mangle", "-A", "OUTPUT", "-j", "RETURN")
			if !tablesFreeIn(t, path, b, 4, natMangle) || tablesFreeIn(t, path, b, 6, natMangle) {
				t.Error("IPv6 mangle rule: want IPv4 free and IPv6 not")
			}
			if err := Apply(path, podConfig(b, false)); err != nil {
				t.Fatal(err)
			}
			if tablesFreeIn(t, path, b, 4, natMangle) || tablesFreeIn(t, path, b, 6, filter) {
				t.Error("after Apply: a family reported as holding none of its tables")
			}
		})
	}
	// The other backend's tables do not count: they are not where the rules go.
	netns, path := newNetns(t)
	inNetns(t, netns, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-j", "RETURN")
	if !tablesFreeIn(t, path, NFT, 4, natMangle) || tablesFreeIn(t, path, Legacy, 4, natMangle) {
		t.Error("legacy nat rule: want nft free and legacy not")
	}
}

// TestApplyKeepsForeignRules applies into a netns whose nat, mangle and filter tables already
// hold someone else's rules, before and after an interrupted Apply left our chains without their
// jumps: ours end up installed exactly once, theirs untouched, and Remove takes only ours.
func TestApplyKeepsForeignRules(t *testing.T) {
	needRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			netns, path := newNetns(t)
			c := podConfig(b, true)
			foreign := [][]string{
				{"-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN"},
				{"-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE"},
				{"-t", "mangle", "-A", "PREROUTING", "-m", "comment", "--comment", "someone else", "-j", "RETURN"},
				{"-t", "filter", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT"},
			}
			for _, family := range []int{4, 6} {
				for _, r := range foreign {
					inNetns(t, netns, append([]string{toolName(b, family, "")}, r...)...)
				}
			}
			before := map[int]string{4: save(t, netns, b, 4), 6: save(t, netns, b, 6)}

			// Our chains without their jumps, as a half-done earlier attempt could leave them.
			for _, family := range []int{4, 6} {
				cmd := []string{toolName(b, family, "-restore"), "--noflush"}
				input := Rules(c, family)
				out, err := runWithStdin(netns, input, cmd...)
				if err != nil {
					t.Fatalf("seed chains: %v: %s", err, out)
				}
			}
			for i := range 2 {
				if err := Apply(path, c); err != nil {
					t.Fatalf("Apply #%d: %v", i+1, err)
				}
			}
			for _, family := range []int{4, 6} {
				saved := save(t, netns, b, family)
				assertInstalledOnce(t, saved, c, family)
				for _, want := range []string{"-A OUTPUT -p udp -m udp --dport 53 -j RETURN", "-A POSTROUTING -j MASQUERADE", `--comment "someone else" -j RETURN`, "-A OUTPUT -p udp -j ACCEPT"} {
					if !strings.Contains(saved, want) {
						t.Errorf("IPv%d: foreign rule %q gone after Apply:\n%s", family, want, saved)
					}
				}
			}
			if err := Check(path, c); err != nil {
				t.Errorf("Check: %v", err)
			}
			if err := Remove(path, c); err != nil {
				t.Fatalf("Remove: %v", err)
			}
			for _, family := range []int{4, 6} {
				if got := save(t, netns, b, family); ruleLines(got) != ruleLines(before[family]) {
					t.Errorf("IPv%d after Remove:\n%s\nwant as before Apply:\n%s", family, got, before[family])
				}
			}
		})
	}
}

// TestApplyOneFamilyFresh applies with the nft backend into a netns where only the IPv6 nat table
// exists: the IPv4 chains go in over netlink, the IPv6 ones with iptables-nft-restore beside the
// foreign rule, and the netns does not count as fresh.
func TestApplyOneFamilyFresh(t *testing.T) {
	needRoot(t)
	netns, path := newNetns(t)
	c := podConfig(NFT, true)
	const foreign = "-A POSTROUTING -j MASQUERADE"
	inNetns(t, netns, append([]string{toolName(NFT, 6, ""), "-t", "nat"}, strings.Fields(foreign)...)...)
	fresh, err := start(path, c, known(c.NodeIPs)).Finish()
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if fresh {
		t.Error("a netns with an IPv6 nat table reported fresh")
	}
	for _, family := range []int{4, 6} {
		assertInstalledOnce(t, save(t, netns, NFT, family), c, family)
	}
	if s := save(t, netns, NFT, 6); !strings.Contains(s, foreign) {
		t.Errorf("foreign IPv6 rule gone after Apply:\n%s", s)
	}
	if err := Check(path, c); err != nil {
		t.Errorf("Check: %v", err)
	}
}

// ruleLines is iptables-save output without its comments and counters, which change between runs.
func ruleLines(saved string) string {
	var out []string
	for _, l := range strings.Split(saved, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		if i := strings.Index(l, " ["); strings.HasPrefix(l, ":") && i > 0 {
			l = l[:i]
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

func TestRemovalInput(t *testing.T) {
	saved := `# Generated by iptables-nft-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MESHLESS_OUTPUT - [0:0]
:OTHER - [0:0]
-A OUTPUT -p tcp -j MESHLESS_OUTPUT
-A OUTPUT -p udp -j RETURN
-A OUTPUT -m comment --comment "by hand" -p tcp -j MESHLESS_OUTPUT
-A OTHER -g MESHLESS_OUTPUT
-A MESHLESS_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
*mangle
:OUTPUT ACCEPT [0:0]
-A OUTPUT -j RETURN
COMMIT
`
	want := `*nat
-D OUTPUT -p tcp -j MESHLESS_OUTPUT
-D OUTPUT -m comment --comment "by hand" -p tcp -j MESHLESS_OUTPUT
-D OTHER -g MESHLESS_OUTPUT
-F MESHLESS_OUTPUT
-X MESHLESS_OUTPUT
COMMIT
`
	names := []string{ChainOutbound, ChainInbound, ChainPrerouting, ChainMangleOut}
	if got := removalInput([]byte(saved), names); got != want {
		t.Errorf("removalInput =\n%s\nwant\n%s", got, want)
	}
	if got := removalInput([]byte("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j RETURN\nCOMMIT\n"), names); got != "" {
		t.Errorf("removalInput with nothing of ours = %q, want \"\"", got)
	}
}

// TestRestoreAbort: a restore program started early and then aborted (the node's addresses
// could not be read) changes nothing.
func TestRestoreAbort(t *testing.T) {
	needRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			netns, path := newNetns(t)
			tools, err := resolveTools(b, []int{4})
			if err != nil {
				t.Fatal(err)
			}
			err = ns.WithNetNSPath(path, func(ns.NetNS) error {
				r, err := tools[0].startRestore()
				if err != nil {
					return err
				}
				r.abort()
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if s := save(t, netns, b, 4); strings.Contains(s, "MESHLESS") {
				t.Errorf("rules after an aborted restore:\n%s", s)
			}
			if !tablesFreeIn(t, path, b, 4, []string{"nat", "mangle"}) {
				t.Error("an aborted restore left a nat or mangle table")
			}
		})
	}
}
