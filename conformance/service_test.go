package conformance_test

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/meshless/meshless/conformance"
)

// TestService reaches two backends on different nodes through a Service-like virtual IP that
// each node DNATs, as kube-proxy does. The client pod's daemon sees only the virtual IP (in the
// mesh because the service CIDR is a mesh CIDR) and starts mTLS to it; the client's node rewrites
// the destination, and whichever backend's daemon gets the connection terminates it. Every
// connection is mTLS on the wire to the backend that answered, both backends serve, and the
// identities at both ends are the pods', not the virtual IP's.
func TestService(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	const (
		ns     = "svc"
		port   = 8080
		conns  = 10
		marker = "MESHLESS-SERVICE-MARKER-81c3"
	)
	// Both backends run as one service account, as the pods of a Deployment do.
	c := newPathsCluster(t, map[string]string{
		ns + "/client":    "frontend",
		ns + "/backend-a": "web",
		ns + "/backend-b": "web",
	})
	mesh := append(c.MeshCIDRs(), conformance.ServiceCIDR4)
	var nodes []*conformance.Node
	for range 3 {
		n, err := c.AddNode(ctx, conformance.NodeConfig{MeshCIDRs: mesh})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	// The backends are on the other nodes: a backend beside the client would answer it across
	// the bridge, past the node's un-DNAT, which needs br_netfilter (not the subject here).
	client, err := nodes[0].AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: "client"})
	if err != nil {
		t.Fatal(err)
	}
	var backends []*conformance.Pod
	var srvs []*conformance.Process
	var targets []netip.AddrPort
	for i, name := range []string{"backend-a", "backend-b"} {
		p, err := nodes[i+1].AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: name})
		if err != nil {
			t.Fatal(err)
		}
		srv, err := p.StartServer(ctx, port)
		if err != nil {
			t.Fatal(err)
		}
		backends, srvs, targets = append(backends, p), append(srvs, srv), append(targets, netip.AddrPortFrom(p.IPv4(), port))
	}
	// A ClusterIP on port 80 in front of the backends' 8080, as a Service maps port to targetPort.
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	for _, n := range nodes {
		if err := n.AddServiceDNAT(ctx, vip, targets...); err != nil {
			t.Fatal(err)
		}
	}

	// What leaves the client's node, after its DNAT: connections from the client pod to a backend.
	wire, err := conformance.StartCapture(ctx, t, nodes[0].Dir, "service-wire", nodes[0].Netns, nodes[0].PodInterface(), "tcp")
	if err != nil {
		t.Fatal(err)
	}
	var durations []float64
	for range conns {
		res := exchange(t, client, vip, conformance.ModeEcho, conformance.ClientOptions{Bytes: 32 << 10, Marker: marker})
		durations = append(durations, float64(res.DurationMS))
	}
	slices.Sort(durations)
	conformance.Figure(t, "service_vip_echo_32KiB_p50", durations[len(durations)/2], "ms")

	shares := waitServed(t, client.IPv4(), conns, srvs...)
	for i, share := range shares {
		t.Logf("%s served %d of %d connections", backends[i], len(share), conns)
		if len(share) == 0 {
			t.Errorf("%s was never reached through %s", backends[i], vip)
		}
	}
	if got := len(shares[0]) + len(shares[1]); got != conns {
		t.Errorf("the backends served %d connections from the client (the app sees the client pod's own address), want %d", got, conns)
	}

	tr, err := wire.StopAndRead()
	if err != nil {
		t.Fatal(err)
	}
	for i, b := range backends {
		if len(shares[i]) > 0 {
			requireTLSOnly(t, tr, client.IPv4(), b.IPv4(), port, marker)
		}
	}
	opened := 0
	for _, f := range tr.Flows {
		if f.SYN && f.Src.Addr() == client.IPv4() && slices.Contains(targets, f.Dst) {
			opened++
		}
		if f.Src.Addr() == vip.Addr() || f.Dst.Addr() == vip.Addr() {
			t.Errorf("the virtual IP left the client's node: %s", f)
		}
	}
	if opened != conns {
		t.Errorf("%d connections from the client to a backend on the wire, want %d", opened, conns)
	}

	// The client's daemon dialed the virtual IP and verified a backend's identity ...
	backendID := backends[0].SPIFFEID()
	if id := backends[1].SPIFFEID(); id != backendID {
		t.Fatalf("backends of one service account have identities %s and %s", backendID, id)
	}
	out := waitConnRecords(t, nodes[0], conns, "direction", "outbound", "dst", vip.String(), "src", hasHost(client.IPv4().String()))
	for _, r := range out {
		if r.String("mtls") != "true" || r.String("result") != "ok" || r.String("peer_id") != backendID {
			t.Errorf("client side: %v, want mtls=true result=ok peer_id=%s", r, backendID)
		}
	}
	// ... and each backend's daemon terminated its share as itself, verifying the client's.
	for i, b := range backends {
		if len(shares[i]) == 0 {
			continue
		}
		in := waitConnRecords(t, nodes[i+1], len(shares[i]), "direction", "inbound", "dst", targets[i].String(), "src", hasHost(client.IPv4().String()))
		for _, r := range in {
			if r.String("mtls") != "true" || r.String("result") != "ok" || r.String("peer_id") != client.SPIFFEID() {
				t.Errorf("%s side: %v, want mtls=true result=ok peer_id=%s", b, r, client.SPIFFEID())
			}
		}
	}
}
