package capture

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// ourTables are the tables that hold our chains and jumps.
var ourTables = []string{"nat", "mangle"}

// holdsNoTables reports whether the current netns provably holds none of our chains and jumps
// in backend b for family: neither the nat nor the mangle table exists there. A fresh pod netns
// is like that, and then Apply needs no iptables-save to learn which jumps are in place. It asks
// the kernel directly, which costs microseconds where a program run costs milliseconds. An
// error means "not known": the caller looks with iptables-save instead.
func holdsNoTables(b Backend, family int) (bool, error) {
	var names []string
	var err error
	switch b {
	case Legacy:
		names, err = legacyTables(family)
	case NFT:
		names, err = nftTables(family)
	default:
		return false, fmt.Errorf("unknown iptables backend %q", b)
	}
	if err != nil {
		return false, err
	}
	for _, n := range names {
		for _, t := range ourTables {
			if n == t {
				return false, nil
			}
		}
	}
	return true, nil
}

// legacyTables lists the x_tables tables that exist in the calling thread's netns. The kernel
// creates a table in a netns when something first uses it there, and lists it in
// ip_tables_names from then on. thread-self, not self: /proc/self/net is the netns of the
// process's main thread, not of the thread that entered the pod's. A missing file means the
// ip_tables module is not loaded, so no table exists.
func legacyTables(family int) ([]string, error) {
	file := "/proc/thread-self/net/ip_tables_names"
	if family == 6 {
		file = "/proc/thread-self/net/ip6_tables_names"
	}
	data, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list legacy iptables tables: %w", err)
	}
	return strings.Fields(string(data)), nil
}

// nftTables lists the nftables tables of one family (ip or ip6, where iptables-nft keeps its
// tables) in the calling thread's netns, with one netlink dump.
func nftTables(family int) ([]string, error) {
	proto := uint8(unix.NFPROTO_IPV4)
	if family == 6 {
		proto = unix.NFPROTO_IPV6
	}
	req := nl.NewNetlinkRequest(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETTABLE, unix.NLM_F_DUMP)
	req.AddData(&nl.Nfgenmsg{NfgenFamily: proto, Version: nl.NFNETLINK_V0})
	msgs, err := req.Execute(unix.NETLINK_NETFILTER, 0)
	if err != nil {
		return nil, fmt.Errorf("list nftables tables: %w", err)
	}
	var names []string
	for _, m := range msgs {
		if len(m) < nl.SizeofNfgenmsg {
			return nil, errors.New("list nftables tables: short message")
		}
		attrs, err := nl.ParseRouteAttr(m[nl.SizeofNfgenmsg:])
		if err != nil {
			return nil, fmt.Errorf("list nftables tables: %w", err)
		}
		for _, a := range attrs {
			if a.Attr.Type&^(unix.NLA_F_NESTED|unix.NLA_F_NET_BYTEORDER) == unix.NFTA_TABLE_NAME {
				names = append(names, strings.TrimRight(string(a.Value), "\x00"))
			}
		}
	}
	return names, nil
}
