package capture

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

// builtinChain is a built-in iptables chain as iptables-nft creates it: a base chain of the
// table's type at the hook and priority iptables gives it, with policy accept.
type builtinChain struct {
	kind     nftables.ChainType
	hook     *nftables.ChainHook
	priority *nftables.ChainPriority
}

// builtinChains are the built-in chains our jumps live in.
var builtinChains = map[[2]string]builtinChain{
	{"nat", "PREROUTING"}:    {nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest},
	{"nat", "OUTPUT"}:        {nftables.ChainTypeNAT, nftables.ChainHookOutput, nftables.ChainPriorityNATDest},
	{"mangle", "PREROUTING"}: {nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityMangle},
	{"mangle", "OUTPUT"}:     {nftables.ChainTypeRoute, nftables.ChainHookOutput, nftables.ChainPriorityMangle},
	{"filter", "INPUT"}:      {nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter},
	{"filter", "OUTPUT"}:     {nftables.ChainTypeFilter, nftables.ChainHookOutput, nftables.ChainPriorityFilter},
}

// nftIn opens a connection to the nftables of netns whose socket is made in netns, so that its
// user needs no thread in the netns. A goroutine locked to such a thread pays a hand-off between
// threads for every blocking read, and reading the acknowledgements of one batch, one by one,
// then takes milliseconds. The connection is lasting (one socket for all requests): close it
// with CloseLasting.
func nftIn(netns ns.NetNS) (*nftables.Conn, error) {
	conn, err := nftables.New(nftables.WithNetNSFd(int(netns.Fd())), nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("nftables in netns %s: %w", netns.Path(), err)
	}
	return conn, nil
}

// nftHoldsNoTables reports whether conn's netns has none of tables in the nftables family (ip or
// ip6) where iptables-nft keeps the tables of family.
func nftHoldsNoTables(conn *nftables.Conn, family int, tables []string) (bool, error) {
	held, err := conn.ListTablesOfFamily(nftFamily(family))
	if err != nil {
		return false, fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range held {
		if slices.Contains(tables, t.Name) {
			return false, nil
		}
	}
	return true, nil
}

func nftFamily(family int) nftables.TableFamily {
	if family == 6 {
		return nftables.TableFamilyIPv6
	}
	return nftables.TableFamilyIPv4
}

// writeNFT installs chs and their jumps in conn's nftables, in one transaction, without running
// a program: starting iptables-restore is most of what a new pod's capture costs. The netns
// must hold none of the tables of chs in family (see nftHoldsNoTables): the tables
// and the built-in chains the jumps need are created here, as iptables-nft-restore creates them.
// Every rule is encoded as iptables-nft 1.8 encodes the same iptables-restore line, so that
// iptables-nft reads them back as its own: CHECK, Remove and iptables-save work on them unchanged.
func writeNFT(conn *nftables.Conn, chs []chain, family int) error {
	tf := nftFamily(family)
	tables := map[string]*nftables.Table{}
	for _, ch := range chs {
		if tables[ch.table] == nil {
			tables[ch.table] = conn.AddTable(&nftables.Table{Name: ch.table, Family: tf})
		}
	}
	for _, ch := range chs {
		t := tables[ch.table]
		ours := conn.AddChain(&nftables.Chain{Name: ch.name, Table: t})
		for _, r := range ch.rules {
			conn.AddRule(&nftables.Rule{Table: t, Chain: ours, Exprs: r.exprs(family)})
		}
	}
	parents := map[[2]string]*nftables.Chain{}
	for _, ch := range chs {
		key := [2]string{ch.table, ch.parent}
		parent := parents[key]
		if parent == nil {
			b, ok := builtinChains[key]
			if !ok {
				return fmt.Errorf("nftables: no built-in chain %s in table %s", ch.parent, ch.table)
			}
			parent = conn.AddChain(&nftables.Chain{
				Name: ch.parent, Table: tables[ch.table],
				Type: b.kind, Hooknum: b.hook, Priority: b.priority, Policy: new(nftables.ChainPolicyAccept),
			})
			parents[key] = parent
		}
		// Jumps go first in the built-in chains, ahead of anything else that might sit there.
		conn.InsertRule(&nftables.Rule{Table: tables[ch.table], Chain: parent, Exprs: ch.jump.exprs(family)})
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("nftables: write IPv%d capture: %w", family, err)
	}
	return nil
}

// exprs returns the expressions iptables-nft makes of the rule's iptables arguments: native
// ones for interfaces, addresses, protocol, port and packet mark, the kernel's xtables
// extensions (nft_compat) for the connmark match and the REDIRECT and CONNMARK targets, and a
// counter before the verdict.
func (r rule) exprs(family int) []expr.Any {
	var e []expr.Any
	if r.in != "" {
		e = append(e, &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, ifnameCmp(r.in))
	}
	if r.out != "" {
		e = append(e, &expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1}, ifnameCmp(r.out))
	}
	// iptables-nft matches the protocol before the addresses.
	if r.tcp {
		e = append(e,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}})
	}
	srcOffset, dstOffset := uint32(12), uint32(16)
	if family == 6 {
		srcOffset, dstOffset = 8, 24
	}
	if r.src.IsValid() {
		e = append(e, addrMatch(r.src, srcOffset)...)
	}
	if r.dst.IsValid() {
		e = append(e, addrMatch(r.dst, dstOffset)...)
	}
	if r.dport != 0 {
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, r.dport)})
	} else if r.rst {
		const tcpFlagsOffset, tcpRST = 13, 0x04
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: tcpFlagsOffset, Len: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpRST}, Xor: []byte{0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{tcpRST}})
	} else if r.verdict == verdictResetIPv6 {
		// `-m tcp` with no option stays an xtables match, and it makes the nftables package
		// tell the kernel that the rule is TCP's (see rule.spec).
		e = append(e, &expr.Match{Name: "tcp", Rev: 0, Info: &xt.Tcp{SrcPorts: [2]uint16{0, 0xffff}, DstPorts: [2]uint16{0, 0xffff}}})
	}
	if r.mark {
		e = append(e,
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: hostU32(MarkMask), Xor: hostU32(0)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: hostU32(SocketMark)})
	}
	if r.connmark {
		// struct xt_connmark_mtinfo1 {__u32 mark, mask; __u8 invert;}, padded to 8 bytes.
		info := xt.Unknown(append(append(hostU32(ConnMark), hostU32(MarkMask)...), make([]byte, 8)...))
		e = append(e, &expr.Match{Name: "connmark", Rev: 1, Info: &info})
	}
	e = append(e, &expr.Counter{})
	switch r.verdict {
	case verdictReturn:
		e = append(e, &expr.Verdict{Kind: expr.VerdictReturn})
	case verdictJump:
		e = append(e, &expr.Verdict{Kind: expr.VerdictJump, Chain: r.jumpTo})
	case verdictRedirect:
		e = append(e, &expr.Target{Name: "REDIRECT", Rev: 0, Info: redirectInfo(family, r.toPort)})
	case verdictSetConnMark:
		e = append(e, &expr.Target{Name: "CONNMARK", Rev: 2, Info: connmarkTarget(ConnMark, MarkMask, 0xffffffff, xtConnmarkSet)})
	case verdictRestoreMark:
		e = append(e, &expr.Target{Name: "CONNMARK", Rev: 2, Info: connmarkTarget(0, MarkMask, MarkMask, xtConnmarkRestore)})
	case verdictResetIPv6:
		e = append(e, &expr.Target{Name: "REJECT", Rev: 0, Info: rejectTCPResetIPv6()})
	}
	return e
}

// ifnameCmp matches an exact interface name: iptables-nft compares the name and its NUL.
func ifnameCmp(name string) *expr.Cmp {
	return &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: append([]byte(name), 0)}
}

// addrMatch matches the address prefix p at offset in the network header as iptables-nft does:
// nothing for a /0, a load of just the prefix's bytes when it ends on a byte, and otherwise a
// load of the whole address, masked.
func addrMatch(p netip.Prefix, offset uint32) []expr.Any {
	addr, bits := p.Masked().Addr().AsSlice(), p.Bits()
	if bits == 0 {
		return nil
	}
	if bits%8 == 0 {
		n := bits / 8
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: uint32(n)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr[:n]},
		}
	}
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: uint32(len(addr))},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(len(addr)), Mask: net.CIDRMask(bits, len(addr)*8), Xor: make([]byte, len(addr))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr},
	}
}

// redirectInfo is the REDIRECT target's --to-ports port: revision 0 takes an IPv4 multi-range
// for IPv4 and a range for IPv6.
func redirectInfo(family int, port uint16) xt.InfoAny {
	if family == 6 {
		return &xt.NatRange{Flags: uint(xt.NatRangeProtoSpecified), MinIP: net.IPv6zero, MaxIP: net.IPv6zero, MinPort: port, MaxPort: port}
	}
	return &xt.NatIPv4MultiRangeCompat{{Flags: uint(xt.NatRangeProtoSpecified), MinIP: net.IPv4zero.To4(), MaxIP: net.IPv4zero.To4(), MinPort: port, MaxPort: port}}
}

// rejectTCPResetIPv6 is the IPv6 REJECT target's --reject-with tcp-reset: struct
// ip6t_reject_info {__u32 with;}, padded to 8 bytes, with IP6T_TCP_RESET.
func rejectTCPResetIPv6() *xt.Unknown {
	const ip6tTCPReset = 6
	info := xt.Unknown(append(hostU32(ip6tTCPReset), make([]byte, 4)...))
	return &info
}

// The CONNMARK target's modes (enum in linux/netfilter/xt_connmark.h).
const (
	xtConnmarkSet     = 0
	xtConnmarkRestore = 2
)

// connmarkTarget is struct xt_connmark_tginfo2 {__u32 ctmark, ctmask, nfmask; __u8 shift_dir,
// shift_bits, mode;}, padded to 8 bytes.
func connmarkTarget(ctmark, ctmask, nfmask uint32, mode byte) *xt.Unknown {
	b := append(append(hostU32(ctmark), hostU32(ctmask)...), hostU32(nfmask)...)
	b = append(b, 0, 0, mode, 0)
	info := xt.Unknown(b)
	return &info
}

// hostU32 is v in the byte order of the kernel's registers and structs: the host's.
func hostU32[T int | uint32](v T) []byte {
	return binary.NativeEndian.AppendUint32(nil, uint32(v))
}
