package conformance

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"time"
)

// TCP flags of a Packet.
const (
	FlagFIN = 0x01
	FlagSYN = 0x02
	FlagRST = 0x04
	FlagPSH = 0x08
	FlagACK = 0x10
)

// Packet is one captured TCP segment.
type Packet struct {
	Time     time.Time
	Src, Dst netip.AddrPort
	Seq, Ack uint32
	Flags    uint8
	Payload  []byte
}

// Flow is one direction of one TCP connection as seen on the wire, with its payload reassembled
// in sequence order (retransmissions dropped).
type Flow struct {
	Src, Dst netip.AddrPort
	Packets  int
	SYN      bool // the flow's first segment was seen, so Data starts at its first byte
	FIN, RST bool
	Data     []byte
	// Missing counts payload bytes the capture lost (holes in the sequence space). A flow with
	// holes cannot be checked record by record.
	Missing int64

	isn  uint32
	segs []segment
}

type segment struct {
	seq  uint32
	data []byte
}

// String names the flow for messages.
func (f *Flow) String() string {
	return fmt.Sprintf("%s -> %s (%d packets, %d bytes)", f.Src, f.Dst, f.Packets, len(f.Data))
}

// Trace is what a capture holds: its TCP packets, and flows reassembled from them.
type Trace struct {
	Packets []Packet
	Flows   []*Flow
	// NonTCP counts the frames that were not TCP over IPv4/IPv6 (ARP, ICMP, UDP, ...).
	NonTCP int
}

// ReadTrace parses a pcap file (as written by tcpdump -w) into a Trace.
func ReadTrace(path string) (*Trace, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	t, err := ParsePcap(bufio.NewReader(f))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// Link-layer types of the pcap files tcpdump writes on Linux.
const (
	linkEthernet = 1
	linkRaw      = 101
	linkSLL      = 113
	linkSLL2     = 276
)

// ParsePcap reads the classic pcap format (micro- or nanosecond timestamps, either byte order).
// pcapng is not supported; tcpdump -w writes classic pcap.
func ParsePcap(r io.Reader) (*Trace, error) {
	var hdr [24]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("reading pcap header: %w", err)
	}
	var order binary.ByteOrder
	nano := false
	switch binary.LittleEndian.Uint32(hdr[0:4]) {
	case 0xa1b2c3d4:
		order = binary.LittleEndian
	case 0xa1b23c4d:
		order, nano = binary.LittleEndian, true
	case 0xd4c3b2a1:
		order = binary.BigEndian
	case 0x4d3cb2a1:
		order, nano = binary.BigEndian, true
	default:
		return nil, fmt.Errorf("not a classic pcap file (magic %x)", hdr[0:4])
	}
	link := order.Uint32(hdr[20:24]) & 0x0fffffff
	t := &Trace{}
	flows := map[[2]netip.AddrPort]*Flow{}
	var rec [16]byte
	for {
		if _, err := io.ReadFull(r, rec[:]); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			// tcpdump killed mid-write leaves a partial record: keep what came before it.
			if errors.Is(err, io.ErrUnexpectedEOF) {
				break
			}
			return nil, err
		}
		sec, frac := order.Uint32(rec[0:4]), order.Uint32(rec[4:8])
		caplen := order.Uint32(rec[8:12])
		if caplen > 1<<24 {
			return nil, fmt.Errorf("implausible record length %d", caplen)
		}
		data := make([]byte, caplen)
		if _, err := io.ReadFull(r, data); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
				break
			}
			return nil, err
		}
		ts := time.Unix(int64(sec), int64(frac)*1000)
		if nano {
			ts = time.Unix(int64(sec), int64(frac))
		}
		p, ok := decodeFrame(link, data)
		if !ok {
			t.NonTCP++
			continue
		}
		p.Time = ts
		t.Packets = append(t.Packets, p)
		t.addToFlow(flows, p)
	}
	for _, f := range t.Flows {
		f.reassemble()
	}
	return t, nil
}

func (t *Trace) addToFlow(flows map[[2]netip.AddrPort]*Flow, p Packet) {
	key := [2]netip.AddrPort{p.Src, p.Dst}
	f := flows[key]
	// A SYN with a new sequence number starts a new connection on a reused 4-tuple.
	if f == nil || (p.Flags&FlagSYN != 0 && (!f.SYN || f.isn != p.Seq)) {
		f = &Flow{Src: p.Src, Dst: p.Dst}
		flows[key] = f
		t.Flows = append(t.Flows, f)
	}
	f.Packets++
	if p.Flags&FlagSYN != 0 {
		f.SYN, f.isn = true, p.Seq
	}
	f.FIN = f.FIN || p.Flags&FlagFIN != 0
	f.RST = f.RST || p.Flags&FlagRST != 0
	if len(p.Payload) > 0 {
		f.segs = append(f.segs, segment{seq: p.Seq, data: p.Payload})
	}
}

// reassemble orders the flow's segments by sequence number and joins them, dropping
// retransmitted bytes and counting holes.
func (f *Flow) reassemble() {
	if len(f.segs) == 0 {
		return
	}
	base := f.isn + 1
	if !f.SYN {
		// Without the handshake, the earliest segment (in sequence space) is the start.
		base = f.segs[0].seq
		for _, s := range f.segs[1:] {
			if int32(s.seq-base) < 0 {
				base = s.seq
			}
		}
	}
	type placed struct {
		off  int64
		data []byte
	}
	ps := make([]placed, 0, len(f.segs))
	for _, s := range f.segs {
		off := int64(int32(s.seq - base))
		if off < 0 {
			if int64(len(s.data)) <= -off {
				continue
			}
			s.data, off = s.data[-off:], 0
		}
		ps = append(ps, placed{off, s.data})
	}
	slices.SortStableFunc(ps, func(a, b placed) int { return int(a.off - b.off) })
	var buf bytes.Buffer
	var next int64
	for _, p := range ps {
		end := p.off + int64(len(p.data))
		if end <= next {
			continue
		}
		if p.off > next {
			f.Missing += p.off - next
			next = p.off
		}
		buf.Write(p.data[next-p.off:])
		next = end
	}
	f.Data, f.segs = buf.Bytes(), nil
}

// decodeFrame extracts a TCP segment from a link-layer frame.
func decodeFrame(link uint32, b []byte) (Packet, bool) {
	var etherType uint16
	switch link {
	case linkEthernet:
		if len(b) < 14 {
			return Packet{}, false
		}
		etherType, b = binary.BigEndian.Uint16(b[12:14]), b[14:]
		for etherType == 0x8100 || etherType == 0x88a8 {
			if len(b) < 4 {
				return Packet{}, false
			}
			etherType, b = binary.BigEndian.Uint16(b[2:4]), b[4:]
		}
	case linkSLL:
		if len(b) < 16 {
			return Packet{}, false
		}
		etherType, b = binary.BigEndian.Uint16(b[14:16]), b[16:]
	case linkSLL2:
		if len(b) < 20 {
			return Packet{}, false
		}
		etherType, b = binary.BigEndian.Uint16(b[0:2]), b[20:]
	case linkRaw:
		if len(b) == 0 {
			return Packet{}, false
		}
		etherType = 0x0800
		if b[0]>>4 == 6 {
			etherType = 0x86dd
		}
	default:
		return Packet{}, false
	}
	var src, dst netip.Addr
	var seg []byte
	switch etherType {
	case 0x0800:
		if len(b) < 20 || b[0]>>4 != 4 {
			return Packet{}, false
		}
		ihl := int(b[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(b[2:4]))
		// A fragment other than the first carries no TCP header.
		if b[9] != 6 || binary.BigEndian.Uint16(b[6:8])&0x1fff != 0 || ihl < 20 || len(b) < ihl {
			return Packet{}, false
		}
		// Offloaded segments may carry a zero total length; otherwise trim link padding.
		if total >= ihl && total < len(b) {
			b = b[:total]
		}
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		seg = b[ihl:]
	case 0x86dd:
		if len(b) < 40 || b[0]>>4 != 6 {
			return Packet{}, false
		}
		plen := int(binary.BigEndian.Uint16(b[4:6]))
		next := b[6]
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		b = b[40:]
		if plen > 0 && plen < len(b) {
			b = b[:plen]
		}
		// Hop-by-hop, routing and destination options may precede TCP.
		for next == 0 || next == 43 || next == 60 {
			if len(b) < 8 {
				return Packet{}, false
			}
			l := (int(b[1]) + 1) * 8
			if len(b) < l {
				return Packet{}, false
			}
			next, b = b[0], b[l:]
		}
		if next != 6 {
			return Packet{}, false
		}
		seg = b
	default:
		return Packet{}, false
	}
	if len(seg) < 20 {
		return Packet{}, false
	}
	doff := int(seg[12]>>4) * 4
	if doff < 20 || len(seg) < doff {
		return Packet{}, false
	}
	return Packet{
		Src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(seg[0:2])),
		Dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(seg[2:4])),
		Seq:     binary.BigEndian.Uint32(seg[4:8]),
		Ack:     binary.BigEndian.Uint32(seg[8:12]),
		Flags:   seg[13],
		Payload: seg[doff:],
	}, true
}

// Between returns the flows between a and b, in either direction.
func (t *Trace) Between(a, b netip.Addr) []*Flow {
	var out []*Flow
	for _, f := range t.Flows {
		s, d := f.Src.Addr(), f.Dst.Addr()
		if (s == a && d == b) || (s == b && d == a) {
			out = append(out, f)
		}
	}
	return out
}

// WithPayload returns the flows among fs that carried payload bytes.
func WithPayload(fs []*Flow) []*Flow {
	var out []*Flow
	for _, f := range fs {
		if len(f.Data) > 0 || f.Missing > 0 {
			out = append(out, f)
		}
	}
	return out
}

// FlowsWithClear returns the flows in which marker occurs in clear: in a reassembled stream, or
// in any single packet (which also covers flows whose reassembly has holes).
func (t *Trace) FlowsWithClear(marker []byte) []*Flow {
	hit := map[[2]netip.AddrPort]bool{}
	for _, p := range t.Packets {
		if bytes.Contains(p.Payload, marker) {
			hit[[2]netip.AddrPort{p.Src, p.Dst}] = true
		}
	}
	var out []*Flow
	for _, f := range t.Flows {
		if bytes.Contains(f.Data, marker) || hit[[2]netip.AddrPort{f.Src, f.Dst}] {
			out = append(out, f)
		}
	}
	return out
}

// TLS record content types.
const (
	TLSChangeCipherSpec = 0x14
	TLSAlert            = 0x15
	TLSHandshake        = 0x16
	TLSApplicationData  = 0x17
)

// TLSStats summarizes a stream that consists of TLS records only.
type TLSStats struct {
	Records int
	Bytes   int
	// Types counts records per content type.
	Types map[byte]int
}

// maxTLSRecord is the largest TLS 1.3 ciphertext record: 2^14 plus 256 bytes of expansion.
const maxTLSRecord = 1<<14 + 256

// CheckTLS verifies that data is a sequence of whole TLS records and nothing else: every
// header has a content type 0x14-0x17, version 0x0303 (0x0301 is allowed for handshake and alert
// records, which is how a ClientHello's record is labelled) and a length that lands exactly on
// the next header, the last one ending at the end of data.
func CheckTLS(data []byte) (TLSStats, error) {
	st := TLSStats{Types: map[byte]int{}, Bytes: len(data)}
	for off := 0; off < len(data); {
		if len(data)-off < 5 {
			return st, fmt.Errorf("byte %d: %d trailing bytes are not a TLS record header", off, len(data)-off)
		}
		ct, ver := data[off], binary.BigEndian.Uint16(data[off+1:off+3])
		n := int(binary.BigEndian.Uint16(data[off+3 : off+5]))
		if ct < TLSChangeCipherSpec || ct > TLSApplicationData {
			return st, fmt.Errorf("byte %d: content type 0x%02x is not TLS (% x ...)", off, ct, data[off:min(off+16, len(data))])
		}
		if ver != 0x0303 && (ver != 0x0301 || (ct != TLSHandshake && ct != TLSAlert)) {
			return st, fmt.Errorf("byte %d: record version 0x%04x is not TLS 1.2/1.3 framing", off, ver)
		}
		if n == 0 || n > maxTLSRecord {
			return st, fmt.Errorf("byte %d: record length %d is out of range", off, n)
		}
		if off+5+n > len(data) {
			return st, fmt.Errorf("byte %d: record of %d bytes runs past the end of the stream (%d bytes)", off, n, len(data))
		}
		st.Records++
		st.Types[ct]++
		off += 5 + n
	}
	return st, nil
}

// CheckTLS verifies that the flow's payload is TLS records only and that nothing is missing.
func (f *Flow) CheckTLS() (TLSStats, error) {
	if f.Missing > 0 {
		return TLSStats{}, fmt.Errorf("%s: the capture lost %d bytes of this flow", f, f.Missing)
	}
	st, err := CheckTLS(f.Data)
	if err != nil {
		return st, fmt.Errorf("%s: %w", f, err)
	}
	return st, nil
}
