package conformance_test

// Unit tests of the harness's analysis helpers (no root): pcap parsing and TCP reassembly, the
// TLS record check against real crypto/tls output, and the log reader.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

// pcapWriter builds a classic little-endian pcap with Ethernet frames.
type pcapWriter struct{ bytes.Buffer }

func newPcap() *pcapWriter {
	w := &pcapWriter{}
	hdr := make([]byte, 24)
	binary.LittleEndian.PutUint32(hdr[0:], 0xa1b2c3d4)
	binary.LittleEndian.PutUint16(hdr[4:], 2)
	binary.LittleEndian.PutUint16(hdr[6:], 4)
	binary.LittleEndian.PutUint32(hdr[16:], 65535)
	binary.LittleEndian.PutUint32(hdr[20:], 1)
	w.Write(hdr)
	return w
}

func (w *pcapWriter) tcp4(src, dst netip.AddrPort, seq uint32, flags byte, payload []byte) {
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], src.Port())
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12] = 5 << 4
	tcp[13] = flags
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+20+len(payload)))
	ip[8], ip[9] = 64, 6
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	frame := append(make([]byte, 12), 0x08, 0x00)
	frame = append(append(append(frame, ip...), tcp...), payload...)
	// Ethernet pads short frames; the parser must trim by the IP length.
	for len(frame) < 60 {
		frame = append(frame, 0)
	}
	rec := make([]byte, 16)
	binary.LittleEndian.PutUint32(rec[8:], uint32(len(frame)))
	binary.LittleEndian.PutUint32(rec[12:], uint32(len(frame)))
	w.Write(rec)
	w.Write(frame)
}

func TestHarnessPcapReassembly(t *testing.T) {
	c := netip.MustParseAddrPort("10.244.1.2:40000")
	s := netip.MustParseAddrPort("10.244.1.3:8080")
	w := newPcap()
	const isn = 0xfffffff0 // the stream wraps around the sequence space
	w.tcp4(c, s, isn, conformance.FlagSYN, nil)
	w.tcp4(s, c, 7, conformance.FlagSYN|conformance.FlagACK, nil)
	w.tcp4(c, s, isn+1, conformance.FlagACK, []byte("hello, "))
	w.tcp4(c, s, isn+1+12, conformance.FlagACK, []byte("!"))     // out of order
	w.tcp4(c, s, isn+1+7, conformance.FlagACK, []byte("world"))  // fills the hole
	w.tcp4(c, s, isn+1+7, conformance.FlagACK, []byte("world!")) // overlapping retransmission
	w.tcp4(c, s, isn+1+13, conformance.FlagACK|conformance.FlagFIN, nil)
	w.tcp4(s, c, 8, conformance.FlagACK|conformance.FlagRST, nil)
	w.Write([]byte{1, 2, 3}) // a record cut off by a killed tcpdump
	tr, err := conformance.ParsePcap(&w.Buffer)
	if err != nil {
		t.Fatal(err)
	}
	if len(tr.Packets) != 8 || len(tr.Flows) != 2 {
		t.Fatalf("got %d packets in %d flows, want 8 in 2", len(tr.Packets), len(tr.Flows))
	}
	up := tr.Flows[0]
	if string(up.Data) != "hello, world!" || up.Missing != 0 {
		t.Errorf("reassembled %q (%d missing), want %q", up.Data, up.Missing, "hello, world!")
	}
	if !up.SYN || !up.FIN || up.RST || !tr.Flows[1].RST {
		t.Errorf("flags: up SYN %v FIN %v RST %v, down RST %v", up.SYN, up.FIN, up.RST, tr.Flows[1].RST)
	}
	if got := tr.FlowsWithClear([]byte("lo, wor")); len(got) != 1 || got[0] != up {
		t.Errorf("marker across segments found in %v", got)
	}
	if got := tr.Between(s.Addr(), c.Addr()); len(got) != 2 {
		t.Errorf("Between found %d flows, want 2", len(got))
	}

	// A hole the capture lost is counted, not papered over.
	w = newPcap()
	w.tcp4(c, s, 100, conformance.FlagSYN, nil)
	w.tcp4(c, s, 101, conformance.FlagACK, []byte("abc"))
	w.tcp4(c, s, 110, conformance.FlagACK, []byte("xyz"))
	tr, err = conformance.ParsePcap(&w.Buffer)
	if err != nil {
		t.Fatal(err)
	}
	if f := tr.Flows[0]; f.Missing != 6 {
		t.Errorf("missing = %d, want 6", f.Missing)
	} else if _, err := f.CheckTLS(); err == nil {
		t.Error("CheckTLS accepted a flow with a hole")
	}
}

// tlsStreams runs a real TLS 1.3 exchange and returns the raw bytes each side wrote.
func tlsStreams(t *testing.T) (fromClient, fromServer []byte) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "server"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"server"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	cc, sc := net.Pipe()
	var up, down bytes.Buffer
	client := tls.Client(recorder{cc, &up}, &tls.Config{RootCAs: pool, ServerName: "server", MinVersion: tls.VersionTLS13, NextProtos: []string{"meshless/1"}})
	server := tls.Server(recorder{sc, &down}, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS13, NextProtos: []string{"meshless/1"}})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		// The server echoes until the client closes.
		io.Copy(server, server)
		server.Close()
	}()
	payload := bytes.Repeat([]byte("0123456789abcdef"), 5000) // several full-size records
	go func() {
		client.Write(payload)
		client.CloseWrite()
	}()
	got, err := io.ReadAll(client)
	if err != nil && !bytes.Equal(got, payload) {
		t.Fatal(err)
	}
	client.Close()
	wg.Wait()
	return up.Bytes(), down.Bytes()
}

type recorder struct {
	net.Conn
	w *bytes.Buffer
}

func (r recorder) Write(b []byte) (int, error) {
	r.w.Write(b)
	return r.Conn.Write(b)
}

func TestHarnessCheckTLS(t *testing.T) {
	up, down := tlsStreams(t)
	for name, s := range map[string][]byte{"client": up, "server": down} {
		st, err := conformance.CheckTLS(s)
		if err != nil {
			t.Errorf("%s stream: %v", name, err)
			continue
		}
		if st.Types[conformance.TLSHandshake] == 0 || st.Types[conformance.TLSApplicationData] < 5 {
			t.Errorf("%s stream: records %v, want a handshake and application data", name, st.Types)
		}
	}
	bad := map[string][]byte{
		"plaintext":        []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		"truncated record": up[:len(up)-1],
		"trailing bytes":   append(append([]byte(nil), up...), 0x17, 0x03),
		"bad version":      {0x17, 0x03, 0x01, 0x00, 0x01, 0x00},
		"zero length":      {0x17, 0x03, 0x03, 0x00, 0x00},
		"TLS then clear":   append(append([]byte(nil), down...), []byte("secret")...),
	}
	for name, s := range bad {
		if _, err := conformance.CheckTLS(s); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestHarnessReadLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewJSONHandler(f, nil))
	log.Info("ready", "node", "n1")
	log.Info("connection", "src", "10.244.1.2:4000", "dst", "10.244.1.3:8080", "peer_id", "spiffe://cluster.local/ns/a/sa/b",
		"direction", "inbound", "bytes_received", 1<<20, "duration", 1500*time.Millisecond, slog.Group("pod", "name", "srv"))
	f.WriteString("panic: not JSON\n")
	f.Close()
	l, err := conformance.ReadLog(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Records) != 2 || len(l.Other) != 1 {
		t.Fatalf("got %d records and %d other lines", len(l.Records), len(l.Other))
	}
	got := l.Find("msg", "connection", "direction", "inbound", "peer_id", "spiffe://cluster.local/ns/a/sa/b")
	if len(got) != 1 {
		t.Fatalf("Find: %d records", len(got))
	}
	r := got[0]
	if r.String("bytes_received") != "1048576" || r.String("pod.name") != "srv" || r.Level() != "INFO" {
		t.Errorf("record values: bytes_received %q pod.name %q level %q", r.String("bytes_received"), r.String("pod.name"), r.Level())
	}
	if len(l.Find("msg", "connection", "bytes_sent")) != 0 || len(l.Find("src", func(s string) bool { return len(s) > 0 })) != 1 {
		t.Error("presence and predicate matching")
	}
	if len(l.Since(1).Find("msg", "ready")) != 0 {
		t.Error("Since kept an earlier record")
	}
}
