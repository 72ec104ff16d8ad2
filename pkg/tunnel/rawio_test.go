package tunnel

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// rawPair returns both ends of a TCP connection over loopback, each with its rawSocket.
func rawPair(t *testing.T) (client, server *net.TCPConn, rawClient, rawServer *rawSocket) {
	t.Helper()
	client, server = tcpPair(t)
	var err error
	if rawClient, err = newRawSocket(client); err != nil {
		t.Fatal(err)
	}
	if rawServer, err = newRawSocket(server); err != nil {
		t.Fatal(err)
	}
	return client, server, rawClient, rawServer
}

// TestRawSocketWriteAndRead moves 8 MiB through small socket buffers, so that the writer fills
// the socket again and again and must wait in the netpoller for room, and the reader for data.
func TestRawSocketWriteAndRead(t *testing.T) {
	client, server, rawClient, rawServer := rawPair(t)
	if err := client.SetWriteBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	if err := server.SetReadBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 8<<20)
	if _, err := rand.Read(want); err != nil {
		t.Fatal(err)
	}
	written := make(chan error, 1)
	go func() {
		// Writes of varying size, from one byte to 1 MiB.
		p := want
		for size := 1; len(p) > 0; size = size*7 + 3 {
			n := min(size%(1<<20)+1, len(p))
			m, err := rawClient.Write(p[:n])
			if err == nil && m != n {
				err = io.ErrShortWrite
			}
			if err != nil {
				written <- err
				return
			}
			p = p[n:]
		}
		written <- client.CloseWrite()
	}()
	var got bytes.Buffer
	buf := make([]byte, 64<<10)
	for {
		n, err := rawServer.Read(buf)
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("Read after %d bytes: %v", got.Len(), err)
		}
	}
	if err := <-written; err != nil {
		t.Fatalf("Write: %v", err)
	}
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatalf("read %d bytes, not the %d written", got.Len(), len(want))
	}
}

// TestRawSocketReadDeadline checks that a read deadline ends a waiting Read as it ends a
// net.TCPConn's, with a timeout.
func TestRawSocketReadDeadline(t *testing.T) {
	_, server, _, rawServer := rawPair(t)
	if err := server.SetReadDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	n, err := rawServer.Read(make([]byte, 10))
	var ne net.Error
	if n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read past the deadline = %d, %v; want 0 and a timeout", n, err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "read" {
		t.Errorf("Read error %#v is not a read *net.OpError", err)
	}
}

// TestRawSocketErrors checks the errors of a closed connection and of a reset one.
func TestRawSocketErrors(t *testing.T) {
	_, server, rawClient, rawServer := rawPair(t)
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := rawServer.Read(make([]byte, 10)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read on a closed connection = %v, want net.ErrClosed", err)
	}
	if _, err := rawServer.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write on a closed connection = %v, want net.ErrClosed", err)
	}

	// The peer is gone: writes fail with a reset or a broken pipe once the kernel knows.
	var err error
	for range 100 {
		if _, err = rawClient.Write(make([]byte, 64<<10)); err != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	var oe *net.OpError
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) || !errors.As(err, &oe) || oe.Op != "write" {
		t.Errorf("Write to a closed peer = %v, want a write *net.OpError with ECONNRESET or EPIPE", err)
	}
}
