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

func TestPeekHello(t *testing.T) {
	cases := []struct {
		name     string
		send     func(t *testing.T, c *net.TCPConn)
		wantMesh bool
		wantErr  error
		wantSeen []byte
	}{
		{
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
			mesh, seen, err := peekHello(server, 300*time.Millisecond)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if mesh != tc.wantMesh {
				t.Errorf("mesh = %v, want %v", mesh, tc.wantMesh)
			}
			if tc.wantSeen != nil && !bytes.Equal(seen, tc.wantSeen) {
				t.Errorf("seen = %q, want %q", seen, tc.wantSeen)
			}
			if tc.wantErr == nil && len(seen) == 0 {
				t.Error("no bytes recorded for replay")
			}
		})
	}
}

// The bytes the peek consumed must replay into a real handshake: a TLS
// server given the prefix completes the handshake the client started.
func TestPeekReplayCompletesHandshake(t *testing.T) {
	client, server := tcpPair(t)
	cert := selfSigned(t)
	done := make(chan error, 1)
	go func() {
		c := tls.Client(client, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{meshtls.ALPN}, MinVersion: tls.VersionTLS13})
		if err := c.Handshake(); err != nil {
			done <- err
			return
		}
		_, err := c.Write([]byte("hello"))
		done <- err
	}()
	mesh, seen, err := peekHello(server, time.Second)
	if err != nil || !mesh {
		t.Fatalf("peek: mesh=%v err=%v", mesh, err)
	}
	s := tls.Server(&prefixConn{batchConn: &batchConn{TCPConn: server}, prefix: seen}, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{meshtls.ALPN}})
	if err := s.Handshake(); err != nil {
		t.Fatalf("server handshake after replay: %v", err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestPeekBoundsBuffering(t *testing.T) {
	client, server := tcpPair(t)
	// A TLS record header announcing a huge handshake, then filler: the peek
	// must stop at maxPeek instead of buffering whatever the client sends.
	go func() {
		client.Write([]byte{0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff})
		client.Write(make([]byte, 2*maxPeek))
	}()
	mesh, seen, err := peekHello(server, time.Second)
	if err != nil {
		t.Fatalf("peek: %v", err)
	}
	if mesh {
		t.Fatal("garbage classified as mesh")
	}
	if len(seen) > maxPeek {
		t.Fatalf("buffered %d bytes, cap is %d", len(seen), maxPeek)
	}
}

func BenchmarkPeekHello(b *testing.B) {
	var hello bytes.Buffer
	cli, srv := net.Pipe()
	go func() {
		_ = tls.Client(cli, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{meshtls.ALPN}}).Handshake()
	}()
	buf := make([]byte, 4096)
	srv.SetReadDeadline(time.Now().Add(time.Second))
	n, _ := srv.Read(buf)
	hello.Write(buf[:n])
	cli.Close()
	srv.Close()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		c := &replayConn{data: hello.Bytes()}
		mesh, _, err := peekHello(c, time.Second)
		if err != nil || !mesh {
			b.Fatalf("mesh=%v err=%v", mesh, err)
		}
	}
}

// replayConn serves fixed bytes, then EOF; enough for the peek.
type replayConn struct {
	data []byte
}

func (r *replayConn) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func (r *replayConn) Write(p []byte) (int, error)      { return len(p), nil }
func (r *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (r *replayConn) SetDeadline(time.Time) error      { return nil }
func (r *replayConn) SetWriteDeadline(time.Time) error { return nil }
func (r *replayConn) Close() error                     { return nil }
func (r *replayConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (r *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
