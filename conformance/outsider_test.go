package conformance_test

import (
	"net/netip"
	"testing"

	"github.com/meshless/meshless/conformance"
)

// TestOutsiderAcrossNodes covers clients outside the mesh that reach a pod from elsewhere:
// plain pods on another node and a host outside the cluster (TestCoreStrict and
// TestCorePermissive cover a plain pod on the pod's own node). Their plaintext is refused by a
// strict node and forwarded by a permissive one with the client's own address, since nothing
// between nodes rewrites it. The probe exemption is the pod's own node's (TestCoreStrict shows its
// probes work): another node's connections are plaintext from outside like any other.
func TestOutsiderAcrossNodes(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	const (
		ns   = "outsider"
		port = 8080
	)
	c := newPathsCluster(t, nil)
	strict, err := c.AddNode(ctx, conformance.NodeConfig{Mode: conformance.ModeStrict})
	if err != nil {
		t.Fatal(err)
	}
	permissive, err := c.AddNode(ctx, conformance.NodeConfig{Mode: conformance.ModePermissive})
	if err != nil {
		t.Fatal(err)
	}
	ext, err := c.AddExternal(ctx)
	if err != nil {
		t.Fatal(err)
	}
	add := func(n *conformance.Node, name string, mesh bool) *conformance.Pod {
		t.Helper()
		attach := n.AddPlainPod
		if mesh {
			attach = n.AddPod
		}
		p, err := attach(ctx, conformance.PodConfig{Namespace: ns, Name: name})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	strictPod, strictPlain := add(strict, "strict-server", true), add(strict, "strict-plain", false)
	permPod, permPlain := add(permissive, "permissive-server", true), add(permissive, "permissive-plain", false)
	strictSrv, err := strictPod.StartServer(ctx, port)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := permPod.StartServer(ctx, port); err != nil {
		t.Fatal(err)
	}
	toStrict, toPerm := netip.AddrPortFrom(strictPod.IPv4(), port), netip.AddrPortFrom(permPod.IPv4(), port)

	t.Run("strict_refuses_plain_pod_on_other_node", func(t *testing.T) {
		requireRefused(t, permPlain, toStrict, "")
		waitConnRecords(t, strict, 1, "direction", "inbound", "src", hasHost(permPlain.IPv4().String()), "result", "refused", "reason")
		if got := servedFrom(t, strictSrv, permPlain.IPv4()); len(got) > 0 {
			t.Errorf("the app got the outsider's connections: %+v", got)
		}
	})

	t.Run("strict_refuses_external_host", func(t *testing.T) {
		requireRefused(t, ext, toStrict, "")
		waitConnRecords(t, strict, 1, "direction", "inbound", "src", hasHost(ext.Addr.String()), "result", "refused", "reason")
		if got := servedFrom(t, strictSrv, ext.Addr); len(got) > 0 {
			t.Errorf("the app got the external host's connections: %+v", got)
		}
	})

	t.Run("strict_refuses_other_node", func(t *testing.T) {
		// The other node's address on the underlay is not among this node's own addresses.
		requireRefused(t, permissive, toStrict, "")
		waitConnRecords(t, strict, 1, "direction", "inbound", "src", hasHost(permissive.Underlay.String()), "result", "refused", "reason")
	})

	t.Run("permissive_forwards_plain_pod_on_other_node", func(t *testing.T) {
		exchange(t, strictPlain, toPerm, conformance.ModeEcho, conformance.ClientOptions{Bytes: 256 << 10})
		res := exchange(t, strictPlain, toPerm, conformance.ModePeer, conformance.ClientOptions{})
		if got := peerAddr(t, res); got != strictPlain.IPv4() {
			t.Errorf("the app saw %s, want the outsider's own %s", got, strictPlain.IPv4())
		}
		waitConnRecords(t, permissive, 2, "direction", "inbound", "src", hasHost(strictPlain.IPv4().String()), "mtls", "false", "result", "ok")
	})

	t.Run("permissive_forwards_external_host", func(t *testing.T) {
		res := exchange(t, ext, toPerm, conformance.ModePeer, conformance.ClientOptions{})
		if got := peerAddr(t, res); got != ext.Addr {
			t.Errorf("the app saw %s, want the external host's %s", got, ext.Addr)
		}
	})
}
