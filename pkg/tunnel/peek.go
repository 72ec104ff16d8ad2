package tunnel

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"slices"
	"time"

	meshtls "github.com/meshless/meshless/pkg/tls"
)

// maxPeek bounds what one inbound connection may make us buffer before we
// decide whether it is meshless mTLS. A ClientHello with a post-quantum key
// share is under 2 KiB; TLS caps a handshake message at 64 KiB.
const maxPeek = 64 << 10

var errHelloSeen = errors.New("client hello seen")

// peekHello reads the start of an inbound connection and reports whether it is
// a TLS ClientHello offering meshless's ALPN. It returns every byte it read so
// that the caller can replay them to the TLS server or to the app. Parsing is
// left to crypto/tls: a server handshake on a recording, write-discarding view
// of the connection is stopped as soon as the ClientHello has been parsed.
func peekHello(c net.Conn, timeout time.Duration) (mesh bool, seen []byte, err error) {
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return false, nil, err
	}
	rec := &recordingConn{Conn: c}
	var hello *tls.ClientHelloInfo
	// The handshake always fails: we stop it once the hello is parsed, and
	// anything else is not a ClientHello. Only what was read matters.
	_ = tls.Server(rec, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			hello = h
			return nil, errHelloSeen
		},
	}).Handshake()
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		return false, nil, err
	}
	seen = rec.buf.Bytes()
	switch {
	case hello != nil:
		return slices.Contains(hello.SupportedProtos, meshtls.ALPN), seen, nil
	case len(seen) > 0:
		return false, seen, nil
	case rec.readErr != nil:
		// Nothing arrived: the client closed, reset, or is waiting for the
		// server to speak first (the caller tells these apart).
		return false, nil, rec.readErr
	}
	return false, nil, io.ErrUnexpectedEOF
}

// recordingConn keeps every byte read through it and swallows writes, so the
// probing handshake above never answers the client.
type recordingConn struct {
	net.Conn
	buf     bytes.Buffer
	readErr error
}

func (r *recordingConn) Read(p []byte) (int, error) {
	if room := maxPeek - r.buf.Len(); room <= 0 {
		return 0, errors.New("client hello larger than 64 KiB")
	} else if len(p) > room {
		p = p[:room]
	}
	n, err := r.Conn.Read(p)
	r.buf.Write(p[:n])
	if err != nil {
		r.readErr = err
	}
	return n, err
}

func (r *recordingConn) Write(p []byte) (int, error) { return len(p), nil }

// prefixConn replays the peeked bytes before reading on from the connection.
type prefixConn struct {
	*batchConn
	prefix []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		if len(p.prefix) == 0 {
			// Let the peek buffer go: the connection may stay open for days.
			p.prefix = nil
		}
		return n, nil
	}
	return p.batchConn.Read(b)
}
