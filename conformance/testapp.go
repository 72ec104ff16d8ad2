package conformance

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/meshless/meshless/conformance/internal/testproto"
)

// ClientResult is the verdict meshless-testapp's client prints (see its package doc).
type ClientResult = testproto.Result

// ServerConn is what meshless-testapp's server logs for each connection it served.
type ServerConn = testproto.ConnLog

// Client modes and error kinds of meshless-testapp.
const (
	ModeEcho = testproto.CmdEcho // send the payload, get it back, both directions half-closed
	ModeSink = testproto.CmdSink // send the payload and half-close; the server answers count and SHA-256
	ModeSend = testproto.CmdSend // the server sends the payload
	ModePeer = testproto.CmdPeer // the server answers the address it sees the client at

	KindRefused = testproto.KindRefused
	KindReset   = testproto.KindReset
	KindTimeout = testproto.KindTimeout
	KindEOF     = testproto.KindEOF
)

// ClientOptions tune one client exchange.
type ClientOptions struct {
	Bytes   int64         // payload size; default 1024
	Marker  string        // written at the start of the payload and every 4096 bytes
	Timeout time.Duration // deadline of the whole exchange; default 60s
	// Conns > 1 runs the echo on that many connections open end to end at the same time; the
	// result then sums them (see ClientResult's Conns, Failed and OpenMS).
	Conns int
}

// StartServer starts `meshless-testapp server` in the pod on port (all addresses, both
// families) and waits until it accepts connections.
func (p *Pod) StartServer(ctx context.Context, port uint16) (*Process, error) {
	name := "server-" + strconv.Itoa(int(port))
	proc, err := p.Start(name, p.Node.Cluster.Config.Bins.TestApp, "server",
		"-listen", fmt.Sprintf(":%d", port), "-name", p.String())
	if err != nil {
		return nil, err
	}
	// Through the pod's loopback, which capture exempts: this probes the server, not meshless.
	addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := p.Dial(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			return proc, nil
		}
		if done, werr := proc.Exited(); done {
			return nil, fmt.Errorf("server in %s exited: %v: %s", p, werr, proc.Output())
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("server in %s does not accept on %s: %w", p, addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ServerConns parses what a testapp server has logged so far.
func ServerConns(server *Process) ([]ServerConn, error) {
	var out []ServerConn
	for _, line := range strings.Split(server.Output(), "\n") {
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var c ServerConn
		if err := json.Unmarshal([]byte(line), &c); err != nil {
			return out, fmt.Errorf("server log line %q: %w", line, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// Client runs one `meshless-testapp client` exchange from the pod. The error is only about
// running the client; the exchange's outcome is in the result.
func (p *Pod) Client(ctx context.Context, target netip.AddrPort, mode string, opts ClientOptions) (ClientResult, error) {
	return RunClient(ctx, p.Node.Cluster.Config.Bins, p.Netns, target, mode, opts)
}

// Client runs one exchange from the node itself, as the kubelet's probes come from it.
func (n *Node) Client(ctx context.Context, target netip.AddrPort, mode string, opts ClientOptions) (ClientResult, error) {
	return RunClient(ctx, n.Cluster.Config.Bins, n.Netns, target, mode, opts)
}

// RunClient runs one `meshless-testapp client` exchange inside the named network namespace.
func RunClient(ctx context.Context, bins *Bins, netns string, target netip.AddrPort, mode string, opts ClientOptions) (ClientResult, error) {
	if opts.Bytes == 0 {
		opts.Bytes = 1024
	}
	if opts.Timeout == 0 {
		opts.Timeout = 60 * time.Second
	}
	argv := []string{bins.TestApp, "client", "-connect", target.String(), "-mode", mode,
		"-bytes", strconv.FormatInt(opts.Bytes, 10), "-timeout", opts.Timeout.String()}
	if opts.Marker != "" {
		argv = append(argv, "-marker", opts.Marker)
	}
	if opts.Conns > 1 {
		argv = append(argv, "-conns", strconv.Itoa(opts.Conns))
	}
	// The client exits 1 when the exchange failed; its verdict is on stdout either way.
	out, runErr := Exec(ctx, netns, argv...)
	var res ClientResult
	if err := json.Unmarshal(out, &res); err != nil {
		return res, fmt.Errorf("client in %s printed no verdict: %v (run: %v)", netns, err, runErr)
	}
	return res, nil
}
