package conformance_test

import (
	"bytes"
	"io"
	"net/netip"
	"testing"

	"github.com/meshless/meshless/conformance"
	"github.com/meshless/meshless/conformance/internal/testproto"
)

// TestEgress sends pods' traffic to a host outside every mesh CIDR (the internet, from the
// cluster's point of view). By default meshless passes it through untouched: the external server
// gets the app's exact bytes from the pod's own address, in clear, because it could not answer
// mTLS. A node with --strict-egress refuses it instead, before anything leaves the pod, while its
// mesh traffic keeps flowing.
func TestEgress(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	const (
		ns     = "egress"
		port   = 8080
		marker = "MESHLESS-EGRESS-MARKER-3f0a"
	)
	c := newPathsCluster(t, nil)
	open, err := c.AddNode(ctx, conformance.NodeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	strict, err := c.AddNode(ctx, conformance.NodeConfig{DaemonArgs: []string{"--strict-egress"}})
	if err != nil {
		t.Fatal(err)
	}
	podOpen, err := open.AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: "a"})
	if err != nil {
		t.Fatal(err)
	}
	podStrict, err := strict.AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: "b"})
	if err != nil {
		t.Fatal(err)
	}
	ext, err := c.AddExternal(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c.MeshCIDRs()[0].Contains(ext.Addr) {
		t.Fatalf("the external host %s is inside the mesh CIDR %s", ext.Addr, c.MeshCIDRs()[0])
	}
	srv, err := ext.StartServer(ctx, port)
	if err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(ext.Addr, port)

	t.Run("passthrough", func(t *testing.T) {
		const size = 64 << 10
		capture, err := ext.StartCapture(testCtx(t), "egress-open", "tcp")
		if err != nil {
			t.Fatal(err)
		}
		exchange(t, podOpen, target, conformance.ModeEcho, conformance.ClientOptions{Bytes: size, Marker: marker})
		tr, err := capture.StopAndRead()
		if err != nil {
			t.Fatal(err)
		}
		// What reached the server is exactly what the app wrote (the command line, then the
		// payload), from the pod's own address: not TLS, not rewritten, not NATed.
		payload, err := io.ReadAll(testproto.NewPayload(size, marker))
		if err != nil {
			t.Fatal(err)
		}
		flows := conformance.WithPayload(tr.Between(podOpen.IPv4(), ext.Addr))
		if len(flows) != 2 {
			t.Fatalf("flows between the pod and the external host: %v, want one connection", flows)
		}
		for _, f := range flows {
			want := payload // the echo, back to the pod
			if f.Dst == target {
				want = append([]byte(conformance.ModeEcho+"\n"), payload...)
			}
			if !bytes.Equal(f.Data, want) || f.Missing > 0 {
				t.Errorf("%s: the bytes on the wire are not the app's own", f)
			}
			if _, err := f.CheckTLS(); err == nil {
				t.Errorf("%s parses as TLS", f)
			}
		}
		if hits := tr.FlowsWithClear([]byte(marker)); len(hits) != 2 {
			t.Errorf("the marker is in clear in %v, want both directions", hits)
		}
		if got := waitServed(t, podOpen.IPv4(), 1, srv); len(got[0]) == 0 {
			t.Error("the external server saw no connection from the pod's address")
		}
		waitConnRecords(t, open, 1, "direction", "outbound", "dst", target.String(), "src", hasHost(podOpen.IPv4().String()),
			"mtls", "false", "result", "ok")
	})

	t.Run("strict_egress_refused", func(t *testing.T) {
		capture, err := ext.StartCapture(testCtx(t), "egress-strict", "host "+podStrict.IPv4().String())
		if err != nil {
			t.Fatal(err)
		}
		requireRefused(t, podStrict, target, marker)
		recs := waitConnRecords(t, strict, 1, "direction", "outbound", "dst", target.String(), "result", "refused")
		if reason := recs[0].String("reason"); !containsAny(reason, "egress") {
			t.Errorf("refusal reason %q does not name strict egress", reason)
		}
		tr, err := capture.StopAndRead()
		if err != nil {
			t.Fatal(err)
		}
		if len(tr.Packets) > 0 || tr.NonTCP > 0 {
			t.Errorf("%d packets from or to the pod reached the external host: %v", len(tr.Packets)+tr.NonTCP, tr.Flows)
		}
		if got := servedFrom(t, srv, podStrict.IPv4()); len(got) > 0 {
			t.Errorf("the external server got connections from the pod: %+v", got)
		}
	})

	t.Run("strict_egress_keeps_mesh", func(t *testing.T) {
		if _, err := podOpen.StartServer(testCtx(t), port); err != nil {
			t.Fatal(err)
		}
		exchange(t, podStrict, netip.AddrPortFrom(podOpen.IPv4(), port), conformance.ModeEcho, conformance.ClientOptions{Bytes: 64 << 10})
		waitConnRecords(t, strict, 1, "direction", "outbound", "dst", hasHost(podOpen.IPv4().String()),
			"mtls", "true", "result", "ok", "peer_id", podOpen.SPIFFEID())
	})
}
