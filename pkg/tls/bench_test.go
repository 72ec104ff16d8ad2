package meshtls

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
)

// BenchmarkHandshakeFull measures a full mutual TLS 1.3 handshake (ECDSA P-256 both ways,
// X25519MLKEM768 key exchange, SPIFFE verification on both sides) over net.Pipe.
func BenchmarkHandshakeFull(b *testing.B) {
	client, server := benchConfigs(b)
	// Tickets off: every handshake is a full one.
	server.SessionTicketsDisabled = true
	for b.Loop() {
		if cs := pipeHandshake(b, client, server); cs.DidResume {
			b.Fatal("resumed")
		}
	}
}

// BenchmarkHandshakeResumed measures a handshake resuming an earlier session (PSK with a fresh
// key exchange), VerifyConnection included.
func BenchmarkHandshakeResumed(b *testing.B) {
	client, server := benchConfigs(b)
	pipeHandshake(b, client, server)
	for b.Loop() {
		if cs := pipeHandshake(b, client, server); !cs.DidResume {
			b.Fatal("not resumed")
		}
	}
}

func benchConfigs(b *testing.B) (client, server *tls.Config) {
	a, s := mustID(b, testTD, "bench", "client"), mustID(b, testTD, "bench", "server")
	configs := NewConfigs(newTestSource(b, a, s), nil)
	return configs.Client(a), configs.Server(s)
}

// pipeHandshake runs one connection over net.Pipe; the one byte the server sends makes the client
// read the session ticket that precedes it.
func pipeHandshake(b *testing.B, client, server *tls.Config) tls.ConnectionState {
	c, s := net.Pipe()
	errs := make(chan error, 1)
	go func() {
		defer s.Close()
		tc := tls.Server(s, server)
		if err := tc.Handshake(); err != nil {
			errs <- err
			return
		}
		_, err := tc.Write([]byte{1})
		errs <- err
	}()
	defer c.Close()
	tc := tls.Client(c, client)
	if err := tc.Handshake(); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(tc, make([]byte, 1)); err != nil {
		b.Fatal(err)
	}
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	return tc.ConnectionState()
}
