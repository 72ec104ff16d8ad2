package conformance_test

import (
	"context"
	"net/netip"
	"testing"

	"github.com/meshless/meshless/conformance"
	"github.com/meshless/meshless/pkg/enroll"
)

// TestOptOut checks which pods meshless leaves alone: pods of an excluded namespace and pods
// annotated meshless.io/inject: "false" (the annotations reach the plugin as containerd passes
// them, through the io.kubernetes.cri.pod-annotations capability). Their CNI ADD succeeds, the
// daemon records why it skipped them, their traffic crosses the wire in clear and never reaches
// a daemon, while two enrolled pods of the same node keep talking mTLS. In strict mode an enrolled
// pod refuses an opted-out pod's plaintext, as it refuses any pod outside the mesh.
func TestOptOut(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	const (
		port       = 8080
		markClear  = "MESHLESS-OPTOUT-CLEAR-5c3e"
		markMesh   = "MESHLESS-OPTOUT-MESH-5c3e"
		optOutNote = `annotation meshless.io/inject is "false"`
	)
	c := newPathsCluster(t, map[string]string{"shop/client": "client", "shop/server": "server"})
	node, err := c.AddNode(ctx, conformance.NodeConfig{DaemonArgs: []string{"--excluded-namespaces=kube-system,monitoring"}})
	if err != nil {
		t.Fatal(err)
	}
	add := func(ns, name string, annotations map[string]string) *conformance.Pod {
		p, err := node.AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: name, Annotations: annotations})
		if err != nil {
			t.Fatalf("ADD %s/%s: %v", ns, name, err)
		}
		return p
	}
	client := add("shop", "client", map[string]string{"team": "shop"})
	server := add("shop", "server", nil)
	optedOut := add("shop", "batch", map[string]string{"meshless.io/inject": "false"})
	system := add("kube-system", "dns", nil)

	api := enroll.NewClient(node.Socket)
	for _, tc := range []struct {
		pod     *conformance.Pod
		skipped string
	}{
		{client, ""}, {server, ""}, {optedOut, optOutNote}, {system, "namespace kube-system is excluded"},
	} {
		e, err := api.Get(ctx, tc.pod.ContainerID)
		if err != nil {
			t.Fatalf("%s/%s: %v", tc.pod.Namespace, tc.pod.Name, err)
		}
		if e.Skipped != tc.skipped || (tc.skipped == "") != (e.SPIFFEID != "") {
			t.Errorf("%s/%s: skipped %q with SPIFFE ID %q, want skipped %q", tc.pod.Namespace, tc.pod.Name, e.Skipped, e.SPIFFEID, tc.skipped)
		}
	}
	st, err := api.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Pods != 2 || st.Skipped != 2 {
		t.Errorf("daemon status: %d pods served, %d skipped; want 2 and 2", st.Pods, st.Skipped)
	}

	for _, p := range []*conformance.Pod{server, system} {
		if _, err := p.StartServer(ctx, port); err != nil {
			t.Fatal(err)
		}
	}
	wire, err := node.StartCapture(ctx, "optout-wire", "tcp")
	if err != nil {
		t.Fatal(err)
	}
	toSystem, toServer := netip.AddrPortFrom(system.IPv4(), port), netip.AddrPortFrom(server.IPv4(), port)
	opts := func(marker string) conformance.ClientOptions {
		return conformance.ClientOptions{Bytes: 16 << 10, Marker: marker}
	}
	exchange(t, optedOut, toSystem, conformance.ModeEcho, opts(markClear))
	requireRefused(t, optedOut, toServer, "")
	waitConnRecords(t, node, 1, "direction", "inbound", "src", hasHost(optedOut.IPv4().String()), "result", "refused")
	exchange(t, client, toServer, conformance.ModeEcho, opts(markMesh))
	waitConnRecords(t, node, 1, "direction", "inbound", "dst", toServer.String(), "mtls", "true", "result", "ok", "peer_id", client.SPIFFEID())

	tr, err := wire.StopAndRead()
	if err != nil {
		t.Fatal(err)
	}
	if hits := tr.FlowsWithClear([]byte(markClear)); len(hits) != 2 {
		t.Errorf("the opted-out pod's marker is in clear in %v, want both directions of its one connection", hits)
	}
	requireNoConnRecord(t, node, "opted-out pod to excluded namespace", func(r conformance.Record) bool {
		return recordHost(r, "dst") == toSystem
	})
	requireTLSOnly(t, tr, client.IPv4(), server.IPv4(), port, markMesh)

	// CHECK passes for a skipped pod (it has no capture to verify); DEL forgets it like any other.
	if err := optedOut.Check(ctx); err != nil {
		t.Errorf("CHECK of the opted-out pod: %v", err)
	}
	if err := optedOut.Del(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := api.Get(ctx, optedOut.ContainerID); err == nil {
		t.Error("the deleted opted-out pod is still known to the daemon")
	}
}
