package conformance_test

import (
	"net/netip"
	"testing"

	"github.com/meshless/meshless/conformance"
)

// Both ways of joining nodes carry plain pod traffic across nodes, dual-stack, and an external
// host outside the pod CIDRs reaches pods and is reached by them.
func TestHarnessJoin(t *testing.T) {
	needRoot(t)
	for _, join := range []conformance.Join{conformance.JoinHostGW, conformance.JoinVXLAN} {
		t.Run(string(join), func(t *testing.T) {
			ctx := testCtx(t)
			c, err := conformance.NewCluster(t, conformance.ClusterConfig{
				Bins: harnessBinaries(t), IPv6: true, Join: join,
				NodePrefix: "mlhjn-", PodPrefix: "mlhjp-",
			})
			if err != nil {
				t.Fatal(err)
			}
			var pods []*conformance.Pod
			for i := range 2 {
				n, err := c.AddNode(ctx, conformance.NodeConfig{NoDaemon: true})
				if err != nil {
					t.Fatal(err)
				}
				p, err := n.AddPlainPod(ctx, conformance.PodConfig{Namespace: "join", Name: []string{"a", "b"}[i]})
				if err != nil {
					t.Fatal(err)
				}
				pods = append(pods, p)
			}
			ext, err := c.AddExternal(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := pods[1].StartServer(ctx, 8080); err != nil {
				t.Fatal(err)
			}
			for _, dst := range []netip.Addr{pods[1].IPv4(), pods[1].IPv6()} {
				exchange(t, pods[0], netip.AddrPortFrom(dst, 8080), conformance.ModeEcho, conformance.ClientOptions{Bytes: 1 << 20})
				peer := exchange(t, pods[0], netip.AddrPortFrom(dst, 8080), conformance.ModePeer, conformance.ClientOptions{})
				want := pods[0].IPv4()
				if dst.Is6() {
					want = pods[0].IPv6()
				}
				if got := peerAddr(t, peer); got != want {
					t.Errorf("server saw %s, want the client pod's %s (no NAT between nodes)", got, want)
				}
			}
			for _, dst := range []netip.Addr{pods[1].IPv4(), pods[1].IPv6()} {
				out, err := conformance.Exec(ctx, ext.Netns, "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "http://"+netip.AddrPortFrom(dst, 8080).String()+"/")
				if err != nil || string(out) != "200" {
					t.Errorf("external host to pod %s: %q, %v", dst, out, err)
				}
			}
		})
	}
}
