// Package testproto is the small line protocol spoken by meshless-testapp, shared by the program
// and by the conformance library that drives it: the commands a client sends, the JSON result a
// client prints, and the deterministic payload both ends generate so that a transfer can be
// checked byte for byte without shipping the expected bytes around.
package testproto

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"io"
	"net"
	"os"
	"syscall"
)

// Commands a client sends as the first line of a connection.
const (
	CmdEcho = "echo" // the server echoes every byte until EOF, then closes its write side
	CmdSink = "sink" // the server reads until EOF, then answers "<bytes> <sha256>\n"
	CmdSend = "send" // "send N [MARKER]": the server sends N payload bytes, then closes
	CmdPeer = "peer" // the server answers the remote address it sees, then closes
)

// Error kinds a client reports, so that tests can tell a refusal from a hang.
const (
	KindRefused = "refused"
	KindReset   = "reset"
	KindTimeout = "timeout"
	KindEOF     = "eof"
	KindOther   = "other"
)

// Result is what `meshless-testapp client` prints as one JSON object on stdout.
type Result struct {
	Mode           string `json:"mode"`
	Target         string `json:"target"`
	Connected      bool   `json:"connected"`
	Local          string `json:"local,omitempty"`
	Sent           int64  `json:"sent"`
	SentSHA256     string `json:"sent_sha256,omitempty"`
	Received       int64  `json:"received"`
	ReceivedSHA256 string `json:"received_sha256,omitempty"`
	// Reply is the server's answer line (peer, sink) or the body of a short reply.
	Reply string `json:"reply,omitempty"`
	// Match is true when the exchange was byte exact and ended cleanly: the echo equals what was
	// sent, the server's sink summary equals the client's, or the received payload equals the
	// pattern. It is false whenever Error is set.
	Match      bool   `json:"match"`
	Error      string `json:"error,omitempty"`
	ErrorKind  string `json:"error_kind,omitempty"`
	DurationMS int64  `json:"duration_ms"`
	// A concurrent run (client -conns N) sets Conns to N, Failed to the number of exchanges that
	// failed, and OpenMS to the time until all N connections were open end to end; Sent and
	// Received are then sums, Error describes the first failure, and the digests are left out.
	Conns  int   `json:"conns,omitempty"`
	Failed int   `json:"failed,omitempty"`
	OpenMS int64 `json:"open_ms,omitempty"`
}

// ConnLog is what `meshless-testapp server` prints on stdout for every connection it served.
type ConnLog struct {
	Peer     string `json:"peer"`
	Local    string `json:"local"`
	Cmd      string `json:"cmd"`
	Received int64  `json:"received"`
	Sent     int64  `json:"sent"`
	Error    string `json:"error,omitempty"`
}

// MarkerEvery is the spacing of marker copies in a payload: a marker at every boundary means
// that any capture of a stretch of plaintext longer than this would contain it.
const MarkerEvery = 4096

// Payload is an io.Reader of n deterministic pseudo-random bytes (incompressible, so the wire
// cannot hide it) with marker written at offset 0 and at every MarkerEvery bytes.
type Payload struct {
	n, off int64
	state  uint64
	marker []byte
}

// NewPayload returns the payload of n bytes carrying marker (which may be empty).
func NewPayload(n int64, marker string) *Payload {
	m := []byte(marker)
	if len(m) > MarkerEvery {
		m = m[:MarkerEvery]
	}
	return &Payload{n: n, state: 0x9e3779b97f4a7c15, marker: m}
}

// Read fills p with the next payload bytes.
func (p *Payload) Read(b []byte) (int, error) {
	if p.off >= p.n {
		return 0, io.EOF
	}
	if rem := p.n - p.off; int64(len(b)) > rem {
		b = b[:rem]
	}
	for i := range b {
		// xorshift64: cheap, deterministic, and far from compressible.
		p.state ^= p.state << 13
		p.state ^= p.state >> 7
		p.state ^= p.state << 17
		pos := (p.off + int64(i)) % MarkerEvery
		if pos < int64(len(p.marker)) {
			b[i] = p.marker[pos]
		} else {
			b[i] = byte(p.state >> 32)
		}
	}
	p.off += int64(len(b))
	return len(b), nil
}

// Digest counts and hashes the bytes written to it.
type Digest struct {
	N int64
	h hash.Hash
}

// NewDigest returns an empty Digest.
func NewDigest() *Digest { return &Digest{h: sha256.New()} }

// Write adds b to the digest.
func (d *Digest) Write(b []byte) (int, error) {
	d.N += int64(len(b))
	return d.h.Write(b)
}

// Sum returns the hex SHA-256 of everything written so far.
func (d *Digest) Sum() string { return hex.EncodeToString(d.h.Sum(nil)) }

// PayloadSHA256 returns the hex SHA-256 of NewPayload(n, marker).
func PayloadSHA256(n int64, marker string) string {
	d := NewDigest()
	if _, err := io.Copy(d, NewPayload(n, marker)); err != nil {
		// Copying from a Payload into a Digest cannot fail.
		return ""
	}
	return d.Sum()
}

// Kind classifies a network error for Result.ErrorKind.
func Kind(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return ""
	case errors.Is(err, syscall.ECONNREFUSED):
		return KindRefused
	// ENOTCONN: shutdown(2) on a socket that a reset already closed.
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ENOTCONN):
		return KindReset
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return KindTimeout
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return KindEOF
	default:
		return KindOther
	}
}
