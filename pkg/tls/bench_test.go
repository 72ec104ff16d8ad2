package meshtls

import (
	"crypto/tls"
	"io"
	"net"
	"testing"

	"github.com/meshless/meshless/internal/benchcpu"
)

// BenchmarkHandshakeFull measures a full mutual TLS 1.3 handshake (ECDSA P-256 both ways,
// X25519MLKEM768 key exchange, SPIFFE verification on both sides) over loopback TCP, connection
// set-up included; client and server run on separate goroutines.
func BenchmarkHandshakeFull(b *testing.B) {
	client, server := benchConfigs(b)
	// Tickets off: every handshake is a full one.
	server.SessionTicketsDisabled = true
	addr := benchServer(b, server)
	start := benchcpu.Now(b)
	for b.Loop() {
		if cs := benchHandshake(b, addr, client); cs.DidResume {
			b.Fatal("resumed")
		}
	}
	benchcpu.Report(b, start)
}

// BenchmarkHandshakeResumed measures a handshake resuming an earlier session (PSK with a fresh
// key exchange), VerifyConnection on both sides included.
func BenchmarkHandshakeResumed(b *testing.B) {
	client, server := benchConfigs(b)
	addr := benchServer(b, server)
	benchHandshake(b, addr, client)
	start := benchcpu.Now(b)
	for b.Loop() {
		if cs := benchHandshake(b, addr, client); !cs.DidResume {
			b.Fatal("not resumed")
		}
	}
	benchcpu.Report(b, start)
}

func benchConfigs(b *testing.B) (client, server *tls.Config) {
	a, s := mustID(b, testTD, "bench", "client"), mustID(b, testTD, "bench", "server")
	configs := NewConfigs(newTestSource(b, a, s), nil)
	return configs.Client(a), configs.Server(s)
}

// benchServer accepts connections on loopback until the benchmark ends; each gets a handshake and
// one byte, which makes the client read the session ticket that precedes it. (net.Pipe would
// deadlock: it has no buffer, and the server writes its tickets while the client writes its
// Finished.)
func benchServer(b *testing.B, server *tls.Config) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				tc := tls.Server(conn, server)
				if tc.Handshake() == nil {
					tc.Write([]byte{1})
					io.Copy(io.Discard, tc)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func benchHandshake(b *testing.B, addr string, client *tls.Config) tls.ConnectionState {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	tc := tls.Client(conn, client)
	if err := tc.Handshake(); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(tc, make([]byte, 1)); err != nil {
		b.Fatal(err)
	}
	return tc.ConnectionState()
}
