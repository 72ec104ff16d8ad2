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
	"net/http"
	"net/url"
	"os"
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
	// maxErrorBody bounds what is read of an error answer.
	maxErrorBody = 64 << 10
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
	if err := c.do(ctx, http.MethodPost, "/v1/pods", p, &e); err != nil {
		return Enrollment{}, fmt.Errorf("enroll pod %s/%s (container %s): %w", p.Namespace, p.Name, p.ContainerID, err)
	}
	return e, nil
}

// Remove asks the daemon to forget a pod; an unknown pod is not an error.
func (c *Client) Remove(ctx context.Context, containerID string) error {
	if err := c.do(ctx, http.MethodDelete, "/v1/pods/"+url.PathEscape(containerID), nil, nil); err != nil {
		return fmt.Errorf("remove container %s: %w", containerID, err)
	}
	return nil
}

// Get returns the daemon's enrollment of a pod; an unknown pod is an error wrapping ErrNotFound.
func (c *Client) Get(ctx context.Context, containerID string) (Enrollment, error) {
	var e Enrollment
	if err := c.do(ctx, http.MethodGet, "/v1/pods/"+url.PathEscape(containerID), nil, &e); err != nil {
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
	if err := c.do(ctx, http.MethodPost, "/v1/gc", GCRequest{Keep: keep}, &resp); err != nil {
		return nil, fmt.Errorf("garbage-collect pods (keeping %d): %w", len(keep), err)
	}
	return resp.Removed, nil
}

// Status returns the daemon's status. Its errors are not wrapped further: they already say
// that meshlessd, at which socket, could not answer.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	if err := c.do(ctx, http.MethodGet, "/v1/status", nil, &s); err != nil {
		return Status{}, err
	}
	return s, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	// The host part is ignored: the request goes to the socket.
	req, err := http.NewRequestWithContext(ctx, method, "http://meshlessd"+path, body)
	if err != nil {
		return fmt.Errorf("build request: %w", err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Close = true
	// net/http writes the request and reads the answer, but not through an http.Transport: it
	// would pass them between goroutines of its own (dial, read and write loops), and the plugin,
	// a process that lives for one or two calls, would start each of them. That cost about 2 ms
	// of a CNI ADD, three times the daemon's work for the call.
	timed, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	conn, err := c.dialer.DialContext(timed, "unix", c.socket)
	if err != nil {
		return c.transportError(ctx, err)
	}
	defer conn.Close()
	// Ending the context (a cancel, or the request timeout) breaks off the I/O under way.
	defer context.AfterFunc(timed, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })()
	if err := req.Write(conn); err != nil {
		return c.transportError(ctx, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return c.transportError(ctx, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return readRemoteError(resp)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("meshlessd at %s sent an answer that is not valid JSON (is the plugin the same version as the daemon?): %w", c.socket, err)
	}
	return nil
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
		return e.status == http.StatusBadRequest
	case ErrNotFound:
		return e.status == http.StatusNotFound
	case ErrNotReady:
		return e.status == http.StatusServiceUnavailable
	}
	return false
}

func readRemoteError(resp *http.Response) error {
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	if err != nil {
		return &remoteError{status: resp.StatusCode, message: fmt.Sprintf("%s (reading the answer: %v)", resp.Status, err)}
	}
	var eb errorBody
	if json.Unmarshal(raw, &eb) == nil && eb.Error != "" {
		return &remoteError{status: resp.StatusCode, message: eb.Error, api: true}
	}
	// Not one of our answers (e.g. the mux's own 404/405): show the status and the text.
	msg := resp.Status
	if text := strings.TrimSpace(string(raw)); text != "" {
		msg += ": " + text
	}
	return &remoteError{status: resp.StatusCode, message: msg}
}
