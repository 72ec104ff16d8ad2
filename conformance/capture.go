package conformance

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Capture is a running tcpdump writing a pcap file.
type Capture struct {
	// Path is the pcap file.
	Path string
	proc *Process
}

// StartCapture starts tcpdump on iface inside the named network namespace, writing every packet
// matching filter (a pcap filter expression; empty means all) to dir/name.pcap, and returns once
// tcpdump is capturing. The capture is killed at cleanup if not stopped before.
func StartCapture(ctx context.Context, env Env, dir, name, netns, iface, filter string) (*Capture, error) {
	path := filepath.Join(dir, name+".pcap")
	// -U and --immediate-mode: every packet reaches the file at once, so nothing is pending when
	// the capture stops. -Z root: keep writing where root can (tcpdump drops to its own user).
	// -B: a large kernel buffer, so a multi-MiB transfer is not lost.
	argv := []string{"tcpdump", "-i", iface, "-n", "-s", "0", "-U", "--immediate-mode", "-B", "16384", "-Z", "root", "-w", path}
	if filter != "" {
		argv = append(argv, filter)
	}
	p, err := StartProcess(env, dir, name+"-tcpdump", netns, argv...)
	if err != nil {
		return nil, err
	}
	c := &Capture{Path: path, proc: p}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.Output(), "listening on") {
		if done, werr := p.Exited(); done {
			return nil, fmt.Errorf("tcpdump on %s in %s exited: %v: %s", iface, netns, werr, p.Output())
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("tcpdump on %s in %s did not start: %s", iface, netns, p.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return c, nil
}

// StartCapture captures on the node's bridge, where every packet between its pods passes.
func (n *Node) StartCapture(ctx context.Context, name, filter string) (*Capture, error) {
	return StartCapture(ctx, n.Cluster.Env, n.Dir, name, n.Netns, BridgeName, filter)
}

// Stop ends the capture and returns the pcap path.
func (c *Capture) Stop() (string, error) {
	// Packets in flight when the test's last exchange returned (final ACKs, FINs) still have to
	// cross the bridge; give them a moment before tcpdump flushes and exits.
	time.Sleep(300 * time.Millisecond)
	if err := c.proc.Stop(10 * time.Second); err != nil {
		return "", err
	}
	if _, err := os.Stat(c.Path); err != nil {
		return "", fmt.Errorf("tcpdump wrote no file: %w: %s", err, c.proc.Output())
	}
	return c.Path, nil
}

var droppedRE = regexp.MustCompile(`(\d+) packets? dropped by kernel`)

// Dropped returns how many packets the kernel dropped before tcpdump read them (after Stop).
func (c *Capture) Dropped() int {
	m := droppedRE.FindStringSubmatch(c.proc.Output())
	if m == nil {
		return 0
	}
	n, err := strconv.Atoi(m[1])
	if err != nil {
		return 0
	}
	return n
}

// StopAndRead stops the capture and parses it. It fails if the kernel dropped packets, since a
// proof about the wire needs every packet.
func (c *Capture) StopAndRead() (*Trace, error) {
	path, err := c.Stop()
	if err != nil {
		return nil, err
	}
	if d := c.Dropped(); d > 0 {
		return nil, fmt.Errorf("the capture %s lost %d packets", path, d)
	}
	return ReadTrace(path)
}
