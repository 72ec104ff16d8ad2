package conformance_test

import (
	"bytes"
	"net/netip"
	"os"
	"testing"

	"github.com/meshless/meshless/conformance"
)

// TestExclude checks the ways out of capture that the plugin config offers, on a strict cluster
// whose conflist (the same on every node) opts out one port in both directions, one more port
// inbound only, and the pod range of a part of the cluster that runs without meshless. Traffic
// that is excluded crosses the wire in clear and never reaches a daemon, while a port that is not
// excluded, to the same pod, stays mTLS. UDP (a DNS-like query and answer) is never captured.
func TestExclude(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	const (
		ns         = "excl"
		meshPort   = 8080
		inOnlyPort = 9091 // excluded inbound: reachable in clear from outside the mesh
		bothPort   = 9092 // excluded outbound and inbound: the port left the mesh
		dnsPort    = 53
		markMesh   = "MESHLESS-EXCL-MESH-7a21"
		markBoth   = "MESHLESS-EXCL-PORT-BOTH-7a21"
		markInOnly = "MESHLESS-EXCL-PORT-IN-7a21"
		markCIDR   = "MESHLESS-EXCL-CIDR-7a21"
		markUDP    = "MESHLESS-EXCL-UDP-7a21"
	)
	// Inside the cluster's pod space (so inside the mesh CIDRs: without the exclusion the
	// daemons would try mTLS there and fail), on a node without meshless.
	unmeshed := netip.MustParsePrefix("10.244.200.0/24")
	conf := map[string]any{
		"excludeOutboundPorts": []int{bothPort},
		"excludeInboundPorts":  []int{inOnlyPort, bothPort},
		"excludeOutboundCIDRs": []string{unmeshed.String()},
	}
	c := newPathsCluster(t, map[string]string{ns + "/client": "client", ns + "/server": "server"})
	nodeA, err := c.AddNode(ctx, conformance.NodeConfig{PluginConf: conf})
	if err != nil {
		t.Fatal(err)
	}
	nodeB, err := c.AddNode(ctx, conformance.NodeConfig{PluginConf: conf})
	if err != nil {
		t.Fatal(err)
	}
	legacy, err := c.AddNode(ctx, conformance.NodeConfig{NoDaemon: true, PodCIDR: unmeshed})
	if err != nil {
		t.Fatal(err)
	}
	client, err := nodeA.AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: "client"})
	if err != nil {
		t.Fatal(err)
	}
	outsider, err := nodeA.AddPlainPod(ctx, conformance.PodConfig{Namespace: ns, Name: "outsider"})
	if err != nil {
		t.Fatal(err)
	}
	server, err := nodeB.AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: "server"})
	if err != nil {
		t.Fatal(err)
	}
	for _, port := range []uint16{meshPort, inOnlyPort, bothPort} {
		if _, err := server.StartServer(ctx, port); err != nil {
			t.Fatal(err)
		}
	}
	if err := server.StartUDPEcho(dnsPort); err != nil {
		t.Fatal(err)
	}
	old, err := legacy.AddPlainPod(ctx, conformance.PodConfig{Namespace: ns, Name: "legacy"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := old.StartServer(ctx, meshPort); err != nil {
		t.Fatal(err)
	}

	capture, err := conformance.StartCapture(ctx, t, nodeA.Dir, "exclude-wire", nodeA.Netns, nodeA.PodInterface(), "tcp or udp")
	if err != nil {
		t.Fatal(err)
	}
	opts := func(marker string) conformance.ClientOptions {
		return conformance.ClientOptions{Bytes: 16 << 10, Marker: marker}
	}
	bypass := []struct {
		name     string
		from     *conformance.Pod
		to       netip.AddrPort
		marker   string
		excluded func(conformance.Record) bool
	}{
		{"outbound port", client, netip.AddrPortFrom(server.IPv4(), bothPort), markBoth, dstPort(bothPort)},
		{"inbound port", outsider, netip.AddrPortFrom(server.IPv4(), inOnlyPort), markInOnly, dstPort(inOnlyPort)},
		{"outbound CIDR", client, netip.AddrPortFrom(old.IPv4(), meshPort), markCIDR, func(r conformance.Record) bool {
			return unmeshed.Contains(recordHost(r, "dst").Addr())
		}},
	}
	for _, x := range bypass {
		exchange(t, x.from, x.to, conformance.ModeEcho, opts(x.marker))
	}
	query := []byte(markUDP + " IN A server.excl.svc.cluster.local")
	answer, err := client.UDPExchange(ctx, netip.AddrPortFrom(server.IPv4(), dnsPort), query)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(answer, query) {
		t.Errorf("UDP answer %q, want the query echoed", answer)
	}
	// Last, so that by the time its records are in, those of the others would be too.
	meshTarget := netip.AddrPortFrom(server.IPv4(), meshPort)
	exchange(t, client, meshTarget, conformance.ModeEcho, opts(markMesh))
	waitConnRecords(t, nodeA, 1, "direction", "outbound", "dst", meshTarget.String(), "mtls", "true", "result", "ok", "peer_id", server.SPIFFEID())
	waitConnRecords(t, nodeB, 1, "direction", "inbound", "dst", meshTarget.String(), "mtls", "true", "result", "ok", "peer_id", client.SPIFFEID())

	tr, err := capture.StopAndRead()
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range bypass {
		// Both directions of the echo carry the marker in clear, on the original addresses.
		hits := tr.FlowsWithClear([]byte(x.marker))
		if len(hits) != 2 {
			t.Errorf("excluded %s: the marker is in clear in %v, want both directions of one connection", x.name, hits)
		}
		for _, f := range hits {
			if (f.Src.Addr() != x.from.IPv4() || f.Dst != x.to) && (f.Src != x.to || f.Dst.Addr() != x.from.IPv4()) {
				t.Errorf("excluded %s: marker in clear in %s, want only between %s and %s", x.name, f, x.from.IPv4(), x.to)
			}
		}
		for _, n := range []*conformance.Node{nodeA, nodeB} {
			requireNoConnRecord(t, n, "excluded "+x.name, x.excluded)
		}
	}

	if hits := tr.FlowsWithClear([]byte(markMesh)); len(hits) > 0 {
		t.Errorf("the mesh port's marker is in clear: %v", hits)
	}
	meshFlows := 0
	for _, f := range conformance.WithPayload(tr.Between(client.IPv4(), server.IPv4())) {
		if f.Src.Port() != meshPort && f.Dst.Port() != meshPort {
			continue
		}
		meshFlows++
		if _, err := f.CheckTLS(); err != nil {
			t.Errorf("mesh port: %v", err)
		}
	}
	if meshFlows != 2 {
		t.Errorf("%d flows with payload on the mesh port, want the two directions of one connection", meshFlows)
	}

	// The trace keeps TCP only; the capture file holds every UDP frame whole, so the query and
	// its answer in clear are two copies of the marker in it (no TCP flow carries this one).
	raw, err := os.ReadFile(capture.Path)
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(raw, []byte(markUDP)); n < 2 {
		t.Errorf("the UDP query and answer are in clear %d times on the wire, want both", n)
	}
	for _, n := range []*conformance.Node{nodeA, nodeB} {
		requireNoConnRecord(t, n, "UDP", dstPort(dnsPort))
	}
}

// dstPort matches a connection record whose original destination has port.
func dstPort(port uint16) func(conformance.Record) bool {
	return func(r conformance.Record) bool { return recordHost(r, "dst").Port() == port }
}
