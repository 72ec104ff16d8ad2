// Package podnet wires network namespaces to a bridge by hand for the tests of packages that run
// meshless's daemon core in-process (pkg/agent, pkg/spire): a node namespace holding a bridge, and
// dual-stack pods on veth pairs with their capture rules installed. The conformance suite covers
// the real path through the CNI plugins; this is the short one.
package podnet

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/meshless/meshless/pkg/capture"
)

// The pods' addresses; every node has its own namespace, so all nodes can use the same ranges.
var (
	Gateway4 = netip.MustParseAddr("10.77.0.1")
	Gateway6 = netip.MustParseAddr("fd77::1")
	// Mesh holds the pod ranges, as a daemon's mesh CIDRs.
	Mesh = []netip.Prefix{netip.MustParsePrefix("10.77.0.0/24"), netip.MustParsePrefix("fd77::/64")}
)

// Run runs a command and fails the test if it fails.
func Run(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// Node is a network namespace holding the bridge br0 that the pods hang off.
type Node struct {
	Name string
}

// Pod is a network namespace on the node's bridge.
type Pod struct {
	Name  string
	Netns string
	// IPs are the pod's IPv4 and IPv6 addresses, in that order.
	IPs []netip.Addr
}

// NewNode creates a node namespace named prefix plus a random suffix; it is removed at cleanup.
// Without root the test is skipped.
func NewNode(t testing.TB, prefix string) *Node {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	suffix := make([]byte, 3)
	rand.Read(suffix)
	n := &Node{Name: prefix + hex.EncodeToString(suffix)}
	Run(t, "ip", "netns", "add", n.Name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.Name).Run() })
	Run(t, "ip", "-n", n.Name, "link", "add", "br0", "type", "bridge")
	Run(t, "ip", "-n", n.Name, "addr", "add", Gateway4.String()+"/24", "dev", "br0")
	Run(t, "ip", "-n", n.Name, "addr", "add", Gateway6.String()+"/64", "dev", "br0", "nodad")
	Run(t, "ip", "-n", n.Name, "link", "set", "br0", "up")
	Run(t, "ip", "-n", n.Name, "link", "set", "lo", "up")
	return n
}

// AddPod creates pod number index (1 to 200) on the node, with the capture rules the plugin
// would install (the node's bridge addresses are exempt, as the kubelet's probes are).
func (n *Node) AddPod(t testing.TB, index int) *Pod {
	t.Helper()
	p := &Pod{
		Name: fmt.Sprintf("%s-p%d", n.Name, index),
		IPs: []netip.Addr{
			netip.MustParseAddr(fmt.Sprintf("10.77.0.%d", 10+index)),
			netip.MustParseAddr(fmt.Sprintf("fd77::%d", 10+index)),
		},
	}
	p.Netns = "/var/run/netns/" + p.Name
	host := fmt.Sprintf("veth%d", index)
	Run(t, "ip", "netns", "add", p.Name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", p.Name).Run() })
	Run(t, "ip", "-n", n.Name, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", p.Name)
	Run(t, "ip", "-n", n.Name, "link", "set", host, "master", "br0", "up")
	Run(t, "ip", "-n", p.Name, "link", "set", "lo", "up")
	Run(t, "ip", "-n", p.Name, "addr", "add", p.IPs[0].String()+"/24", "dev", "eth0")
	Run(t, "ip", "-n", p.Name, "addr", "add", p.IPs[1].String()+"/64", "dev", "eth0", "nodad")
	Run(t, "ip", "-n", p.Name, "link", "set", "eth0", "up")
	Run(t, "ip", "-n", p.Name, "route", "add", "default", "via", Gateway4.String())
	Run(t, "ip", "-n", p.Name, "-6", "route", "add", "default", "via", Gateway6.String())
	err := capture.Apply(p.Netns, capture.Config{
		Backend: capture.NFT,
		PodIPs:  p.IPs,
		NodeIPs: []netip.Addr{Gateway4, Gateway6},
	})
	if err != nil {
		t.Fatalf("capture: %v", err)
	}
	return p
}

// EchoServer listens in the pod's netns on port (both families) and answers each connection
// with "from <remote address>\n", then echoes whatever the client sends.
func EchoServer(t testing.TB, p *Pod, port int) {
	t.Helper()
	var lns []net.Listener
	err := ns.WithNetNSPath(p.Netns, func(ns.NetNS) error {
		for _, network := range []string{"tcp4", "tcp6"} {
			ln, err := net.Listen(network, fmt.Sprintf(":%d", port))
			if err != nil {
				return err
			}
			lns = append(lns, ln)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, ln := range lns {
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
					fmt.Fprintf(c, "from %s\n", host)
					io.Copy(c, c)
				}()
			}
		}()
	}
}

// Dial connects from inside the pod's netns, as the pod's app would.
func Dial(p *Pod, dst netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := ns.WithNetNSPath(p.Netns, func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp", dst.String(), 5*time.Second)
		return err
	})
	return c, err
}
