package conformance

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"time"
)

// Interface returns the external host's only interface, on the underlay: everything it sends or
// receives crosses it.
func (e *External) Interface() string { return underlayIface }

// StartCapture captures on the external host's interface, so a test sees exactly what reached it.
func (e *External) StartCapture(ctx context.Context, name, filter string) (*Capture, error) {
	return StartCapture(ctx, e.Cluster.Env, e.Cluster.Dir, e.Netns+"-"+name, e.Netns, e.Interface(), filter)
}

// StartServer starts `meshless-testapp server` on the external host on port (all addresses)
// and waits until it accepts connections: a destination outside every mesh CIDR.
func (e *External) StartServer(ctx context.Context, port uint16) (*Process, error) {
	name := e.Netns + "-server-" + strconv.Itoa(int(port))
	proc, err := StartProcess(e.Cluster.Env, e.Cluster.Dir, name, e.Netns, e.Cluster.Config.Bins.TestApp, "server",
		"-listen", fmt.Sprintf(":%d", port), "-name", e.Netns)
	if err != nil {
		return nil, err
	}
	addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := DialIn(ctx, e.NetnsPath(), "tcp", addr)
		if err == nil {
			c.Close()
			return proc, nil
		}
		if done, werr := proc.Exited(); done {
			return nil, fmt.Errorf("server on %s exited: %v: %s", e.Netns, werr, proc.Output())
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("server on %s does not accept on %s: %w", e.Netns, addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Client runs one `meshless-testapp client` exchange from the external host: a client outside
// the cluster.
func (e *External) Client(ctx context.Context, target netip.AddrPort, mode string, opts ClientOptions) (ClientResult, error) {
	return RunClient(ctx, e.Cluster.Config.Bins, e.Netns, target, mode, opts)
}
