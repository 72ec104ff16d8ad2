package meshtls

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var testTD = spiffeid.RequireTrustDomainFromString("cluster.local")

// newTestCA creates a CA in a temporary directory the way `meshlessd ca init` does and loads it.
func newTestCA(t testing.TB) *CA {
	t.Helper()
	dir := t.TempDir()
	if err := InitCA(dir, time.Now()); err != nil {
		t.Fatal(err)
	}
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func mustID(t testing.TB, td spiffeid.TrustDomain, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := WorkloadID(td, ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// newTestSource returns a CASource of testTD on a fresh CA holding SVIDs for ids.
func newTestSource(t testing.TB, ids ...spiffeid.ID) *CASource {
	t.Helper()
	src := NewCASource(newTestCA(t), testTD, time.Hour, nil)
	for _, id := range ids {
		if err := src.Acquire(Workload{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	return src
}

// fakeClock is a settable clock for CASource.now.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func jsonLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// staticSource is a Source with fixed SVIDs and bundles, for peers that the built-in CA would never
// produce (foreign trust domains, expired or malformed certificates).
type staticSource struct {
	svids   map[spiffeid.ID]*x509svid.SVID
	bundles *x509bundle.Set
}

func (s *staticSource) SVID(id spiffeid.ID) (*x509svid.SVID, error) {
	if svid, ok := s.svids[id]; ok {
		return svid, nil
	}
	return nil, errors.New("no such SVID")
}

func (s *staticSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.bundles.GetX509BundleForTrustDomain(td)
}

// tlsCert turns an SVID into a certificate for a hand-made tls.Config.
func tlsCert(svid *x509svid.SVID) tls.Certificate {
	cert := tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return cert
}

// craftLeaf returns a certificate signed by ca with the given URI SANs (none, or several).
func craftLeaf(t testing.TB, ca *CA, uris []*url.URL) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := randomSerial()
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		URIs:         uris,
		DNSNames:     []string{"example.test"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// result is what one side of a test connection saw.
type result struct {
	state tls.ConnectionState
	err   error
}

// handshake runs one TLS connection over loopback between client and server configs. After the
// handshake the server sends one byte and the client reads it, which makes the client take in
// the session tickets, so that a later handshake can resume.
func handshake(t testing.TB, client, server *tls.Config) (cli, srv result) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return handshakeOn(t, ln, client, server)
}

// handshakeOn is handshake on a given listener, so that the client dials the same address (the
// key of its session cache) several times.
func handshakeOn(t testing.TB, ln net.Listener, client, server *tls.Config) (cli, srv result) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	deadline, _ := ctx.Deadline()

	done := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer conn.Close()
		conn.SetDeadline(deadline)
		tc := tls.Server(conn, server)
		if err := tc.HandshakeContext(ctx); err != nil {
			done <- result{err: err}
			return
		}
		_, err = tc.Write([]byte{1})
		done <- result{state: tc.ConnectionState(), err: err}
		// Wait for the client's close so the byte is not lost to a reset.
		io.Copy(io.Discard, tc)
	}()

	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(deadline)
	tc := tls.Client(conn, client)
	cli.err = tc.HandshakeContext(ctx)
	if cli.err == nil {
		// The server's verdict on the client certificate arrives after the client's handshake.
		_, cli.err = io.ReadFull(tc, make([]byte, 1))
		cli.state = tc.ConnectionState()
	}
	conn.Close()
	return cli, <-done
}

// pair is an established connection kept open by a test.
type pair struct {
	client, server *tls.Conn
}

// connect establishes a connection over loopback and leaves it open.
func connect(t testing.TB, client, server *tls.Config) pair {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *tls.Conn, 1)
	errs := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			errs <- err
			return
		}
		tc := tls.Server(conn, server)
		if err := tc.Handshake(); err != nil {
			conn.Close()
			errs <- err
			return
		}
		accepted <- tc
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(conn, client)
	if err := tc.Handshake(); err != nil {
		conn.Close()
		t.Fatal(err)
	}
	var p pair
	select {
	case p.server = <-accepted:
	case err := <-errs:
		conn.Close()
		t.Fatal(err)
	}
	p.client = tc
	t.Cleanup(func() { p.client.Close(); p.server.Close() })
	deadline := time.Now().Add(10 * time.Second)
	p.client.SetDeadline(deadline)
	p.server.SetDeadline(deadline)
	return p
}

// echo sends msg from client to server and back, failing the test if either way breaks.
func (p pair) echo(t testing.TB, msg string) {
	t.Helper()
	if _, err := p.client.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(p.server, buf); err != nil {
		t.Fatal(err)
	}
	if _, err := p.server.Write(buf); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(p.client, buf); err != nil {
		t.Fatal(err)
	}
	if string(buf) != msg {
		t.Fatalf("echo: got %q, want %q", buf, msg)
	}
}
