// Command demo shows meshless at work on a simulated two-node cluster: four pods, two per node,
// each with its own service account, created through the real CNI plugins with meshless-cni
// chained, talk on one node and across nodes; the two meshlessd logs name the verified workload
// identity at each end of every connection; and captures on the node's bridge and on its link
// to the other node prove that only TLS records crossed the wire and that a marker the
// applications sent never appeared in clear. It cleans up everything it created, and exits
// non-zero if any part of the proof fails. It needs root.
//
//	go run ./conformance/cmd/demo
package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/meshless/meshless/conformance"
)

const (
	port   = 8080
	marker = "PAYMENT-CARD-4111-1111-1111-1111"
)

func main() {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: needs root (network namespaces, iptables, tcpdump); try: sudo make demo")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	env := &conformance.CleanupStack{Log: func(string, ...any) {}}
	err := run(ctx, env)
	if err != nil {
		env.Fail()
		// On failure, the harness's own messages (and the daemons' log tails) explain what broke.
		env.Log = func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
	}
	env.Run()
	if err != nil {
		fmt.Fprintln(os.Stderr, "\ndemo FAILED:", err)
		os.Exit(1)
	}
}

// exchange is one client pod talking to one server pod.
type exchange struct {
	what           string
	client, server *conformance.Pod
}

func run(ctx context.Context, env *conformance.CleanupStack) error {
	fmt.Println("meshless demo: two nodes, four pods, every connection between them mutual TLS")
	fmt.Println()
	binDir, err := os.MkdirTemp("", "meshless-demo-bin-")
	if err != nil {
		return err
	}
	env.Cleanup(func() { os.RemoveAll(binDir) })
	fmt.Println("building meshless-cni, meshlessd and the reference CNI plugins (bridge, host-local, loopback) ...")
	bins, err := conformance.BuildBinaries(ctx, binDir)
	if err != nil {
		return err
	}
	cluster, err := conformance.NewCluster(env, conformance.ClusterConfig{
		Bins:       bins,
		NodePrefix: "mldemo-node-",
		PodPrefix:  "mldemo-pod-",
		Workloads: map[string]string{
			"demo/frontend": "frontend", "demo/cart": "cart",
			"demo/backend": "backend", "demo/payments": "payments",
		},
	})
	if err != nil {
		return err
	}
	var nodes [2]*conformance.Node
	for i := range nodes {
		if nodes[i], err = cluster.AddNode(ctx, conformance.NodeConfig{Name: fmt.Sprintf("node-%d", i+1)}); err != nil {
			return err
		}
	}
	pods := map[string]*conformance.Pod{}
	for i, name := range []string{"frontend", "cart", "backend", "payments"} {
		p, err := nodes[i/2].AddPod(ctx, conformance.PodConfig{Namespace: "demo", Name: name})
		if err != nil {
			return err
		}
		pods[name] = p
		if name != "frontend" {
			if _, err := p.StartServer(ctx, port); err != nil {
				return err
			}
		}
	}
	frontend, cart, backend, payments := pods["frontend"], pods["cart"], pods["backend"], pods["payments"]

	fmt.Printf("\ncluster: 2 nodes (network namespaces) routing each other's pod CIDRs over an underlay link,\n")
	fmt.Printf("one CA, meshlessd --mode %s on each; every pod created by libcni with the conflist\n", nodes[0].Config.Mode)
	fmt.Printf("[bridge + host-local, meshless-cni], as containerd does\n")
	for _, n := range nodes {
		fmt.Printf("\n%s  pods %s, underlay %s\n", n.Name, n.PodCIDR, n.Underlay)
		for _, p := range []*conformance.Pod{frontend, cart, backend, payments} {
			if p.Node != n {
				continue
			}
			role := "client"
			if p != frontend {
				role = fmt.Sprintf("server on :%d", port)
			}
			fmt.Printf("  %-9s %-11s %-44s %s\n", p.Name, p.IPv4(), p.SPIFFEID(), role)
		}
	}

	// Same-node traffic crosses node-1's bridge; traffic to node-2 crosses the bridge and then
	// node-1's link to node-2, where it is seen as it travels between nodes.
	bridgeCap, err := nodes[0].StartCapture(ctx, "demo-bridge", fmt.Sprintf("tcp port %d", port))
	if err != nil {
		return err
	}
	wireIface := nodes[0].PodInterface()
	wireCap, err := conformance.StartCapture(ctx, env, nodes[0].Dir, "demo-wire", nodes[0].Netns, wireIface, fmt.Sprintf("tcp port %d", port))
	if err != nil {
		return err
	}
	var logStart [2]int
	for i, n := range nodes {
		l, err := n.Logs()
		if err != nil {
			return err
		}
		logStart[i] = len(l.Records)
	}

	target := netip.AddrPortFrom(backend.IPv4(), port)
	fmt.Printf("\n1. frontend (node-1): curl http://%s/   (backend, on node-2)\n", target)
	out, err := frontend.Exec(ctx, "curl", "-sS", "--max-time", "20", "http://"+target.String()+"/")
	if err != nil {
		return err
	}
	fmt.Print(indent(string(out), "   "))
	if !strings.Contains(string(out), "peer="+frontend.IPv4().String()+":") {
		return errors.New("the backend did not see the frontend's own address")
	}
	fmt.Println("   the backend sees the frontend's own pod address, across nodes, not a proxy's")

	exchanges := []exchange{
		{"same node", frontend, cart},
		{"across nodes", frontend, backend},
		{"across nodes", cart, payments},
	}
	fmt.Printf("\n2. 1 MiB echoes, with %q written every 4 KiB\n", marker)
	for _, x := range exchanges {
		res, err := x.client.Client(ctx, netip.AddrPortFrom(x.server.IPv4(), port), conformance.ModeEcho, conformance.ClientOptions{Bytes: 1 << 20, Marker: marker})
		if err != nil {
			return err
		}
		if !res.Match || res.Error != "" {
			return fmt.Errorf("echo %s -> %s failed: %+v", x.client.Name, x.server.Name, res)
		}
		fmt.Printf("   %-8s -> %-8s %-12s sent %d bytes, got %d back, byte-exact (sha256 %s...)\n",
			x.client.Name, x.server.Name, x.what, res.Sent, res.Received, res.SentSHA256[:12])
	}

	if err := showIdentities(ctx, nodes, logStart, exchanges); err != nil {
		return err
	}
	bridge, err := bridgeCap.StopAndRead()
	if err != nil {
		return err
	}
	wire, err := wireCap.StopAndRead()
	if err != nil {
		return err
	}
	fmt.Printf("\n4. the wire: tcpdump on port %d, every flow reassembled and cut into TLS records\n", port)
	fmt.Printf("   on node-1's bridge %s, between the pods of node-1:\n", conformance.BridgeName)
	if err := showFlows(bridge, [][2]*conformance.Pod{{frontend, cart}}); err != nil {
		return err
	}
	fmt.Printf("   on node-1's link to node-2 (%s), between nodes:\n", wireIface)
	if err := showFlows(wire, [][2]*conformance.Pod{{frontend, backend}, {cart, payments}}); err != nil {
		return err
	}
	packets := 0
	for _, tr := range []*conformance.Trace{bridge, wire} {
		// Not only the flows shown: every flow with payload on the application's port.
		for _, f := range conformance.WithPayload(tr.Flows) {
			if _, err := f.CheckTLS(); err != nil {
				return fmt.Errorf("not TLS: %w", err)
			}
		}
		if hits := tr.FlowsWithClear([]byte(marker)); len(hits) > 0 {
			return fmt.Errorf("the marker appeared in clear in %v", hits)
		}
		packets += len(tr.Packets)
	}
	fmt.Printf("   marker %q in clear: nowhere in %d packets\n", marker, packets)
	fmt.Println("   PROOF: every byte between the pods, on one node and between nodes, was a TLS record,")
	fmt.Println("   on the application's own port")

	if err := showNoWayAround(ctx, frontend, cart); err != nil {
		return err
	}
	fmt.Println("\ndemo OK; cleaning up")
	return nil
}

// showNoWayAround dials, from the client pod, the server pod's IPv6 link-local address, which
// every pod has on its interface even without an IPv6 address from CNI, and which the server's
// app listens on: the capture must refuse the connection.
func showNoWayAround(ctx context.Context, client, server *conformance.Pod) error {
	waitCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ll, err := server.LinkLocal(waitCtx)
	if err != nil {
		return err
	}
	target := netip.AddrPortFrom(ll, port)
	fmt.Printf("\n5. no way around: %s dials %s's IPv6 link-local address %s\n", client.Name, server.Name, target)
	fmt.Printf("   (the pods have no IPv6 address from CNI, but link-local ones; %s's app listens on them too)\n", server.Name)
	start := time.Now()
	c, err := client.Dial(waitCtx, "tcp6", target.String())
	if err == nil {
		c.Close()
		return fmt.Errorf("%s reached %s over IPv6 link-local, around the mesh", client.Name, server.Name)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s to %s over IPv6 link-local: %w, want the connection refused", client.Name, server.Name, err)
	}
	fmt.Printf("   connection refused after %v: a pod without an IPv6 address has its IPv6 TCP refused both ways\n",
		time.Since(start).Round(10*time.Microsecond))
	return nil
}

// showIdentities prints what each daemon logged about the exchanges' connections: the client's
// node records it outbound with the server's verified identity, the server's node inbound with
// the client's.
func showIdentities(ctx context.Context, nodes [2]*conformance.Node, logStart [2]int, exchanges []exchange) error {
	fmt.Println("\n3. the meshlessd logs: one record per connection and end, with the peer's verified identity")
	// A daemon logs a connection as it ends, which may be a moment after the client returned.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for _, x := range exchanges {
		for _, want := range []struct {
			node      *conformance.Node
			direction string
			peer      *conformance.Pod
		}{{x.client.Node, "outbound", x.server}, {x.server.Node, "inbound", x.client}} {
			if _, err := want.node.WaitLog(wctx, "msg", "connection", "direction", want.direction,
				"dst", netip.AddrPortFrom(x.server.IPv4(), port).String(), "peer_id", want.peer.SPIFFEID()); err != nil {
				return err
			}
		}
	}
	for i, n := range nodes {
		l, err := n.Logs()
		if err != nil {
			return err
		}
		for _, r := range l.Since(logStart[i]).Find("msg", "connection") {
			if r.String("mtls") != "true" || r.String("result") != "ok" {
				return fmt.Errorf("%s logged a connection that was not mTLS or failed: %v", n.Name, r)
			}
			fmt.Printf("   %s %-8s %-17s -> %-16s peer %-41s %s\n", n.Name, r.String("direction"),
				r.String("src"), r.String("dst"), r.String("peer_id"), r.String("result"))
		}
	}
	return nil
}

// showFlows prints the flows between each pair of pods in tr as TLS records; anything else on
// the wire between them fails the proof.
func showFlows(tr *conformance.Trace, pairs [][2]*conformance.Pod) error {
	for _, pair := range pairs {
		flows := conformance.WithPayload(tr.Between(pair[0].IPv4(), pair[1].IPv4()))
		if len(flows) == 0 {
			return fmt.Errorf("the capture holds no traffic between %s and %s", pair[0].Name, pair[1].Name)
		}
		for _, f := range flows {
			st, err := f.CheckTLS()
			if err != nil {
				return fmt.Errorf("not TLS: %w", err)
			}
			fmt.Printf("     %-17s -> %-17s %8d bytes = %3d TLS records (handshake %d, change_cipher_spec %d, application_data %d)\n",
				f.Src, f.Dst, len(f.Data), st.Records, st.Types[conformance.TLSHandshake], st.Types[conformance.TLSChangeCipherSpec], st.Types[conformance.TLSApplicationData])
		}
	}
	return nil
}

func indent(s, prefix string) string {
	var b strings.Builder
	for line := range strings.SplitSeq(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(prefix + line + "\n")
	}
	return b.String()
}
