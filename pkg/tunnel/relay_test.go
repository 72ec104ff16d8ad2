package tunnel

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func selfSigned(t testing.TB) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// relayFixture is app client <-> [a | relay | b] <-> app server, all on loopback TCP.
type relayFixture struct {
	client, server *net.TCPConn
	done           chan relayOutcome
}

type relayOutcome struct {
	up, down int64
	err      error
}

func newRelayFixture(t *testing.T) *relayFixture {
	t.Helper()
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	f := &relayFixture{client: client, server: server, done: make(chan relayOutcome, 1)}
	go func() {
		up, down, err := relay(a, b, func() { reset(a); reset(b) })
		a.Close()
		b.Close()
		f.done <- relayOutcome{up, down, err}
	}()
	return f
}

func (f *relayFixture) wait(t *testing.T) relayOutcome {
	t.Helper()
	select {
	case o := <-f.done:
		return o
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not finish")
		return relayOutcome{}
	}
}

func TestRelayByteExactWithHalfClose(t *testing.T) {
	f := newRelayFixture(t)
	payload := make([]byte, 3<<20+7)
	rand.Read(payload)
	reply := make([]byte, 1<<20+3)
	rand.Read(reply)

	// The server reads everything up to the client's half-close, then answers:
	// this only works if the client's FIN is passed on while the way back stays open.
	serverGot := make(chan []byte, 1)
	go func() {
		got, _ := io.ReadAll(f.server)
		serverGot <- got
		f.server.Write(reply)
		f.server.CloseWrite()
	}()
	if _, err := f.client.Write(payload); err != nil {
		t.Fatal(err)
	}
	f.client.CloseWrite()
	back, err := io.ReadAll(f.client)
	if err != nil {
		t.Fatal(err)
	}
	if got := <-serverGot; sha256.Sum256(got) != sha256.Sum256(payload) {
		t.Fatalf("server got %d bytes, not the %d sent", len(got), len(payload))
	}
	if !bytes.Equal(back, reply) {
		t.Fatalf("client got %d bytes back, want %d", len(back), len(reply))
	}
	o := f.wait(t)
	if o.err != nil || o.up != int64(len(payload)) || o.down != int64(len(reply)) {
		t.Fatalf("relay = %+v", o)
	}
}

func TestRelayPropagatesReset(t *testing.T) {
	f := newRelayFixture(t)
	if _, err := f.client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(f.server, buf); err != nil {
		t.Fatal(err)
	}
	reset(f.server)
	f.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := f.client.Read(buf)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read after server reset: %v, want ECONNRESET", err)
	}
	if o := f.wait(t); o.err == nil {
		t.Fatal("relay reported success after a reset")
	}
}

// The TLS side of a relay half-closes with close_notify and still reads.
func TestRelayOverTLSHalfClose(t *testing.T) {
	client, tlsS, done := startTLSRelay(t, func(c net.Conn) net.Conn { return c })
	go func() {
		got, _ := io.ReadAll(tlsS)
		tlsS.Write(append([]byte("echo:"), got...))
		tlsS.CloseWrite()
	}()
	client.Write([]byte("marker"))
	client.CloseWrite()
	back, err := io.ReadAll(client)
	if err != nil || string(back) != "echo:marker" {
		t.Fatalf("got %q, %v", back, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// startTLSRelay relays between a plain client and a TLS client, whose server end it returns
// (over wrap of its TCP connection) with the relay's outcome.
func startTLSRelay(t testing.TB, wrap func(net.Conn) net.Conn) (client *net.TCPConn, server *tls.Conn, done <-chan error) {
	client, a := tcpPair(t)
	rawB, rawS := tcpPair(t)
	tlsB := tls.Client(&batchConn{TCPConn: rawB}, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	server = tls.Server(wrap(rawS), &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
	// The relay starts on handshaken connections, as in the daemon.
	serverHandshake := make(chan error, 1)
	go func() { serverHandshake <- server.Handshake() }()
	if err := tlsB.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-serverHandshake; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	out := make(chan error, 1)
	go func() {
		_, _, err := relay(a, tlsB, func() { reset(a); reset(rawB) })
		a.Close()
		rawB.Close()
		out <- err
	}()
	return client, server, out
}

func BenchmarkRelayTLS(b *testing.B) {
	client, tlsS, _ := startTLSRelay(b, func(c net.Conn) net.Conn { return c })
	go io.Copy(io.Discard, tlsS)
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := client.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
}

// copyAdaptive from a plain TCP source passes every byte through each of its modes: small
// messages (pooled buffer taken on data), a burst that switches to the large buffer, small
// messages again, and the source's end.
func TestCopyAdaptiveFromTCP(t *testing.T) {
	src, peer := tcpPair(t)
	var dst bytes.Buffer
	done := make(chan error, 1)
	var n int64
	go func() {
		var err error
		n, err = copyAdaptive(&dst, src)
		done <- err
	}()
	var sent bytes.Buffer
	send := func(p []byte) {
		t.Helper()
		sent.Write(p)
		if _, err := peer.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 20 {
		send(bytes.Repeat([]byte{byte('a' + i)}, 1+i*100))
		time.Sleep(time.Millisecond)
	}
	burst := make([]byte, 3<<20)
	rand.Read(burst)
	send(burst)
	for i := range 20 {
		send([]byte{byte(i), byte(i + 1)})
		time.Sleep(time.Millisecond)
	}
	peer.CloseWrite()
	if err := waitDone(t, done, "copy"); err != nil {
		t.Fatal(err)
	}
	if n != int64(sent.Len()) || !bytes.Equal(dst.Bytes(), sent.Bytes()) {
		t.Fatalf("copied %d bytes, want %d, equal %v", n, sent.Len(), bytes.Equal(dst.Bytes(), sent.Bytes()))
	}
}

// A reset of a plain TCP source is an error of the copy, not its clean end.
func TestCopyAdaptiveTCPReset(t *testing.T) {
	src, peer := tcpPair(t)
	done := make(chan error, 1)
	go func() {
		_, err := copyAdaptive(io.Discard, src)
		done <- err
	}()
	peer.Write([]byte("x"))
	time.Sleep(10 * time.Millisecond)
	reset(peer)
	if err := waitDone(t, done, "copy"); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("copy error %v, want ECONNRESET", err)
	}
}

// waitDone returns what the goroutine doing what sent on done, failing the test if it never ends.
func waitDone(t *testing.T, done <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not end", what)
		return nil
	}
}

// splitWriter writes each write in two halves with a pause between, once enabled: TLS records
// then reach the reader cut in two, the halves further apart than idleAfter.
type splitWriter struct {
	net.Conn
	split atomic.Bool
}

func (w *splitWriter) Write(p []byte) (int, error) {
	if !w.split.Load() || len(p) < 2 {
		return w.Conn.Write(p)
	}
	n, err := w.Conn.Write(p[:len(p)/2])
	if err != nil {
		return n, err
	}
	time.Sleep(idleAfter + idleAfter/2)
	m, err := w.Conn.Write(p[len(p)/2:])
	return n + m, err
}

// A TLS source that goes idle (its relay gives the buffer back and waits on the socket) loses
// nothing: not across a silence, nor when a record arrives in two halves that far apart.
func TestRelayTLSSourceIdle(t *testing.T) {
	var slow *splitWriter
	defer func(d time.Duration) { idleAfter = d }(idleAfter)
	idleAfter = 100 * time.Millisecond
	client, tlsS, done := startTLSRelay(t, func(c net.Conn) net.Conn {
		slow = &splitWriter{Conn: c}
		return slow
	})
	if _, err := tlsS.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(idleAfter + idleAfter/2)
	slow.split.Store(true)
	if _, err := tlsS.Write([]byte("second, cut in two")); err != nil {
		t.Fatal(err)
	}
	slow.split.Store(false)
	tlsS.CloseWrite()
	client.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(client)
	if err != nil || string(got) != "firstsecond, cut in two" {
		t.Fatalf("client got %q, %v", got, err)
	}
	client.CloseWrite()
	if err := waitDone(t, done, "relay"); err != nil {
		t.Fatal(err)
	}
}

// A bulk transfer through the TLS side of a relay comes back byte-exact both ways, across every
// buffer mode: the app's writes vary in size, and the echo runs while the upload still goes on.
func TestRelayTLSBulkEcho(t *testing.T) {
	bulkEcho(t)
}

// Once the large buffers' budget is spent, relays stream through one-record buffers and lose
// nothing.
func TestRelayTLSBulkEchoBeyondBudget(t *testing.T) {
	defer func(max int64) { bulk.max.Store(max) }(bulk.max.Load())
	bulk.max.Store(0)
	denied := bulk.denied.Load()
	bulkEcho(t)
	if bulk.denied.Load() == denied {
		t.Fatal("no relay streamed without a large buffer")
	}
}

// bulkEcho sends 24 MiB through a relay's TLS side to an echo and checks what comes back.
func bulkEcho(t *testing.T) {
	t.Helper()
	// Deadlines that run out in the middle of the transfer, as they do in a long one.
	defer func(d time.Duration) { idleAfter = d }(idleAfter)
	idleAfter = time.Millisecond
	client, tlsS, done := startTLSRelay(t, func(c net.Conn) net.Conn { return c })
	go func() {
		io.Copy(tlsS, tlsS)
		tlsS.CloseWrite()
	}()
	data := make([]byte, 24<<20)
	mrand.NewChaCha8([32]byte{1}).Read(data)
	go func() {
		for off, size := 0, 1; off < len(data); size = size*7%(600<<10) + 1 {
			end := min(off+size, len(data))
			if _, err := client.Write(data[off:end]); err != nil {
				return
			}
			off = end
		}
		client.CloseWrite()
	}()
	back, err := io.ReadAll(client)
	if err != nil {
		t.Fatalf("read the echo: %v (relay: %v)", err, waitDone(t, done, "relay"))
	}
	if !bytes.Equal(back, data) {
		t.Fatalf("echo differs: got %d bytes, sent %d", len(back), len(data))
	}
	if err := waitDone(t, done, "relay"); err != nil {
		t.Fatal(err)
	}
}

// The budget is a quarter of the runtime's memory limit, or the default without one.
func TestBulkBudgetFor(t *testing.T) {
	for _, tc := range []struct{ limit, want int64 }{
		{math.MaxInt64, defaultBulkBudget},
		{256 << 20, 64 << 20},
		{1 << 30, 256 << 20},
	} {
		if got := bulkBudgetFor(tc.limit); got != tc.want {
			t.Errorf("bulkBudgetFor(%d) = %d, want %d", tc.limit, got, tc.want)
		}
	}
}

// The budget lends at most max large buffers at once, a one-record buffer past it, and counts
// every refusal.
func TestBulkBuffersBudget(t *testing.T) {
	b := newBulkBuffers(1)
	first, second := b.take(), b.take()
	if len(*first) != largeBufSize || len(*second) != tlsRecordMax {
		t.Fatalf("lent buffers of %d and %d bytes, want %d and %d", len(*first), len(*second), largeBufSize, tlsRecordMax)
	}
	if lent, denied := b.lent.Load(), b.denied.Load(); lent != 1 || denied != 1 {
		t.Fatalf("lent %d, denied %d; want 1 and 1", lent, denied)
	}
	b.give(second)
	b.give(first)
	if lent := b.lent.Load(); lent != 0 {
		t.Fatalf("lent %d after both came back, want 0", lent)
	}
	third := b.take()
	defer b.give(third)
	if len(*third) != largeBufSize {
		t.Fatalf("lent a buffer of %d bytes once the large one came back, want %d", len(*third), largeBufSize)
	}
}
