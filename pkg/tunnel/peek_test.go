package tunnel

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	meshtls "github.com/meshless/meshless/pkg/tls"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// sendHello starts a TLS client handshake offering protos on c.
func sendHello(t *testing.T, c net.Conn, protos []string) {
	t.Helper()
	go func() {
		_ = tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: protos}).Handshake()
	}()
}

// testCASource returns a built-in CA's SVID source for the trust domain cluster.local, from a
// new CA.
func testCASource(t testing.TB) (spiffeid.TrustDomain, *meshtls.CASource) {
	t.Helper()
	caDir := t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	ca, err := meshtls.LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	return td, meshtls.NewCASource(ca, td, time.Hour, nil)
}

// meshConfigs returns the client config of one identity and the server config of another, from
// one built-in CA, as the daemon builds them.
func meshConfigs(t testing.TB) (client, server *tls.Config) {
	t.Helper()
	td, src := testCASource(t)
	a, b := spiffeid.RequireFromPath(td, "/ns/test/sa/a"), spiffeid.RequireFromPath(td, "/ns/test/sa/b")
	for _, id := range []spiffeid.ID{a, b} {
		if err := src.Acquire(meshtls.Workload{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	configs := meshtls.NewConfigs(src, nil)
	return configs.Client(a), configs.Server(b)
}

func TestServerHandshakeClassifies(t *testing.T) {
	_, serverCfg := meshConfigs(t)
	cases := []struct {
		name     string
		send     func(t *testing.T, c *net.TCPConn)
		wantMesh bool
		wantErr  error
		wantSeen []byte
	}{
		{
			// The handshake itself fails: this client has no certificate.
			name:     "meshless ALPN",
			send:     func(t *testing.T, c *net.TCPConn) { sendHello(t, c, []string{"h2", meshtls.ALPN}) },
			wantMesh: true,
		},
		{
			name: "TLS without meshless ALPN",
			send: func(t *testing.T, c *net.TCPConn) { sendHello(t, c, []string{"h2", "http/1.1"}) },
		},
		{
			name:     "plaintext HTTP",
			send:     func(t *testing.T, c *net.TCPConn) { c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")) },
			wantSeen: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		},
		{
			name:     "three bytes then silence",
			send:     func(t *testing.T, c *net.TCPConn) { c.Write([]byte{0x16, 0x03, 0x01}) },
			wantSeen: []byte{0x16, 0x03, 0x01},
		},
		{
			name:    "silent client",
			send:    func(t *testing.T, c *net.TCPConn) {},
			wantErr: os.ErrDeadlineExceeded,
		},
		{
			name:    "client closes at once",
			send:    func(t *testing.T, c *net.TCPConn) { c.CloseWrite() },
			wantErr: io.EOF,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			client, server := tcpPair(t)
			tc.send(t, client)
			conn, mesh, seen, err := serverHandshake(server, serverCfg, 300*time.Millisecond, time.Second)
			if mesh != tc.wantMesh {
				t.Fatalf("mesh = %v, want %v", mesh, tc.wantMesh)
			}
			if mesh {
				if err == nil || conn == nil {
					t.Fatalf("handshake with a client without a certificate: conn %v, err %v; want a failed handshake", conn, err)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantSeen != nil && !bytes.Equal(seen, tc.wantSeen) {
				t.Errorf("seen = %q, want %q", seen, tc.wantSeen)
			}
			if tc.wantErr == nil && len(seen) == 0 {
				t.Error("no bytes recorded for replay")
			}
			if tc.wantErr == nil {
				// Nothing was answered: the client still waits for a server hello or a response.
				client.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				if n, err := client.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("the client got %d bytes, %v; want nothing", n, err)
				}
			}
		})
	}
}

// A TLS client that is not meshless gets its ClientHello replayed to the app untouched: the app's
// own TLS server completes the handshake that the client started.
func TestServerHandshakeReplaysForeignTLS(t *testing.T) {
	_, serverCfg := meshConfigs(t)
	client, server := tcpPair(t)
	cert := selfSigned(t)
	done := make(chan error, 1)
	go func() {
		c := tls.Client(client, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13})
		if err := c.Handshake(); err != nil {
			done <- err
			return
		}
		_, err := c.Write([]byte("hello"))
		done <- err
	}()
	_, mesh, seen, err := serverHandshake(server, serverCfg, time.Second, time.Second)
	if err != nil || mesh {
		t.Fatalf("mesh=%v err=%v", mesh, err)
	}
	app := tls.Server(&replayConn{TCPConn: server, prefix: seen}, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}})
	if err := app.Handshake(); err != nil {
		t.Fatalf("app's handshake after replay: %v", err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(app, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A meshless client completes its handshake, resumed or not, and its bytes come through.
func TestServerHandshakeMesh(t *testing.T) {
	clientCfg, serverCfg := meshConfigs(t)
	// The client's sessions are keyed by the server's address: one listener for both.
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, wantResumed := range []bool{false, true} {
		client, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		server, err := ln.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		defer server.Close()
		done := make(chan error, 1)
		go func() {
			c := tls.Client(client, clientCfg)
			_, err := c.Write([]byte("hello"))
			if err == nil {
				// Reading the server's ticket lets the next handshake resume.
				_, err = io.ReadFull(c, make([]byte, 1))
			}
			done <- err
		}()
		conn, mesh, _, err := serverHandshake(server, serverCfg, time.Second, time.Second)
		if err != nil || !mesh {
			t.Fatalf("mesh=%v err=%v", mesh, err)
		}
		if got := conn.ConnectionState().DidResume; got != wantResumed {
			t.Errorf("resumed = %v, want %v", got, wantResumed)
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "hello" {
			t.Fatalf("read %q, %v", buf, err)
		}
		if _, err := conn.Write([]byte{1}); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

func TestServerHandshakeBoundsBuffering(t *testing.T) {
	_, serverCfg := meshConfigs(t)
	client, server := tcpPair(t)
	// A TLS record header announcing a huge handshake, then filler: the probing
	// must stop at maxPeek instead of buffering whatever the client sends.
	go func() {
		client.Write([]byte{0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff})
		client.Write(make([]byte, 2*maxPeek))
	}()
	_, mesh, seen, err := serverHandshake(server, serverCfg, time.Second, time.Second)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if mesh {
		t.Fatal("garbage classified as mesh")
	}
	if len(seen) > maxPeek {
		t.Fatalf("buffered %d bytes, cap is %d", len(seen), maxPeek)
	}
}

// BenchmarkPeekHello measures how a TLS connection that is not meshless (a ClientHello without
// meshless's ALPN) is told apart: parsing its ClientHello.
func BenchmarkPeekHello(b *testing.B) {
	var hello bytes.Buffer
	cli, srv := net.Pipe()
	go func() {
		_ = tls.Client(cli, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}).Handshake()
	}()
	buf := make([]byte, 4096)
	srv.SetReadDeadline(time.Now().Add(time.Second))
	n, _ := srv.Read(buf)
	hello.Write(buf[:n])
	cli.Close()
	srv.Close()
	_, serverCfg := meshConfigs(b)
	b.ReportAllocs()
	for b.Loop() {
		c := &bytesConn{data: hello.Bytes()}
		_, mesh, seen, err := serverHandshake(c, serverCfg, time.Second, time.Second)
		if err != nil || mesh || len(seen) != n {
			b.Fatalf("mesh=%v seen=%d err=%v", mesh, len(seen), err)
		}
	}
}

// replayConn replays bytes read earlier before reading on from the connection.
type replayConn struct {
	*net.TCPConn
	prefix []byte
}

func (p *replayConn) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		return n, nil
	}
	return p.TCPConn.Read(b)
}

// bytesConn serves fixed bytes, then EOF.
type bytesConn struct {
	data []byte
}

func (r *bytesConn) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func (r *bytesConn) Write(p []byte) (int, error)      { return len(p), nil }
func (r *bytesConn) SetReadDeadline(time.Time) error  { return nil }
func (r *bytesConn) SetDeadline(time.Time) error      { return nil }
func (r *bytesConn) SetWriteDeadline(time.Time) error { return nil }
func (r *bytesConn) Close() error                     { return nil }
func (r *bytesConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (r *bytesConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
