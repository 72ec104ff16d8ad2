package conformance_test

import (
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/meshless/meshless/conformance"
)

// TestForeign joins a node that does not belong to the cluster's trust: one whose daemon mints
// from another CA, and one in another trust domain under the same CA. Connections between a pod
// there and a pod on a cluster node fail in both directions: the client is reset, the app on the
// other side gets nothing, only TLS handshake records cross the wire, and both daemons log the
// failed handshake with a reason that names what was wrong.
func TestForeign(t *testing.T) {
	needRoot(t)
	const (
		ns     = "foreign"
		port   = 8080
		marker = "MESHLESS-FOREIGN-MARKER-c45e"
		// requireRefused's payload
		payloadSize = 16 << 10
	)
	for _, tc := range []struct {
		name string
		node func(t *testing.T, c *conformance.Cluster) conformance.NodeConfig
		// words of which the client side's reason must name one
		reason []string
	}{
		{
			name: "other_ca",
			node: func(t *testing.T, c *conformance.Cluster) conformance.NodeConfig {
				dir := filepath.Join(c.Dir, "other-ca")
				if err := conformance.InitCA(testCtx(t), c.Config.Bins, dir); err != nil {
					t.Fatal(err)
				}
				return conformance.NodeConfig{CADir: dir}
			},
			reason: []string{"certificate", "authority"},
		},
		{
			name: "other_trust_domain",
			node: func(*testing.T, *conformance.Cluster) conformance.NodeConfig {
				return conformance.NodeConfig{TrustDomain: "other.example"}
			},
			reason: []string{"trust domain"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			c := newPathsCluster(t, map[string]string{ns + "/home": "home", ns + "/stranger": "stranger"})
			home, err := c.AddNode(ctx, conformance.NodeConfig{})
			if err != nil {
				t.Fatal(err)
			}
			away, err := c.AddNode(ctx, tc.node(t, c))
			if err != nil {
				t.Fatal(err)
			}
			type end struct {
				node *conformance.Node
				pod  *conformance.Pod
				srv  *conformance.Process
			}
			var ends []end
			for _, x := range []struct {
				node *conformance.Node
				name string
			}{{home, "home"}, {away, "stranger"}} {
				p, err := x.node.AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: x.name})
				if err != nil {
					t.Fatal(err)
				}
				srv, err := p.StartServer(ctx, port)
				if err != nil {
					t.Fatal(err)
				}
				ends = append(ends, end{x.node, p, srv})
			}

			capture, err := conformance.StartCapture(ctx, t, home.Dir, "foreign-wire", home.Netns, home.PodInterface(), "tcp")
			if err != nil {
				t.Fatal(err)
			}
			for i, from := range ends {
				to := ends[1-i]
				target := netip.AddrPortFrom(to.pod.IPv4(), port)
				requireRefused(t, from.pod, target, marker)
				out := waitConnRecords(t, from.node, 1, "direction", "outbound", "dst", target.String(), "result", "handshake_failed")
				if r := out[0].String("reason"); !containsAny(r, tc.reason...) {
					t.Errorf("%s -> %s: the client side's reason %q names none of %q", from.pod, to.pod, r, tc.reason)
				}
				in := waitConnRecords(t, to.node, 1, "direction", "inbound", "src", hasHost(from.pod.IPv4().String()), "result", "handshake_failed")
				if r := in[0].String("reason"); !containsAny(r, "certificate", "trust domain") {
					t.Errorf("%s -> %s: the server side's reason %q names neither the certificate nor the trust domain", from.pod, to.pod, r)
				}
				if got := servedFrom(t, to.srv, from.pod.IPv4()); len(got) > 0 {
					t.Errorf("%s -> %s: the app got connections: %+v", from.pod, to.pod, got)
				}
				t.Logf("%s -> %s refused; client side: %s; server side: %s", from.pod, to.pod, out[0].String("reason"), in[0].String("reason"))
			}
			tr, err := capture.StopAndRead()
			if err != nil {
				t.Fatal(err)
			}
			if hits := tr.FlowsWithClear([]byte(marker)); len(hits) > 0 {
				t.Errorf("marker in clear on the wire: %v", hits)
			}
			flows := conformance.WithPayload(tr.Between(ends[0].pod.IPv4(), ends[1].pod.IPv4()))
			if len(flows) == 0 {
				t.Error("no handshake crossed the wire")
			}
			for _, f := range flows {
				if _, err := f.CheckTLS(); err != nil {
					t.Error(err)
				}
				// The handshake fails before the client's data may go: not even its encrypted
				// form crosses (a handshake is a few KiB, the payload more).
				if len(f.Data) >= payloadSize {
					t.Errorf("%s carries as many bytes as the refused payload", f)
				}
			}
		})
	}
}
