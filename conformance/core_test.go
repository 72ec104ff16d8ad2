package conformance_test

// End-to-end tests of issue 2 (transparent mTLS between pods on one node): real bridge and
// host-local plugins plus meshless-cni through libcni, meshlessd in the node's namespace, real
// programs in the pods, and the wire inspected with tcpdump.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshless/meshless/conformance"
)

const (
	corePort   = 8080
	coreNS     = "core"
	coreMarker = "MESHLESS-CLEARTEXT-MARKER-5d1c"
)

// coreEnv is one node with a mesh client pod, a mesh server pod running the test server, and
// a plain pod attached without meshless-cni.
type coreEnv struct {
	cluster               *conformance.Cluster
	node                  *conformance.Node
	client, server, plain *conformance.Pod
	srv                   *conformance.Process
	target                netip.AddrPort
}

func newCoreCluster(t *testing.T, mode string) *conformance.Cluster {
	t.Helper()
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins:       binaries(t),
		Mode:       mode,
		NodePrefix: "mlnode-",
		PodPrefix:  "mlcore-",
		Workloads: map[string]string{
			coreNS + "/client": "client-sa",
			coreNS + "/server": "server-sa",
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func setupCore(t *testing.T, mode string) *coreEnv {
	t.Helper()
	needRoot(t)
	ctx := testCtx(t)
	e := &coreEnv{cluster: newCoreCluster(t, mode)}
	var err error
	if e.node, err = e.cluster.AddNode(ctx, conformance.NodeConfig{}); err != nil {
		t.Fatal(err)
	}
	if e.client, err = e.node.AddPod(ctx, conformance.PodConfig{Namespace: coreNS, Name: "client"}); err != nil {
		t.Fatal(err)
	}
	if e.server, err = e.node.AddPod(ctx, conformance.PodConfig{Namespace: coreNS, Name: "server"}); err != nil {
		t.Fatal(err)
	}
	if e.plain, err = e.node.AddPlainPod(ctx, conformance.PodConfig{Namespace: coreNS, Name: "outsider"}); err != nil {
		t.Fatal(err)
	}
	if e.srv, err = e.server.StartServer(ctx, corePort); err != nil {
		t.Fatal(err)
	}
	e.target = netip.AddrPortFrom(e.server.IPv4(), corePort)
	return e
}

// exchange runs one client exchange and fails the test unless it was byte exact and clean.
func exchange(t *testing.T, from interface {
	Client(context.Context, netip.AddrPort, string, conformance.ClientOptions) (conformance.ClientResult, error)
}, target netip.AddrPort, mode string, opts conformance.ClientOptions) conformance.ClientResult {
	t.Helper()
	res, err := from.Client(testCtx(t), target, mode, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Match || res.Error != "" {
		t.Fatalf("%s to %s (%d bytes): %+v", mode, target, opts.Bytes, res)
	}
	return res
}

// peerAddr parses the address a testapp server reported for its client.
func peerAddr(t *testing.T, res conformance.ClientResult) netip.Addr {
	t.Helper()
	ap, err := netip.ParseAddrPort(res.Reply)
	if err != nil {
		t.Fatalf("server's peer answer %q: %v", res.Reply, err)
	}
	return ap.Addr()
}

// requireTLSOnly checks a capture: between a and b there is payload, all of it TLS records,
// all of it on the application's port (never the capture ports), and the marker nowhere.
func requireTLSOnly(t *testing.T, tr *conformance.Trace, a, b netip.Addr, port uint16, marker string) {
	t.Helper()
	if hits := tr.FlowsWithClear([]byte(marker)); len(hits) > 0 {
		t.Errorf("marker in clear on the wire: %v", hits)
	}
	flows := conformance.WithPayload(tr.Between(a, b))
	if len(flows) == 0 {
		t.Fatalf("no payload between %s and %s in the capture (%d packets)", a, b, len(tr.Packets))
	}
	for _, f := range tr.Flows {
		for _, p := range []uint16{f.Src.Port(), f.Dst.Port()} {
			if p == 15001 || p == 15006 {
				t.Errorf("flow %s uses a capture port on the wire", f)
			}
		}
	}
	for _, f := range flows {
		if f.Src.Port() != port && f.Dst.Port() != port {
			t.Errorf("flow %s is not on the application's port %d", f, port)
		}
		st, err := f.CheckTLS()
		if err != nil {
			t.Error(err)
			continue
		}
		if f.Dst.Port() == port && f.SYN && len(f.Data) > 0 && f.Data[0] != conformance.TLSHandshake {
			t.Errorf("flow %s does not open with a TLS handshake", f)
		}
		t.Logf("%s: %d TLS records %v", f, st.Records, st.Types)
	}
}

func TestCoreStrict(t *testing.T) {
	e := setupCore(t, conformance.ModeStrict)

	t.Run("request_response", func(t *testing.T) {
		ctx := testCtx(t)
		out, err := e.client.Exec(ctx, "curl", "-sS", "--max-time", "20", fmt.Sprintf("http://%s/hello", e.target))
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("peer=%s:", e.client.IPv4()); !strings.Contains(string(out), want) {
			t.Errorf("curl got %q, want it to contain %q", out, want)
		}
		exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 100})
	})

	t.Run("transfer_both_ways", func(t *testing.T) {
		const size = 16 << 20
		exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: size})
		exchange(t, e.client, e.target, conformance.ModeSend, conformance.ClientOptions{Bytes: size})
		exchange(t, e.client, e.target, conformance.ModeSink, conformance.ClientOptions{Bytes: size})
	})

	t.Run("half_close", func(t *testing.T) {
		// sink: the server answers only after it read EOF (client FIN crossed the proxy), and the
		// client finishes only when it reads EOF after the answer (server FIN crossed back).
		res := exchange(t, e.client, e.target, conformance.ModeSink, conformance.ClientOptions{Bytes: 1 << 20})
		if res.Reply == "" {
			t.Error("no answer after the client's half-close")
		}
		exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 1})
	})

	t.Run("wire_shows_only_tls", func(t *testing.T) {
		ctx := testCtx(t)
		capture, err := e.node.StartCapture(ctx, "strict-wire", "tcp")
		if err != nil {
			t.Fatal(err)
		}
		exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 256 << 10, Marker: coreMarker})
		exchange(t, e.client, e.target, conformance.ModeSend, conformance.ClientOptions{Bytes: 64 << 10, Marker: coreMarker})
		tr, err := capture.StopAndRead()
		if err != nil {
			t.Fatal(err)
		}
		requireTLSOnly(t, tr, e.client.IPv4(), e.server.IPv4(), corePort, coreMarker)
	})

	t.Run("server_sees_client_ip", func(t *testing.T) {
		res := exchange(t, e.client, e.target, conformance.ModePeer, conformance.ClientOptions{})
		if got := peerAddr(t, res); got != e.client.IPv4() {
			t.Errorf("server saw %s, want the client pod's %s", got, e.client.IPv4())
		}
	})

	t.Run("daemon_log_names_identities", func(t *testing.T) {
		exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 10})
		ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
		defer cancel()
		clientIP := e.client.IPv4().String()
		if _, err := e.node.WaitLog(ctx, "msg", "connection", "direction", "inbound",
			"peer_id", e.client.SPIFFEID(), "src", hasHost(clientIP)); err != nil {
			t.Errorf("inbound side: %v", err)
		}
		if _, err := e.node.WaitLog(ctx, "msg", "connection", "direction", "outbound",
			"peer_id", e.server.SPIFFEID(), "dst", e.target.String()); err != nil {
			t.Errorf("outbound side: %v", err)
		}
	})

	t.Run("metrics_count_the_traffic", func(t *testing.T) {
		// The first exchange gives the client a session ticket, so that the counted ones resume
		// even when this subtest runs alone.
		exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 10})
		before := settledMetrics(t, e.node, nil)
		const exchanges = 3
		for range exchanges {
			exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 100})
		}
		// Each exchange is one connection out of the client pod and one into the server pod.
		after := settledMetrics(t, e.node, func(m map[string]float64) bool {
			return m["meshless_connections_total"]-before["meshless_connections_total"] >= 2*exchanges
		})
		if got := after["meshless_pods_enrolled"]; got != 2 {
			t.Errorf("meshless_pods_enrolled = %v, want 2 (client and server; the outsider has no meshless-cni)", got)
		}
		for name, want := range map[string]float64{
			"meshless_connections_total":                                  2 * exchanges,
			"meshless_connections_failed_total":                           0,
			"meshless_connections_plaintext_total":                        0,
			`meshless_tls_handshakes_total{direction="outbound"}`:         exchanges,
			`meshless_tls_handshakes_total{direction="inbound"}`:          exchanges,
			`meshless_tls_handshakes_resumed_total{direction="outbound"}`: exchanges,
			`meshless_tls_handshakes_resumed_total{direction="inbound"}`:  exchanges,
		} {
			if _, ok := after[name]; !ok {
				t.Errorf("%s missing from /metrics", name)
				continue
			}
			if got := after[name] - before[name]; got != want {
				t.Errorf("%s grew by %v over %d exchanges, want %v", name, got, exchanges, want)
			}
		}
	})

	t.Run("plaintext_from_outside_refused", func(t *testing.T) {
		ctx := testCtx(t)
		res, err := e.plain.Client(ctx, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 64, Timeout: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if res.Match || res.Received > 0 || res.ErrorKind != conformance.KindReset {
			t.Errorf("plaintext from a pod outside the mesh: %+v, want refused (reset)", res)
		}
		conns, err := conformance.ServerConns(e.srv)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range conns {
			if strings.HasPrefix(c.Peer, e.plain.IPv4().String()+":") {
				t.Errorf("the server got a connection from the outsider: %+v", c)
			}
		}
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := e.node.WaitLog(wctx, "msg", "connection", "direction", "inbound",
			"src", hasHost(e.plain.IPv4().String()), "reason"); err != nil {
			t.Errorf("refusal not logged with a reason: %v", err)
		}
	})

	t.Run("node_probe_works", func(t *testing.T) {
		res := exchange(t, e.node, e.target, conformance.ModePeer, conformance.ClientOptions{})
		if got := peerAddr(t, res); got != e.node.Gateway {
			t.Errorf("server saw the probe from %s, want the node's %s", got, e.node.Gateway)
		}
		out, err := e.node.Exec(testCtx(t), "curl", "-sS", "--max-time", "20", fmt.Sprintf("http://%s/healthz", e.target))
		if err != nil || !strings.Contains(string(out), "peer="+e.node.Gateway.String()) {
			t.Errorf("HTTP probe from the node: %q, %v", out, err)
		}
	})

	t.Run("closed_port_resets", func(t *testing.T) {
		closed := netip.AddrPortFrom(e.server.IPv4(), corePort+1)
		res, err := e.client.Client(testCtx(t), closed, conformance.ModeEcho, conformance.ClientOptions{Bytes: 16, Timeout: 20 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		// Through the proxy the client's connect succeeds locally, so the closed port must come
		// back as a reset: a clean EOF would hide the failure, a timeout is a hang.
		if res.ErrorKind != conformance.KindReset && res.ErrorKind != conformance.KindRefused {
			t.Errorf("closed port: %+v, want a reset", res)
		}
	})
}

// hasHost matches a "host:port" log value whose host is ip.
func hasHost(ip string) func(string) bool {
	return func(s string) bool {
		ap, err := netip.ParseAddrPort(s)
		return err == nil && ap.Addr().String() == ip
	}
}

func TestCorePermissive(t *testing.T) {
	e := setupCore(t, conformance.ModePermissive)
	res := exchange(t, e.plain, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 64 << 10})
	if res.Received != res.Sent {
		t.Errorf("permissive echo: %+v", res)
	}
	peer := exchange(t, e.plain, e.target, conformance.ModePeer, conformance.ClientOptions{})
	if got := peerAddr(t, peer); got != e.plain.IPv4() {
		t.Errorf("server saw %s, want the outsider's %s", got, e.plain.IPv4())
	}
	// Mesh traffic is still mTLS in permissive mode.
	exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 1 << 20})
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	if _, err := e.node.WaitLog(ctx, "msg", "connection", "direction", "inbound", "peer_id", e.client.SPIFFEID()); err != nil {
		t.Error(err)
	}
}

// removeJumpByHand deletes the jump from nat OUTPUT into meshless's chain inside the pod, with
// whichever iptables backend holds it, as an administrator (or a buggy tool) might.
func removeJumpByHand(t *testing.T, p *conformance.Pod) {
	t.Helper()
	ctx := testCtx(t)
	for _, backend := range []string{"nft", "legacy"} {
		out, err := p.Exec(ctx, "iptables-"+backend+"-save", "-t", "nat")
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(out), "\n") {
			if strings.HasPrefix(line, "-A OUTPUT ") && strings.Contains(line, "-j MESHLESS") {
				del := "iptables-" + backend + " -t nat -D" + strings.TrimPrefix(line, "-A")
				if _, err := p.Exec(ctx, "sh", "-c", del); err != nil {
					t.Fatal(err)
				}
				return
			}
		}
	}
	t.Fatal("no jump into a MESHLESS chain in nat OUTPUT with either iptables backend")
}

func TestCoreCNI(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c := newCoreCluster(t, conformance.ModeStrict)
	node, err := c.AddNode(ctx, conformance.NodeConfig{})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("check_after_add_and_after_tampering", func(t *testing.T) {
		pod, err := node.AddPod(ctx, conformance.PodConfig{Namespace: coreNS, Name: "checked"})
		if err != nil {
			t.Fatal(err)
		}
		if err := pod.Check(ctx); err != nil {
			t.Fatalf("CHECK right after ADD: %v", err)
		}
		removeJumpByHand(t, pod)
		err = pod.Check(ctx)
		var cniErr *types.Error
		if err == nil {
			t.Fatal("CHECK passed with the capture jump removed")
		} else if !errors.As(err, &cniErr) || cniErr.Msg == "" {
			t.Errorf("CHECK failure is not a CNI error with a message: %v", err)
		}
	})

	t.Run("del_twice", func(t *testing.T) {
		pod, err := node.AddPod(ctx, conformance.PodConfig{Namespace: coreNS, Name: "deleted"})
		if err != nil {
			t.Fatal(err)
		}
		for i := range 2 {
			if err := pod.Del(ctx); err != nil {
				t.Errorf("DEL #%d: %v", i+1, err)
			}
		}
	})

	// Raw invocations show exactly what the plugin prints, which libcni would hide.
	netns, err := conformance.NewNetns(ctx, t, "mlcore-")
	if err != nil {
		t.Fatal(err)
	}
	prevResult := fmt.Sprintf(`{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":%q}],"ips":[{"address":"%s/24","interface":0}]}`,
		conformance.NetnsPath(netns), node.PodCIDR.Addr().Next().Next().Next())
	call := func(t *testing.T, stdin string) {
		t.Helper()
		out, err := node.CallPlugin(ctx, "meshless-cni", conformance.PluginCall{
			Command: "ADD", ContainerID: "raw0123456789", Netns: conformance.NetnsPath(netns),
			Args:  "IgnoreUnknown=1;K8S_POD_NAMESPACE=core;K8S_POD_NAME=raw;K8S_POD_INFRA_CONTAINER_ID=raw0123456789",
			Stdin: []byte(stdin),
		})
		if err != nil {
			t.Fatal(err)
		}
		if out.ExitCode == 0 {
			t.Fatalf("ADD succeeded: stdout %q", out.Stdout)
		}
		cniErr, err := out.CNIError()
		if err != nil {
			t.Fatal(err)
		}
		if cniErr.Code == 0 || cniErr.Msg == "" {
			t.Errorf("CNI error without code or message: %+v", cniErr)
		}
		t.Logf("CNI error: %+v", cniErr)
	}
	sock := fmt.Sprintf("%q", node.Socket)
	t.Run("add_without_prevResult", func(t *testing.T) {
		call(t, `{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"meshless-cni","socketPath":`+sock+`}`)
	})
	t.Run("add_with_broken_config", func(t *testing.T) {
		for name, stdin := range map[string]string{
			"bad_cidr":  `{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"meshless-cni","socketPath":` + sock + `,"excludeOutboundCIDRs":["not-a-cidr"],"prevResult":` + prevResult + `}`,
			"bad_port":  `{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"meshless-cni","socketPath":` + sock + `,"excludeInboundPorts":[70000],"prevResult":` + prevResult + `}`,
			"bad_type":  `{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"meshless-cni","socketPath":` + sock + `,"excludeOutboundPorts":"80","prevResult":` + prevResult + `}`,
			"not_json":  `{"cniVersion":"1.1.0","name":`,
			"bad_level": `{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"meshless-cni","socketPath":` + sock + `,"logLevel":"loud","prevResult":` + prevResult + `}`,
		} {
			t.Run(name, func(t *testing.T) { call(t, stdin) })
		}
	})
	t.Run("add_through_libcni_without_prevResult", func(t *testing.T) {
		list := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"k8s-pod-network","plugins":[{"type":"meshless-cni","socketPath":%s}]}`, sock)
		_, err := node.AddPodWithConfList(ctx, conformance.PodConfig{Namespace: coreNS, Name: "unchained"}, []byte(list))
		var cniErr *types.Error
		if !errors.As(err, &cniErr) {
			t.Errorf("ADD of an unchained meshless-cni: %v, want a CNI error", err)
		}
	})
}

func TestCoreAddWithDaemonDown(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c := newCoreCluster(t, conformance.ModeStrict)
	node, err := c.AddNode(ctx, conformance.NodeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Stop(); err != nil {
		t.Fatal(err)
	}
	_, err = node.AddPod(ctx, conformance.PodConfig{Namespace: coreNS, Name: "early"})
	var cniErr *types.Error
	switch {
	case err == nil:
		t.Fatal("ADD succeeded with meshlessd down: the pod would run without mTLS")
	case !errors.As(err, &cniErr):
		t.Errorf("ADD with meshlessd down: %v, want a CNI error", err)
	case !strings.Contains(cniErr.Msg+cniErr.Details, node.Socket) && !strings.Contains(cniErr.Msg+cniErr.Details, "meshlessd"):
		t.Errorf("the error does not say what is missing (the daemon or its socket %s): %+v", node.Socket, cniErr)
	}
	t.Logf("ADD with the daemon down: %v", err)
	if err := node.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := node.AddPod(ctx, conformance.PodConfig{Namespace: coreNS, Name: "late"}); err != nil {
		t.Errorf("ADD once meshlessd is back: %v", err)
	}
}

func TestCoreDaemonRestart(t *testing.T) {
	e := setupCore(t, conformance.ModeStrict)
	exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 64 << 10})

	for _, stop := range []struct {
		name string
		do   func() error
	}{{"sigterm", e.node.Stop}, {"sigkill", e.node.Kill}} {
		t.Run(stop.name, func(t *testing.T) {
			ctx := testCtx(t)
			capture, err := e.node.StartCapture(ctx, "down-"+stop.name, "tcp")
			if err != nil {
				t.Fatal(err)
			}
			if err := stop.do(); err != nil {
				t.Fatal(err)
			}
			res, err := e.client.Client(ctx, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 64 << 10, Marker: coreMarker, Timeout: 20 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			if res.Match || res.Received > 0 || res.ErrorKind == conformance.KindTimeout {
				t.Errorf("with meshlessd down the connection did not fail promptly: %+v", res)
			}
			tr, err := capture.StopAndRead()
			if err != nil {
				t.Fatal(err)
			}
			if hits := tr.FlowsWithClear([]byte(coreMarker)); len(hits) > 0 {
				t.Errorf("with meshlessd down, the marker went out in clear: %v", hits)
			}
			if flows := conformance.WithPayload(tr.Between(e.client.IPv4(), e.server.IPv4())); len(flows) > 0 {
				t.Errorf("with meshlessd down, payload crossed the bridge: %v", flows)
			}

			// Back up, with no CNI call: the daemon re-attaches from its state.
			if err := e.node.Start(ctx); err != nil {
				t.Fatal(err)
			}
			capture, err = e.node.StartCapture(ctx, "up-"+stop.name, "tcp")
			if err != nil {
				t.Fatal(err)
			}
			exchange(t, e.client, e.target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 64 << 10, Marker: coreMarker})
			tr, err = capture.StopAndRead()
			if err != nil {
				t.Fatal(err)
			}
			requireTLSOnly(t, tr, e.client.IPv4(), e.server.IPv4(), corePort, coreMarker)
		})
	}
}

// settledMetrics reads the node's /metrics until no connection is open (a connection is counted
// in meshless_connections_total when it ends) and done, if given, accepts the samples.
func settledMetrics(t *testing.T, node *conformance.Node, done func(map[string]float64) bool) map[string]float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), 15*time.Second)
	defer cancel()
	var last map[string]float64
	for {
		m, err := node.Metrics(ctx)
		if err != nil && ctx.Err() == nil {
			t.Fatal(err)
		}
		if err == nil {
			if m["meshless_connections_open"] == 0 && (done == nil || done(m)) {
				return m
			}
			last = m
		}
		select {
		case <-ctx.Done():
			t.Fatalf("/metrics did not settle within 15s; last read: %v", last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
