package capture

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"

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
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("list nftables tables: netlink socket: %w", err)
	}
	defer unix.Close(fd)
	// nlmsghdr then nfgenmsg: a dump of every table of the family.
	req := make([]byte, unix.NLMSG_HDRLEN+4)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETTABLE)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], 1) // sequence number
	req[unix.NLMSG_HDRLEN] = proto
	req[unix.NLMSG_HDRLEN+1] = unix.NFNETLINK_V0
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("list nftables tables: send: %w", err)
	}
	var names []string
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return nil, fmt.Errorf("list nftables tables: receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("list nftables tables: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return names, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) < 4 {
					return nil, errors.New("list nftables tables: short netlink error")
				}
				if errno := int32(ne.Uint32(m.Data)); errno != 0 {
					return nil, fmt.Errorf("list nftables tables: %w", unix.Errno(-errno))
				}
				return names, nil
			}
			if len(m.Data) < 4 {
				continue
			}
			if name, ok := tableName(m.Data[4:]); ok {
				names = append(names, name)
			}
		}
	}
}

// tableName returns NFTA_TABLE_NAME from the attributes of a table message.
func tableName(attrs []byte) (string, bool) {
	ne := binary.NativeEndian
	for len(attrs) >= unix.SizeofNlAttr {
		l := int(ne.Uint16(attrs[0:]))
		typ := ne.Uint16(attrs[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if l < unix.SizeofNlAttr || l > len(attrs) {
			return "", false
		}
		if typ == unix.NFTA_TABLE_NAME {
			return string(bytes.TrimRight(attrs[unix.SizeofNlAttr:l], "\x00")), true
		}
		next := (l + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1)
		if next > len(attrs) {
			return "", false
		}
		attrs = attrs[next:]
	}
	return "", false
}
