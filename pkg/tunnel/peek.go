package tunnel

import (
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

var errNotMesh = errors.New("client hello does not offer meshless's ALPN")

// serverHandshake runs the TLS server handshake of an inbound connection with cfg, a config of
// meshtls.Configs.Server, before it is known whether the connection is meshless mTLS at all: the
// server reads the client's first bytes through a helloConn, which records them and answers
// nothing until crypto/tls has parsed a ClientHello offering meshless's ALPN. The ClientHello is
// parsed once, by the handshake that goes on with it.
//
// A meshless ClientHello (mesh) has the handshake's outcome in conn and err; its first bytes must
// arrive within peekTimeout, the whole handshake within timeout. Anything else returns the bytes
// read, for the app or for a refusal, and an error only if none came: the client closed, reset,
// or is waiting for the server to speak first (os.ErrDeadlineExceeded after peekTimeout).
func serverHandshake(c net.Conn, cfg *tls.Config, peekTimeout, timeout time.Duration) (conn *tls.Conn, mesh bool, seen []byte, err error) {
	if err := c.SetReadDeadline(time.Now().Add(peekTimeout)); err != nil {
		return nil, false, nil, err
	}
	hc := &helloConn{Conn: c, probing: true}
	conn = tls.Server(hc, cfg)
	err = handshake(conn, timeout)
	if hc.mesh {
		return conn, true, nil, err
	}
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		return nil, false, nil, err
	}
	switch {
	case len(hc.rec) > 0:
		return nil, false, hc.rec, nil
	case hc.readErr != nil:
		return nil, false, nil, hc.readErr
	}
	return nil, false, nil, io.ErrUnexpectedEOF
}

// helloConn is an inbound connection as its TLS server sees it. While probing, it keeps every
// byte read and swallows writes (a failing handshake's alert included), so that a connection that
// turns out not to be meshless mTLS can be replayed to the app untouched; a ClientHello offering
// meshless's ALPN ends the probing, and the connection is the plain one from then on.
type helloConn struct {
	net.Conn
	probing bool
	// mesh tells that a ClientHello offering meshless's ALPN was seen.
	mesh    bool
	rec     []byte
	readErr error
}

func (h *helloConn) Read(p []byte) (int, error) {
	if !h.probing {
		return h.Conn.Read(p)
	}
	if room := maxPeek - len(h.rec); room <= 0 {
		return 0, errors.New("client hello larger than 64 KiB")
	} else if len(p) > room {
		p = p[:room]
	}
	n, err := h.Conn.Read(p)
	h.rec = append(h.rec, p[:n]...)
	if err != nil {
		h.readErr = err
	}
	return n, err
}

func (h *helloConn) Write(p []byte) (int, error) {
	if h.probing {
		return len(p), nil
	}
	return h.Conn.Write(p)
}

// CheckClientHello implements meshtls.ClientHelloChecker: crypto/tls calls it with the parsed
// ClientHello, before it answers anything.
func (h *helloConn) CheckClientHello(hello *tls.ClientHelloInfo) error {
	if !slices.Contains(hello.SupportedProtos, meshtls.ALPN) {
		return errNotMesh
	}
	h.mesh, h.probing, h.rec = true, false, nil
	// The handshake's own timeout applies from here on.
	return h.Conn.SetReadDeadline(time.Time{})
}

// batch returns the batchConn under h once the ClientHello was meshless's, else nil.
func (h *helloConn) batch() *batchConn {
	if bc, ok := h.Conn.(*batchConn); ok && !h.probing {
		return bc
	}
	return nil
}

// tcpConn returns the TCP connection under h, for waiting on its socket.
func (h *helloConn) tcpConn() (*net.TCPConn, bool) {
	if bc := h.batch(); bc != nil {
		return bc.TCPConn, true
	}
	return nil, false
}
