package spire

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// The source needs two server-streaming calls of the agent's admin socket, so it speaks gRPC over
// HTTP/2 itself (net/http's cleartext HTTP/2 with prior knowledge, which gRPC servers accept)
// instead of linking grpc-go: that library and its dependencies, initialised in every daemon at
// start-up whether SPIRE is used or not, were a quarter of the daemon's resident memory. Retries
// and backoff are the source's own (follow); a lost connection is dialled again by the next
// call.

// Methods of spire.api.agent.delegatedidentity.v1.DelegatedIdentity.
const (
	methodSubscribeToX509SVIDs   = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509SVIDs"
	methodSubscribeToX509Bundles = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509Bundles"
)

// maxMessage bounds a received message, as grpc-go's default receive limit does.
const maxMessage = 4 << 20

// dialTimeout bounds the connection to the admin socket.
const dialTimeout = 2 * time.Second

// grpcCode is a gRPC status code (google.golang.org/grpc/codes).
type grpcCode uint32

const (
	codeOK                grpcCode = 0
	codeUnknown           grpcCode = 2
	codePermissionDenied  grpcCode = 7
	codeResourceExhausted grpcCode = 8
	codeUnimplemented     grpcCode = 12
	codeInternal          grpcCode = 13
	codeUnavailable       grpcCode = 14
	codeUnauthenticated   grpcCode = 16
)

var codeNames = [...]string{
	"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
	"PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
	"Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
}

func (c grpcCode) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return "Code(" + strconv.FormatUint(uint64(c), 10) + ")"
}

// rpcError is a call's failure, worded as grpc-go words its status errors, which operators and
// SPIRE's own documentation know.
type rpcError struct {
	code grpcCode
	desc string
}

func (e *rpcError) Error() string {
	return fmt.Sprintf("rpc error: code = %s desc = %s", e.code, e.desc)
}

// agentClient calls the Delegated Identity API on the agent's admin socket.
type agentClient struct {
	hc *http.Client
}

func newAgentClient(socket string) *agentClient {
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	dialer := &net.Dialer{Timeout: dialTimeout}
	return &agentClient{hc: &http.Client{Transport: &http.Transport{
		Protocols: &protocols,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", socket)
		},
		// gRPC compresses only what the client accepts; nothing to decompress.
		DisableCompression: true,
	}}}
}

// close drops the idle connection to the agent; streams end with their contexts.
func (c *agentClient) close() { c.hc.CloseIdleConnections() }

// serverStream is the response of a server-streaming call.
type serverStream struct {
	resp *http.Response
	// prefix is a received message's header: compressed flag and length.
	prefix [5]byte
}

// subscribe starts the server-streaming call method with the encoded request req. The stream
// lasts until ctx ends or the agent ends it.
func (c *agentClient) subscribe(ctx context.Context, method string, req []byte) (*serverStream, error) {
	body := make([]byte, 5, 5+len(req))
	binary.BigEndian.PutUint32(body[1:], uint32(len(req)))
	body = append(body, req...)
	// The host is a name for the :authority header; the transport dials the socket.
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://localhost"+method, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	hr.Header.Set("Content-Type", "application/grpc")
	hr.Header.Set("Te", "trailers")
	resp, err := c.hc.Do(hr)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, &rpcError{code: codeUnavailable, desc: "connection error: " + err.Error()}
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, &rpcError{code: httpStatusCode(resp.StatusCode), desc: "unexpected HTTP status " + resp.Status}
	}
	return &serverStream{resp: resp}, nil
}

// recv returns the next message. At the end of the stream it returns io.EOF if the agent ended
// the call with OK, and the call's status otherwise.
func (s *serverStream) recv() ([]byte, error) {
	if _, err := io.ReadFull(s.resp.Body, s.prefix[:]); err != nil {
		if err == io.EOF {
			return nil, s.status()
		}
		return nil, &rpcError{code: codeUnavailable, desc: "error reading from the agent: " + err.Error()}
	}
	if s.prefix[0] != 0 {
		return nil, &rpcError{code: codeInternal, desc: "compressed message, which was not asked for"}
	}
	n := binary.BigEndian.Uint32(s.prefix[1:])
	if n > maxMessage {
		return nil, &rpcError{code: codeResourceExhausted, desc: fmt.Sprintf("received message larger than max (%d vs. %d)", n, maxMessage)}
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(s.resp.Body, msg); err != nil {
		return nil, &rpcError{code: codeUnavailable, desc: "error reading from the agent: " + err.Error()}
	}
	return msg, nil
}

// status is how the agent ended the call: grpc-status in the trailers, or in the headers of a
// response without messages ("trailers-only").
func (s *serverStream) status() error {
	h := s.resp.Trailer
	if h.Get("Grpc-Status") == "" {
		h = s.resp.Header
	}
	raw := h.Get("Grpc-Status")
	if raw == "" {
		return &rpcError{code: codeInternal, desc: "server closed the stream without sending trailers"}
	}
	code, err := strconv.ParseUint(raw, 10, 32)
	if err != nil {
		return &rpcError{code: codeInternal, desc: fmt.Sprintf("malformed grpc-status %q", raw)}
	}
	if grpcCode(code) == codeOK {
		return io.EOF
	}
	desc := h.Get("Grpc-Message")
	if d, err := url.PathUnescape(desc); err == nil {
		desc = d
	}
	return &rpcError{code: grpcCode(code), desc: desc}
}

// close ends the call.
func (s *serverStream) close() { s.resp.Body.Close() }

// httpStatusCode maps an HTTP status other than 200 to a gRPC code, as gRPC's HTTP/2 transport
// specification does.
func httpStatusCode(status int) grpcCode {
	switch status {
	case http.StatusBadRequest:
		return codeInternal
	case http.StatusUnauthorized:
		return codeUnauthenticated
	case http.StatusForbidden:
		return codePermissionDenied
	case http.StatusNotFound:
		return codeUnimplemented
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return codeUnavailable
	}
	return codeUnknown
}
