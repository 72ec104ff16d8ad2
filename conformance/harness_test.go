package conformance_test

// Tests of the harness itself, independent of meshless: plain pods wired by the reference
// plugins talk, captures see what crosses the bridge, and cleanup leaves nothing behind.

import (
	"bytes"
	"context"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

func harnessCluster(t *testing.T, ipv6 bool) *conformance.Cluster {
	t.Helper()
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins:       harnessBinaries(t),
		IPv6:       ipv6,
		NodePrefix: "mlhnode-",
		PodPrefix:  "mlhpod-",
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestHarnessPlainPods(t *testing.T) {
	needRoot(t)
	var created []string
	var dir string
	var procs []*conformance.Process
	t.Run("traffic", func(t *testing.T) {
		ctx := testCtx(t)
		c := harnessCluster(t, false)
		dir = c.Dir
		node, err := c.AddNode(ctx, conformance.NodeConfig{NoDaemon: true})
		if err != nil {
			t.Fatal(err)
		}
		client, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: "harness", Name: "client"})
		if err != nil {
			t.Fatal(err)
		}
		server, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: "harness", Name: "server"})
		if err != nil {
			t.Fatal(err)
		}
		created = append(created, node.Netns, client.Netns, server.Netns)
		if !node.PodCIDR.Contains(client.IPv4()) || !node.PodCIDR.Contains(server.IPv4()) || client.IPv4() == server.IPv4() {
			t.Fatalf("pod addresses %v and %v are not distinct addresses of %s", client.IPs(), server.IPs(), node.PodCIDR)
		}
		if err := client.Check(ctx); err != nil {
			t.Errorf("CHECK of a plain pod: %v", err)
		}
		srv, err := server.StartServer(ctx, 8080)
		if err != nil {
			t.Fatal(err)
		}
		procs = append(procs, srv)
		target := netip.AddrPortFrom(server.IPv4(), 8080)

		capture, err := node.StartCapture(ctx, "plain", "tcp port 8080")
		if err != nil {
			t.Fatal(err)
		}
		const marker = "HARNESS-MARKER-7f3a"
		res, err := client.Client(ctx, target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 256 << 10, Marker: marker})
		if err != nil {
			t.Fatal(err)
		}
		if !res.Match || res.Error != "" {
			t.Fatalf("echo between plain pods: %+v", res)
		}
		peer, err := client.Client(ctx, target, conformance.ModePeer, conformance.ClientOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if ap, err := netip.ParseAddrPort(peer.Reply); err != nil || ap.Addr() != client.IPv4() {
			t.Errorf("server saw %q, want the client pod's address %s", peer.Reply, client.IPv4())
		}
		trace, err := capture.StopAndRead()
		if err != nil {
			t.Fatal(err)
		}

		// The capture must have teeth: plaintext is visible and is not mistaken for TLS.
		flows := conformance.WithPayload(trace.Between(client.IPv4(), server.IPv4()))
		if len(flows) < 2 {
			t.Fatalf("capture on the bridge holds %d payload flows between the pods, want the echo and the peer exchange both ways", len(flows))
		}
		if len(trace.FlowsWithClear([]byte(marker))) == 0 {
			t.Error("the marker sent in clear is not found in the capture")
		}
		var upstream *conformance.Flow
		for _, f := range flows {
			if f.Dst == target && bytes.HasPrefix(f.Data, []byte("echo\n")) {
				upstream = f
			}
		}
		if upstream == nil {
			t.Fatal("no client->server flow starting with the echo command")
		}
		if int64(len(upstream.Data)) != res.Sent+int64(len("echo\n")) || upstream.Missing != 0 {
			t.Errorf("reassembled %d bytes (%d missing), the client sent %d", len(upstream.Data), upstream.Missing, res.Sent+5)
		}
		if !upstream.SYN || !upstream.FIN {
			t.Errorf("flow %s: SYN %v FIN %v, want both seen", upstream, upstream.SYN, upstream.FIN)
		}
		if _, err := upstream.CheckTLS(); err == nil {
			t.Error("CheckTLS accepted a plaintext stream")
		}

		// A probe from the node itself (curl, as a kubelet HTTP probe would).
		out, err := node.Exec(ctx, "curl", "-sS", "--max-time", "10", "http://"+target.String()+"/healthz")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(out), "peer="+node.Gateway.String()+":") {
			t.Errorf("node probe answer %q does not show the node's bridge address %s", out, node.Gateway)
		}

		// DEL is idempotent in the reference plugins too; the harness copes with a deleted pod.
		for range 2 {
			if err := client.Del(ctx); err != nil {
				t.Errorf("DEL: %v", err)
			}
		}
	})
	if t.Failed() {
		return
	}
	for _, name := range created {
		if _, err := os.Stat(conformance.NetnsPath(name)); err == nil {
			t.Errorf("network namespace %s is left after cleanup", name)
		}
	}
	for _, prefix := range []string{"mlhnode-", "mlhpod-"} {
		left, err := conformance.ListNetns(prefix)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range left {
			if slices.Contains(created, name) {
				t.Errorf("network namespace %s is left after cleanup", name)
			}
		}
	}
	for _, p := range procs {
		if done, _ := p.Exited(); !done {
			t.Errorf("process %s (pid %d) still runs after cleanup", p.Name, p.Pid())
		}
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("cluster dir %s is left after cleanup (%v)", dir, err)
	}
}

func TestHarnessDualStack(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c := harnessCluster(t, true)
	node, err := c.AddNode(ctx, conformance.NodeConfig{NoDaemon: true})
	if err != nil {
		t.Fatal(err)
	}
	a, err := node.AddPlainPod(ctx, conformance.PodConfig{Name: "a"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := node.AddPlainPod(ctx, conformance.PodConfig{Name: "b"})
	if err != nil {
		t.Fatal(err)
	}
	if !a.IPv6().IsValid() || !node.PodCIDR6.Contains(a.IPv6()) {
		t.Fatalf("pod a has addresses %v, want one in %s", a.IPs(), node.PodCIDR6)
	}
	if _, err := b.StartServer(ctx, 9090); err != nil {
		t.Fatal(err)
	}
	for _, target := range []netip.AddrPort{netip.AddrPortFrom(b.IPv4(), 9090), netip.AddrPortFrom(b.IPv6(), 9090)} {
		res, err := a.Client(ctx, target, conformance.ModePeer, conformance.ClientOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ap, perr := netip.ParseAddrPort(res.Reply)
		want := a.IPv4()
		if target.Addr().Is6() {
			want = a.IPv6()
		}
		if perr != nil || ap.Addr() != want {
			t.Errorf("to %s: server saw %q (%+v), want %s", target, res.Reply, res, want)
		}
	}
}

// TestHarnessTwoNodes checks the multi-node shape: nodes of one cluster get their own namespace,
// bridge and slice of the cluster's pod space.
func TestHarnessTwoNodes(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c := harnessCluster(t, true)
	var pods []*conformance.Pod
	for range 2 {
		n, err := c.AddNode(ctx, conformance.NodeConfig{NoDaemon: true})
		if err != nil {
			t.Fatal(err)
		}
		p, err := n.AddPlainPod(ctx, conformance.PodConfig{Name: "p"})
		if err != nil {
			t.Fatal(err)
		}
		if !n.PodCIDR.Contains(p.IPv4()) || !n.PodCIDR6.Contains(p.IPv6()) {
			t.Errorf("pod %v is outside its node's CIDRs %s %s", p.IPs(), n.PodCIDR, n.PodCIDR6)
		}
		for _, cidr := range c.MeshCIDRs() {
			if !cidr.Contains(p.IPv4()) && !cidr.Contains(p.IPv6()) {
				t.Errorf("mesh CIDR %s holds neither of %v", cidr, p.IPs())
			}
		}
		pods = append(pods, p)
	}
	nodes := c.Nodes()
	if len(nodes) != 2 || nodes[0].PodCIDR.Overlaps(nodes[1].PodCIDR) || nodes[0].PodCIDR6.Overlaps(nodes[1].PodCIDR6) || nodes[0].Netns == nodes[1].Netns {
		for _, n := range nodes {
			t.Errorf("nodes are not distinct: %s %s %s", n.Netns, n.PodCIDR, n.PodCIDR6)
		}
	}
	if pods[0].IPv4() == pods[1].IPv4() {
		t.Errorf("pods on different nodes share %s", pods[0].IPv4())
	}
}

func TestHarnessClosedPort(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c := harnessCluster(t, false)
	node, err := c.AddNode(ctx, conformance.NodeConfig{NoDaemon: true})
	if err != nil {
		t.Fatal(err)
	}
	a, err := node.AddPlainPod(ctx, conformance.PodConfig{Name: "a"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := node.AddPlainPod(ctx, conformance.PodConfig{Name: "b"})
	if err != nil {
		t.Fatal(err)
	}
	res, err := a.Client(ctx, netip.AddrPortFrom(b.IPv4(), 9), conformance.ModeEcho, conformance.ClientOptions{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if res.ErrorKind != conformance.KindRefused {
		t.Errorf("a closed port between plain pods gave %+v, want refused", res)
	}
}

func TestHarnessNoMeshlessPodsWithoutDaemon(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	c := harnessCluster(t, false)
	node, err := c.AddNode(ctx, conformance.NodeConfig{NoDaemon: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := node.AddPod(ctx, conformance.PodConfig{Name: "x"}); err == nil {
		t.Error("AddPod on a node without meshlessd succeeded")
	}
}
