package harness

import (
	"context"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/meshless/meshless/conformance"
)

// DaemonResult is what meshless costs by itself, on a node of its own: meshlessd's resident
// memory and the time of CNI ADD with and without meshless-cni in the chain.
type DaemonResult struct {
	// RSSStartKiB is a freshly started daemon's VmRSS; RSSIdleKiB with Pods pods enrolled and no
	// connection; RSSConnsKiB with Conns proxied connections open between two of them.
	RSSStartKiB, RSSIdleKiB, RSSConnsKiB float64
	Pods, Conns                          int
	// AddMesh and AddPlain are the CNI ADD times of the pods with and without meshless-cni,
	// added alternately so that both see the same bridge and the same machine load.
	AddMesh, AddPlain []time.Duration
}

// settle is how long the daemon is left alone before its memory is read.
const settle = 2 * time.Second

// MeasureDaemon adds a node with a fresh meshlessd to the cluster, enrolls pods mesh pods (and as
// many plain pods, for the CNI ADD comparison), then opens conns connections from the first mesh
// pod to an echo server in the last, through meshless at both ends. Both ends are on this node,
// so each connection is proxied twice by the one daemon (outbound and inbound). The connections
// are closed before it returns; the pods stay until cleanup.
func MeasureDaemon(ctx context.Context, cluster *conformance.Cluster, pods, conns int, logf func(string, ...any)) (DaemonResult, error) {
	res := DaemonResult{Pods: pods, Conns: conns}
	if pods < 2 || pods > 120 {
		return res, fmt.Errorf("pods = %d: want 2 to 120 (mesh and plain pods share one /24)", pods)
	}
	node, err := cluster.AddNode(ctx, NodeConfig())
	if err != nil {
		return res, err
	}
	pid := node.Daemon().Pid()
	time.Sleep(settle)
	if res.RSSStartKiB, err = conformance.StatusKiB(pid, "VmRSS"); err != nil {
		return res, err
	}
	var mesh []*conformance.Pod
	start := time.Now()
	for i := range pods {
		p, err := node.AddPod(ctx, conformance.PodConfig{Namespace: "scale", Name: fmt.Sprintf("mesh-%03d", i)})
		if err != nil {
			return res, err
		}
		mesh = append(mesh, p)
		res.AddMesh = append(res.AddMesh, p.AddTime)
		q, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: "scale", Name: fmt.Sprintf("plain-%03d", i)})
		if err != nil {
			return res, err
		}
		res.AddPlain = append(res.AddPlain, q.AddTime)
	}
	logf("daemon: %d mesh and %d plain pods added in %s", pods, pods, time.Since(start).Round(time.Millisecond))
	time.Sleep(settle)
	if res.RSSIdleKiB, err = conformance.StatusKiB(pid, "VmRSS"); err != nil {
		return res, err
	}

	client, server := mesh[0], mesh[len(mesh)-1]
	if _, err := server.StartServer(ctx, EchoPort); err != nil {
		return res, err
	}
	target := fmt.Sprintf("%s:%d", server.IPv4(), EchoPort)
	open := make([]net.Conn, 0, conns)
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	start = time.Now()
	for i := range conns {
		c, err := openEcho(ctx, client, target)
		if err != nil {
			return res, fmt.Errorf("connection %d of %d: %w", i+1, conns, err)
		}
		open = append(open, c)
	}
	logf("daemon: %d connections opened in %s", conns, time.Since(start).Round(time.Millisecond))
	time.Sleep(settle)
	if res.RSSConnsKiB, err = conformance.StatusKiB(pid, "VmRSS"); err != nil {
		return res, err
	}
	// The connections must still be alive when their memory was read.
	for i, c := range []net.Conn{open[0], open[len(open)-1]} {
		if err := echoByte(c); err != nil {
			return res, fmt.Errorf("open connection %d after the measurement: %w", i, err)
		}
	}
	return res, nil
}

// openEcho opens an echo connection and passes one byte through it, so the connection is
// established end to end (both of the daemon's legs, and the mTLS handshake between them).
func openEcho(ctx context.Context, pod *conformance.Pod, target string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := pod.Dial(ctx, "tcp", target)
	if err != nil {
		return nil, err
	}
	if _, err := io.WriteString(c, conformance.ModeEcho+"\n"); err != nil {
		c.Close()
		return nil, err
	}
	if err := echoByte(c); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func echoByte(c net.Conn) error {
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	if _, err := c.Write([]byte{'x'}); err != nil {
		return err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return err
	}
	if b[0] != 'x' {
		return fmt.Errorf("echoed %q, want %q", b[0], 'x')
	}
	return c.SetDeadline(time.Time{})
}
