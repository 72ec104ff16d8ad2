// Command demo shows meshless at work on a simulated node: two pods created through the real
// CNI plugins with meshless-cni chained talk to each other, meshlessd's log names both workload
// identities, and a capture on the node's bridge proves that only TLS records crossed the wire
// and that a marker the application sent never appeared in clear. It needs root.
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
	"path/filepath"
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
		// On failure, the harness's own messages (and the daemon's log tail) explain what broke.
		env.Log = func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
	}
	env.Run()
	if err != nil {
		fmt.Fprintln(os.Stderr, "\ndemo FAILED:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, env *conformance.CleanupStack) error {
	fmt.Println("meshless demo: two pods on one simulated node, talking over mutual TLS")
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
		Workloads:  map[string]string{"demo/frontend": "frontend", "demo/backend": "backend"},
	})
	if err != nil {
		return err
	}
	node, err := cluster.AddNode(ctx, conformance.NodeConfig{})
	if err != nil {
		return err
	}
	frontend, err := node.AddPod(ctx, conformance.PodConfig{Namespace: "demo", Name: "frontend"})
	if err != nil {
		return err
	}
	backend, err := node.AddPod(ctx, conformance.PodConfig{Namespace: "demo", Name: "backend"})
	if err != nil {
		return err
	}
	outsider, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: "demo", Name: "outsider"})
	if err != nil {
		return err
	}
	if _, err := backend.StartServer(ctx, port); err != nil {
		return err
	}
	target := netip.AddrPortFrom(backend.IPv4(), port)

	fmt.Printf("\nnode      %s: network namespace with bridge %s, pods %s, meshlessd --mode %s\n",
		node.Name, conformance.BridgeName, node.PodCIDR, node.Config.Mode)
	fmt.Printf("frontend  %-12s %s\n", frontend.IPv4(), frontend.SPIFFEID())
	fmt.Printf("backend   %-12s %s   (test server on :%d)\n", backend.IPv4(), backend.SPIFFEID(), port)
	fmt.Printf("outsider  %-12s attached without meshless-cni (a workload outside the mesh)\n", outsider.IPv4())
	fmt.Println("each pod was created by libcni running the conflist [bridge + host-local, meshless-cni], as containerd does")

	capture, err := node.StartCapture(ctx, "demo", fmt.Sprintf("tcp port %d", port))
	if err != nil {
		return err
	}
	logStart, err := node.Logs()
	if err != nil {
		return err
	}

	fmt.Printf("\n1. frontend: curl http://%s/\n", target)
	out, err := frontend.Exec(ctx, "curl", "-sS", "--max-time", "20", "http://"+target.String()+"/")
	if err != nil {
		return err
	}
	fmt.Print(indent(string(out), "   "))
	if !strings.Contains(string(out), "peer="+frontend.IPv4().String()+":") {
		return errors.New("the backend did not see the frontend's own address")
	}
	fmt.Println("   the backend sees the frontend's own pod address, not a proxy's")

	fmt.Printf("\n2. frontend -> backend: 1 MiB echo, with %q written every 4 KiB\n", marker)
	res, err := frontend.Client(ctx, target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 1 << 20, Marker: marker})
	if err != nil {
		return err
	}
	if !res.Match || res.Error != "" {
		return fmt.Errorf("echo failed: %+v", res)
	}
	fmt.Printf("   sent %d bytes, got %d back, byte-exact (sha256 %s...)\n", res.Sent, res.Received, res.SentSHA256[:16])

	tr, err := capture.StopAndRead()
	if err != nil {
		return err
	}

	fmt.Println("\n3. meshlessd's log: one record per proxied connection, with the peer's verified identity")
	// The daemon logs a connection as it ends, which may be a moment after the client returned.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for _, want := range []*conformance.Pod{frontend, backend} {
		if _, err := node.WaitLog(wctx, "msg", "connection", "peer_id", want.SPIFFEID()); err != nil {
			return err
		}
	}
	logs, err := node.Logs()
	if err != nil {
		return err
	}
	conns := logs.Since(len(logStart.Records)).Find("msg", "connection")
	if len(conns) == 0 {
		return errors.New("meshlessd logged no connection")
	}
	for _, r := range conns {
		fmt.Printf("   %-8s %-21s -> %-21s peer %s  %s\n", r.String("direction"), r.String("src"), r.String("dst"), r.String("peer_id"), r.String("result"))
	}

	fmt.Printf("\n4. the wire: tcpdump on %s, every packet between the pods on port %d (%s)\n", conformance.BridgeName, port, filepath.Base(capture.Path))
	flows := conformance.WithPayload(tr.Between(frontend.IPv4(), backend.IPv4()))
	if len(flows) == 0 {
		return errors.New("the capture holds no traffic between the pods")
	}
	for _, f := range flows {
		st, err := f.CheckTLS()
		if err != nil {
			return fmt.Errorf("not TLS: %w", err)
		}
		fmt.Printf("   %-21s -> %-21s %8d bytes = %3d TLS records (handshake %d, change_cipher_spec %d, application_data %d)\n",
			f.Src, f.Dst, len(f.Data), st.Records, st.Types[conformance.TLSHandshake], st.Types[conformance.TLSChangeCipherSpec], st.Types[conformance.TLSApplicationData])
	}
	if hits := tr.FlowsWithClear([]byte(marker)); len(hits) > 0 {
		return fmt.Errorf("the marker appeared in clear in %v", hits)
	}
	fmt.Printf("   marker %q in clear: nowhere in %d packets\n", marker, len(tr.Packets))
	fmt.Println("   PROOF: every byte between the pods was a TLS record, on the application's own port")

	fmt.Printf("\n5. outsider (no meshless-cni) -> backend, plaintext, strict mode\n")
	res, err = outsider.Client(ctx, target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 64, Timeout: 20 * time.Second})
	if err != nil {
		return err
	}
	if res.Received > 0 || res.Match {
		return fmt.Errorf("strict mode let plaintext through: %+v", res)
	}
	fmt.Printf("   refused (%s): strict mode accepts only mTLS from the mesh\n", res.ErrorKind)
	fmt.Println("\ndemo OK; cleaning up namespaces, processes and files")
	return nil
}

func indent(s, prefix string) string {
	var b strings.Builder
	for line := range strings.SplitSeq(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(prefix + line + "\n")
	}
	return b.String()
}
