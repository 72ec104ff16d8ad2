package capture

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// nftState returns, as sorted text, every table, chain and rule the kernel holds in the nftables
// of one family in the netns at path: each with all its attributes, as dumped, but the handles
// (a rule's position is its predecessor's handle), which number objects in the order they were
// made. A rule's text starts with its table and
// chain; rules of one chain keep their order.
func nftState(t *testing.T, path string, family int) []string {
	t.Helper()
	proto := uint8(unix.NFPROTO_IPV4)
	if family == 6 {
		proto = unix.NFPROTO_IPV6
	}
	kinds := []struct {
		name   string
		msg    int
		handle uint16
	}{
		{"table", unix.NFT_MSG_GETTABLE, 4}, // NFTA_TABLE_HANDLE, which x/sys/unix lacks
		{"chain", unix.NFT_MSG_GETCHAIN, unix.NFTA_CHAIN_HANDLE},
		{"rule", unix.NFT_MSG_GETRULE, unix.NFTA_RULE_HANDLE},
	}
	var objects, rules []string
	err := ns.WithNetNSPath(path, func(ns.NetNS) error {
		for _, k := range kinds {
			req := nl.NewNetlinkRequest(unix.NFNL_SUBSYS_NFTABLES<<8|k.msg, unix.NLM_F_DUMP)
			req.AddData(&nl.Nfgenmsg{NfgenFamily: proto, Version: nl.NFNETLINK_V0})
			msgs, err := req.Execute(unix.NETLINK_NETFILTER, 0)
			if err != nil {
				return fmt.Errorf("dump %ss: %w", k.name, err)
			}
			for _, m := range msgs {
				attrs, err := nl.ParseRouteAttr(m[nl.SizeofNfgenmsg:])
				if err != nil {
					return fmt.Errorf("parse %s: %w", k.name, err)
				}
				text := k.name
				for _, a := range attrs {
					typ := a.Attr.Type &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
					if typ != k.handle && (k.name != "rule" || typ != unix.NFTA_RULE_POSITION) {
						text += fmt.Sprintf(" %d=%x", typ, a.Value)
					}
				}
				if k.name == "rule" {
					rules = append(rules, text)
				} else {
					objects = append(objects, text)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(objects)
	// NFTA_RULE_TABLE and NFTA_RULE_CHAIN lead a rule's attributes.
	slices.SortStableFunc(rules, func(a, b string) int {
		return strings.Compare(strings.Join(strings.Fields(a)[:3], " "), strings.Join(strings.Fields(b)[:3], " "))
	})
	return append(objects, rules...)
}

// TestWriteNFTAsIptablesNFT installs each ruleset twice in new netns, once with writeNFT and
// once with iptables-nft-restore, and requires the kernel to hold exactly the same tables, chains
// and rules after both, so that iptables-nft takes ours for its own.
func TestWriteNFTAsIptablesNFT(t *testing.T) {
	needRoot(t)
	c := podConfig(NFT, true)
	c.ExcludeOutboundCIDRs = append(c.ExcludeOutboundCIDRs,
		// The prefix lengths iptables-nft encodes each its own way: on a byte boundary, off one,
		// and /0 (no match at all).
		netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("192.168.7.0/24"), netip.MustParsePrefix("172.16.0.0/23"),
		netip.MustParsePrefix("0.0.0.0/0"),
		netip.MustParsePrefix("fd00:96::/108"), netip.MustParsePrefix("fd00:1::/64"),
		netip.MustParsePrefix("fd00:2::/60"))
	c.ExcludeOutboundPorts = append(c.ExcludeOutboundPorts, 443, 15001)
	c.ExcludeInboundPorts = append(c.ExcludeInboundPorts, 22)
	c = c.normalized()
	noIPv6 := c
	noIPv6.PodIPs = slices.DeleteFunc(slices.Clone(c.PodIPs), netip.Addr.Is6)
	for _, tc := range []struct {
		name   string
		c      Config
		family int
	}{
		{"IPv4", c, 4},
		{"IPv6", c, 6},
		{"IPv6 of a pod without an IPv6 address", noIPv6, 6},
	} {
		family := tc.family
		t.Run(tc.name, func(t *testing.T) {
			chs := chains(tc.c, family)
			nativeNS, native := newNetns(t)
			restoredNS, restored := newNetns(t)
			target, err := ns.GetNS(native)
			if err != nil {
				t.Fatal(err)
			}
			defer target.Close()
			conn, err := nftIn(target)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.CloseLasting()
			if err := writeNFT(conn, chs, family); err != nil {
				t.Fatal(err)
			}
			tools, err := resolveTools(NFT, []int{family})
			if err != nil {
				t.Fatal(err)
			}
			if out, err := runWithStdin(restoredNS, restoreInput(chs, chs), tools[0].restore, "--noflush"); err != nil {
				t.Fatalf("iptables-nft-restore: %v: %s", err, out)
			}

			got, want := nftState(t, native, family), nftState(t, restored, family)
			if !slices.Equal(got, want) {
				t.Errorf("writeNFT left\n%s\niptables-nft-restore left\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			if len(want) < len(chs) {
				t.Fatalf("iptables-nft-restore left %d objects, want at least the %d chains", len(want), len(chs))
			}
			if got, want := ruleLines(save(t, nativeNS, NFT, family)), ruleLines(save(t, restoredNS, NFT, family)); got != want {
				t.Errorf("iptables-nft-save after writeNFT:\n%s\nafter iptables-nft-restore:\n%s", got, want)
			}
		})
	}
}
