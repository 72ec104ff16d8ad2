package enroll

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrUnreachable reports that meshlessd could not be reached or did not answer in time.
var ErrUnreachable = errors.New("meshlessd not reachable")

const (
	// The daemon is local: a dial that takes longer than this will not succeed.
	dialTimeout = 2 * time.Second
	// Enrolling opens listeners inside the pod netns and may mint an SVID; both are quick.
	requestTimeout = 10 * time.Second
	// maxAnswer bounds what is read of an answer: a GC answer naming a few thousand
	// container IDs is well under 1 MiB.
	maxAnswer = 4 << 20
)

// Client calls meshlessd's enrollment API over its unix socket; its methods mirror Service.
// It speaks the small part of HTTP/1.1 that the API uses itself, one request per connection:
// net/http would double the size of meshless-cni, a program started once per pod whose start-up
// every pod's CNI ADD waits for.
type Client struct {
	socket string
}

// NewClient returns a Client for the daemon listening at socketPath.
func NewClient(socketPath string) *Client {
	return &Client{socket: socketPath}
}

// Socket returns the path of the daemon's socket.
func (c *Client) Socket() string { return c.socket }

// Enroll asks the daemon to serve p.
func (c *Client) Enroll(ctx context.Context, p Pod) (Enrollment, error) {
	var e Enrollment
	if err := c.do(ctx, "POST", "/v1/pods", p, &e); err != nil {
		return Enrollment{}, fmt.Errorf("enroll pod %s/%s (container %s): %w", p.Namespace, p.Name, p.ContainerID, err)
	}
	return e, nil
}

// Remove asks the daemon to forget a pod; an unknown pod is not an error.
func (c *Client) Remove(ctx context.Context, containerID string) error {
	if err := c.do(ctx, "DELETE", "/v1/pods/"+url.PathEscape(containerID), nil, nil); err != nil {
		return fmt.Errorf("remove container %s: %w", containerID, err)
	}
	return nil
}

// Get returns the daemon's enrollment of a pod; an unknown pod is an error wrapping ErrNotFound.
func (c *Client) Get(ctx context.Context, containerID string) (Enrollment, error) {
	var e Enrollment
	if err := c.do(ctx, "GET", "/v1/pods/"+url.PathEscape(containerID), nil, &e); err != nil {
		return Enrollment{}, fmt.Errorf("look up container %s: %w", containerID, err)
	}
	return e, nil
}

// GC asks the daemon to forget every pod not in keep, and returns the container IDs it forgot.
func (c *Client) GC(ctx context.Context, keep []string) ([]string, error) {
	if keep == nil {
		keep = []string{} // nil would be refused: the daemon requires an explicit list
	}
	var resp GCResponse
	if err := c.do(ctx, "POST", "/v1/gc", GCRequest{Keep: keep}, &resp); err != nil {
		return nil, fmt.Errorf("garbage-collect pods (keeping %d): %w", len(keep), err)
	}
	return resp.Removed, nil
}

// Status returns the daemon's status. Its errors are not wrapped further: they already say
// that meshlessd, at which socket, could not answer.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	if err := c.do(ctx, "GET", "/v1/status", nil, &s); err != nil {
		return Status{}, err
	}
	return s, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	conn, err := (&net.Dialer{Timeout: dialTimeout}).DialContext(rctx, "unix", c.socket)
	if err != nil {
		return c.transportError(ctx, err)
	}
	defer conn.Close()
	// The deadline bounds the whole exchange; a cancelled ctx ends it at once.
	deadline, _ := rctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return c.transportError(ctx, err)
	}
	stop := context.AfterFunc(rctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	status, reason, answer, err := exchange(conn, method, path, body)
	if err != nil {
		return c.transportError(ctx, err)
	}
	if status < 200 || status > 299 {
		return newRemoteError(status, reason, answer)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(answer, out); err != nil {
		return fmt.Errorf("meshlessd at %s sent an answer that is not valid JSON (is the plugin the same version as the daemon?): %w", c.socket, err)
	}
	return nil
}

// errMalformed reports an answer that is not HTTP/1.1 as the API speaks it.
var errMalformed = errors.New("malformed HTTP answer")

// exchange sends one request on conn and reads the answer: its status code, its reason phrase
// and its body.
func exchange(conn net.Conn, method, path string, body []byte) (status int, reason string, answer []byte, err error) {
	var req bytes.Buffer
	// The host is ignored: the connection is to the socket. Closing after one exchange keeps
	// the framing simple: the answer ends where the daemon closes, if nowhere earlier.
	fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: meshlessd\r\nConnection: close\r\n", method, path)
	if body != nil {
		fmt.Fprintf(&req, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	}
	req.WriteString("\r\n")
	req.Write(body)
	if _, err := conn.Write(req.Bytes()); err != nil {
		return 0, "", nil, err
	}
	return readAnswer(bufio.NewReader(conn))
}

// readAnswer reads an HTTP/1.1 response whose body is framed by Content-Length, by chunked
// transfer coding (what Go's server uses for a long answer), or by the end of the connection.
func readAnswer(r *bufio.Reader) (status int, reason string, body []byte, err error) {
	tp := textproto.NewReader(r)
	line, err := tp.ReadLine()
	if err != nil {
		return 0, "", nil, err
	}
	proto, rest, _ := strings.Cut(line, " ")
	code, reason, _ := strings.Cut(rest, " ")
	status, err = strconv.Atoi(code)
	if !strings.HasPrefix(proto, "HTTP/1.") || len(code) != 3 || err != nil {
		return 0, "", nil, fmt.Errorf("%w: status line %q", errMalformed, line)
	}
	header, err := tp.ReadMIMEHeader()
	if err != nil {
		return 0, "", nil, fmt.Errorf("%w: header: %w", errMalformed, err)
	}
	switch {
	case strings.EqualFold(header.Get("Transfer-Encoding"), "chunked"):
		body, err = readChunked(tp)
	case header.Get("Content-Length") != "":
		n, perr := strconv.ParseInt(header.Get("Content-Length"), 10, 64)
		if perr != nil || n < 0 || n > maxAnswer {
			return 0, "", nil, fmt.Errorf("%w: Content-Length %q", errMalformed, header.Get("Content-Length"))
		}
		body = make([]byte, n)
		_, err = io.ReadFull(r, body)
	default:
		body, err = io.ReadAll(io.LimitReader(r, maxAnswer+1))
		if err == nil && len(body) > maxAnswer {
			err = fmt.Errorf("%w: answer longer than %d bytes", errMalformed, maxAnswer)
		}
	}
	if err != nil {
		return 0, "", nil, err
	}
	return status, reason, body, nil
}

// readChunked reads a body in chunked transfer coding (RFC 9112, section 7.1).
func readChunked(tp *textproto.Reader) ([]byte, error) {
	var body []byte
	for {
		line, err := tp.ReadLine()
		if err != nil {
			return nil, err
		}
		sizeText, _, _ := strings.Cut(line, ";") // chunk extensions are ignored
		size, err := strconv.ParseInt(strings.TrimSpace(sizeText), 16, 64)
		if err != nil || size < 0 || size > maxAnswer-int64(len(body)) {
			return nil, fmt.Errorf("%w: chunk size %q", errMalformed, line)
		}
		if size == 0 {
			// Trailer fields, if any, up to the empty line.
			if _, err := tp.ReadMIMEHeader(); err != nil {
				return nil, fmt.Errorf("%w: trailer: %w", errMalformed, err)
			}
			return body, nil
		}
		chunk := make([]byte, size)
		if _, err := io.ReadFull(tp.R, chunk); err != nil {
			return nil, err
		}
		body = append(body, chunk...)
		if end, err := tp.ReadLine(); err != nil || end != "" {
			return nil, fmt.Errorf("%w: chunk not followed by CRLF", errMalformed)
		}
	}
}

// transportError turns a failed round trip into an error that says what to check.
func (c *Client) transportError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("call to meshlessd at %s abandoned: %w", c.socket, ctx.Err())
	}
	if errors.Is(err, errMalformed) {
		return fmt.Errorf("meshlessd at %s sent an answer the plugin cannot read (is the plugin the same version as the daemon?): %w", c.socket, err)
	}
	var hint string
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) || isTimeout(err):
		return fmt.Errorf("%w: meshlessd at %s did not answer within %s (is it overloaded or stuck? see its logs on this node): %w",
			ErrUnreachable, c.socket, requestTimeout, err)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		hint = "the socket is root-only: meshless-cni must run as root"
	default:
		hint = "is the meshless DaemonSet running on this node?"
	}
	return fmt.Errorf("%w at %s (%s): %w", ErrUnreachable, c.socket, hint, err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// remoteError is an error answer from the daemon; errors.Is matches an API error (a JSON body)
// with ErrInvalid (400), ErrNotFound (404) and ErrNotReady (503). A bare 404 from an unknown route
// is not ErrNotFound.
type remoteError struct {
	status  int
	message string
	api     bool
}

func (e *remoteError) Error() string {
	if e.status >= 500 {
		return "meshlessd failed: " + e.message
	}
	return "meshlessd refused the request: " + e.message
}

func (e *remoteError) Is(target error) bool {
	if !e.api {
		return false
	}
	switch target {
	case ErrInvalid:
		return e.status == 400
	case ErrNotFound:
		return e.status == 404
	case ErrNotReady:
		return e.status == 503
	}
	return false
}

// newRemoteError makes the error of an answer with a status outside 2xx.
func newRemoteError(status int, reason string, body []byte) error {
	var eb ErrorBody
	if json.Unmarshal(body, &eb) == nil && eb.Error != "" {
		return &remoteError{status: status, message: eb.Error, api: true}
	}
	// Not one of our answers (e.g. the mux's own 404/405): show the status and the text.
	msg := strconv.Itoa(status) + " " + reason
	if text := strings.TrimSpace(string(body)); text != "" {
		msg += ": " + text
	}
	return &remoteError{status: status, message: msg}
}
