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
	// maxAnswer bounds an answer: far more than any (the largest requests are bounded by
	// MaxBodyBytes, and answers repeat at most what they carry).
	maxAnswer = 8 << 20
	// maxErrorText bounds what an error shows of an answer that is not one of ours.
	maxErrorText = 4 << 10
)

// The HTTP statuses of the API's errors (see pkg/enrollhttp).
const (
	statusBadRequest         = 400
	statusNotFound           = 404
	statusServiceUnavailable = 503
)

// Client calls meshlessd's enrollment API over its unix socket; its methods mirror Service.
// Each call is one request on a connection of its own, sent and answered in the calling
// goroutine (see do).
type Client struct {
	socket string
	dialer net.Dialer
}

// NewClient returns a Client for the daemon listening at socketPath.
func NewClient(socketPath string) *Client {
	return &Client{socket: socketPath, dialer: net.Dialer{Timeout: dialTimeout}}
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

// do sends one request on a connection of its own and decodes the answer into out. It speaks
// HTTP/1.0 to the daemon's net/http server, which then neither keeps the connection nor chunks
// the answer: the answer is its status line and header, read with net/textproto, and a body
// that ends with the connection. The plugin, a process that lives for one or two calls, does not
// link net/http for this: net/http, and the crypto/tls it brings, made each plugin process start
// about 0.4 ms slower (package initialisation and page faults), in every pod's CNI ADD.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var req bytes.Buffer
	fmt.Fprintf(&req, "%s %s HTTP/1.0\r\nHost: meshlessd\r\n", method, path)
	if in != nil {
		body, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		fmt.Fprintf(&req, "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n", len(body))
		req.Write(body)
	} else {
		req.WriteString("\r\n")
	}
	timed, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	conn, err := c.dialer.DialContext(timed, "unix", c.socket)
	if err != nil {
		return c.transportError(ctx, err)
	}
	defer conn.Close()
	// Ending the context (a cancel, or the request timeout) breaks off the I/O under way.
	defer context.AfterFunc(timed, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })()
	if _, err := conn.Write(req.Bytes()); err != nil {
		return c.transportError(ctx, err)
	}
	a, err := readAnswer(conn)
	if err != nil {
		return c.transportError(ctx, err)
	}
	if a.code < 200 || a.code > 299 {
		return a.remoteError()
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(a.body, out); err != nil {
		return fmt.Errorf("meshlessd at %s sent an answer that is not valid JSON (is the plugin the same version as the daemon?): %w", c.socket, err)
	}
	return nil
}

// answer is an HTTP answer of the daemon.
type answer struct {
	code   int
	status string // the status line's code and text, e.g. "404 Not Found"
	body   []byte
}

// readAnswer reads an HTTP/1.x answer whose body ends with the connection.
func readAnswer(r io.Reader) (answer, error) {
	tp := textproto.NewReader(bufio.NewReader(r))
	line, err := tp.ReadLine()
	if err != nil {
		return answer{}, fmt.Errorf("read the answer's status line: %w", err)
	}
	proto, status, _ := strings.Cut(line, " ")
	code, _, _ := strings.Cut(status, " ")
	n, err := strconv.Atoi(code)
	if !strings.HasPrefix(proto, "HTTP/1.") || len(code) != 3 || err != nil {
		return answer{}, fmt.Errorf("malformed status line %q", line)
	}
	if _, err := tp.ReadMIMEHeader(); err != nil {
		return answer{}, fmt.Errorf("read the answer's header: %w", err)
	}
	body, err := io.ReadAll(io.LimitReader(tp.R, maxAnswer+1))
	if err != nil {
		return answer{}, fmt.Errorf("read the answer: %w", err)
	}
	if len(body) > maxAnswer {
		return answer{}, fmt.Errorf("answer larger than %d bytes", maxAnswer)
	}
	return answer{code: n, status: status, body: body}, nil
}

// transportError turns a failed round trip into an error that says what to check.
func (c *Client) transportError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("call to meshlessd at %s abandoned: %w", c.socket, ctx.Err())
	}
	// Prefer the bare network error ("dial unix ...: connect: ...") over the URL wrapper.
	cause := err
	if oe := (*net.OpError)(nil); errors.As(err, &oe) {
		cause = oe
	}
	var hint string
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) || isTimeout(err):
		return fmt.Errorf("%w: meshlessd at %s did not answer within %s (is it overloaded or stuck? see its logs on this node): %w",
			ErrUnreachable, c.socket, requestTimeout, cause)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		hint = "the socket is root-only: meshless-cni must run as root"
	default:
		hint = "is the meshless DaemonSet running on this node?"
	}
	return fmt.Errorf("%w at %s (%s): %w", ErrUnreachable, c.socket, hint, cause)
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
		return e.status == statusBadRequest
	case ErrNotFound:
		return e.status == statusNotFound
	case ErrNotReady:
		return e.status == statusServiceUnavailable
	}
	return false
}

// remoteError turns an error answer into a *remoteError.
func (a answer) remoteError() error {
	var eb ErrorBody
	if json.Unmarshal(a.body, &eb) == nil && eb.Error != "" {
		return &remoteError{status: a.code, message: eb.Error, api: true}
	}
	// Not one of our answers (e.g. the mux's own 404/405): show the status and the text.
	msg := a.status
	if text := strings.TrimSpace(string(a.body[:min(len(a.body), maxErrorText)])); text != "" {
		msg += ": " + text
	}
	return &remoteError{status: a.code, message: msg}
}
