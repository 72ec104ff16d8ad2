package capture

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	"github.com/google/nftables"
)

// holdsNoTables reports whether the current netns provably holds none of our chains and jumps
// in backend b for family: none of tables, those our chains of that family live in, exists
// there. A fresh pod netns is like that, and then Apply needs no iptables-save to learn which
// jumps are in place. It asks the kernel directly, which costs microseconds where a program run
// costs milliseconds. An error means "not known": the caller looks with iptables-save instead.
func holdsNoTables(b Backend, family int, tables []string) (bool, error) {
	switch b {
	case Legacy:
		names, err := legacyTables(family)
		if err != nil {
			return false, err
		}
		return !slices.ContainsFunc(names, func(n string) bool { return slices.Contains(tables, n) }), nil
	case NFT:
		conn, err := nftables.New()
		if err != nil {
			return false, fmt.Errorf("nftables: %w", err)
		}
		return nftHoldsNoTables(conn, family, tables)
	default:
		return false, fmt.Errorf("unknown iptables backend %q", b)
	}
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
