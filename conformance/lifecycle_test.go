package conformance_test

// A pod's life as the runtime drives it, beyond ADD: DEL with connections open, ADD again with
// the same container ID, GC, and STATUS.

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshless/meshless/conformance"
)

const lifeNS = "life"

func newLifeNode(t *testing.T) *conformance.Node {
	t.Helper()
	needRoot(t)
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins:       binaries(t),
		NodePrefix: "mlen-",
		PodPrefix:  "mlep-",
		Workloads:  map[string]string{lifeNS + "/server": "server-sa"},
	})
	if err != nil {
		t.Fatal(err)
	}
	n, err := c.AddNode(testCtx(t), conformance.NodeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func addLifePod(t *testing.T, n *conformance.Node, cfg conformance.PodConfig) *conformance.Pod {
	t.Helper()
	cfg.Namespace = lifeNS
	p, err := n.AddPod(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// edgeConn is one open connection between two pods, both ends held by the test.
type edgeConn struct {
	client, server *conformance.Pod
	c, s           *net.TCPConn
	target         netip.AddrPort
}

// openEdgeConn opens a connection from client to a new listener in server and proves that it
// carries bytes both ways end to end.
func openEdgeConn(t *testing.T, client, server *conformance.Pod) *edgeConn {
	t.Helper()
	srv := listenEdge(t, server)
	ec := &edgeConn{client: client, server: server, target: srv.target}
	ec.c = dialEdge(t, client, srv.target)
	ec.s = srv.accept(t)
	ec.pingPong(t)
	return ec
}

func (ec *edgeConn) pingPong(t *testing.T) {
	t.Helper()
	edgeSend(t, ec.c, []byte("ping\n"))
	edgeExpect(t, ec.s, []byte("ping\n"))
	edgeSend(t, ec.s, []byte("pong\n"))
	edgeExpect(t, ec.c, []byte("pong\n"))
}

// closeOK closes both ends and checks that the daemon carried the connection over mTLS.
func (ec *edgeConn) closeOK(t *testing.T) {
	t.Helper()
	ec.c.Close()
	ec.s.Close()
	requireEdgeFlow(t, ec.client, ec.server, ec.target, "ok")
}

// edgeExchangeOK opens a connection, exchanges bytes over mTLS and closes it.
func edgeExchangeOK(t *testing.T, client, server *conformance.Pod) {
	t.Helper()
	openEdgeConn(t, client, server).closeOK(t)
}

// TestLifecycleDel deletes a pod that has connections open in both directions: both ends of each
// see them end promptly, other pods' connections on the node carry on, and the pod comes back with
// ADD under the same container ID, in its old network namespace and in a new one.
func TestLifecycleDel(t *testing.T) {
	n := newLifeNode(t)
	ctx := testCtx(t)
	victim := addLifePod(t, n, conformance.PodConfig{Name: "victim"})
	server := addLifePod(t, n, conformance.PodConfig{Name: "server"})
	bystander := addLifePod(t, n, conformance.PodConfig{Name: "bystander"})

	out := openEdgeConn(t, victim, server)      // the victim is the client
	in := openEdgeConn(t, bystander, victim)    // the victim is the server
	other := openEdgeConn(t, bystander, server) // does not involve the victim

	ends := map[string]<-chan edgeDrained{
		"victim's client socket":    edgeDrain(out.c),
		"server's side of victim's": edgeDrain(out.s),
		"bystander's client socket": edgeDrain(in.c),
		"victim's server socket":    edgeDrain(in.s),
	}
	start := time.Now()
	if err := victim.Del(ctx); err != nil {
		t.Fatal(err)
	}
	delDone := time.Since(start)
	var slowest time.Duration
	for name, ch := range ends {
		d := <-ch
		if d.err != nil && !errors.Is(d.err, syscall.ECONNRESET) {
			t.Errorf("%s: after DEL it read %q then %s (%v); want a reset or EOF", name, d.data, edgeErrKind(d.err), d.err)
			continue
		}
		t.Logf("%s: %s %v after DEL began", name, edgeErrKind(d.err), d.at.Sub(start))
		slowest = max(slowest, d.at.Sub(start))
	}
	conformance.Figure(t, "lifecycle_del_duration", edgeMillis(delDone), "ms")
	conformance.Figure(t, "lifecycle_del_last_peer_closed", edgeMillis(slowest), "ms")

	t.Run("others_unaffected", func(t *testing.T) {
		other.pingPong(t)
		other.closeOK(t)
		edgeExchangeOK(t, bystander, server)
	})

	t.Run("add_again_same_netns", func(t *testing.T) {
		old := victim.IPv4()
		if err := victim.Add(ctx); err != nil {
			t.Fatal(err)
		}
		t.Logf("re-ADD in the same netns: IP %s, was %s", victim.IPv4(), old)
		if err := victim.Check(ctx); err != nil {
			t.Errorf("CHECK after re-ADD: %v", err)
		}
		edgeExchangeOK(t, victim, server)
		edgeExchangeOK(t, bystander, victim)
	})

	t.Run("add_again_new_netns", func(t *testing.T) {
		// What a runtime actually does with a container ID: a new sandbox, so a new netns.
		if err := victim.Del(ctx); err != nil {
			t.Fatal(err)
		}
		again := addLifePod(t, n, conformance.PodConfig{Name: victim.Name, UID: victim.UID, ContainerID: victim.ContainerID})
		if err := again.Check(ctx); err != nil {
			t.Errorf("CHECK after ADD in a new netns: %v", err)
		}
		edgeExchangeOK(t, again, server)
		edgeExchangeOK(t, bystander, again)
	})
}

// TestLifecycleGC runs CNI GC twice. As a runtime normally does: libcni DELs the cached attachment
// that is not listed and the daemon forgets that pod. Then as a runtime that lost its libcni cache:
// only meshless-cni's GC can tell the daemon, which forgets the unlisted pod too; that pod keeps its
// interface and its capture rules, so its traffic is refused both ways. The listed pods are served
// throughout.
func TestLifecycleGC(t *testing.T) {
	n := newLifeNode(t)
	ctx := testCtx(t)
	client := addLifePod(t, n, conformance.PodConfig{Name: "client"})
	server := addLifePod(t, n, conformance.PodConfig{Name: "server"})
	stale := addLifePod(t, n, conformance.PodConfig{Name: "stale"})
	orphan := addLifePod(t, n, conformance.PodConfig{Name: "orphan"})
	edgeExchangeOK(t, orphan, server)
	edgeExchangeOK(t, client, orphan)

	kept := func(t *testing.T, pods ...*conformance.Pod) {
		t.Helper()
		for _, p := range pods {
			if err := p.Check(ctx); err != nil {
				t.Errorf("CHECK of %s, listed as valid: %v", p, err)
			}
		}
		edgeExchangeOK(t, client, server)
	}
	forgotten := func(t *testing.T, p *conformance.Pod, reason string) {
		t.Helper()
		wctx, cancel := context.WithTimeout(ctx, edgeWait)
		defer cancel()
		if _, err := n.WaitLog(wctx, "msg", "pod removed", "container_id", p.ContainerID, "reason", reason); err != nil {
			t.Errorf("daemon did not forget %s: %v", p, err)
		}
	}

	t.Run("runtime_with_cache", func(t *testing.T) {
		if err := n.GC(ctx, client, server, orphan); err != nil {
			t.Fatal(err)
		}
		forgotten(t, stale, "CNI DEL")
		kept(t, client, server, orphan)
	})

	t.Run("runtime_without_cache", func(t *testing.T) {
		if err := n.GCAfterCacheLoss(ctx, client, server); err != nil {
			t.Fatal(err)
		}
		forgotten(t, orphan, "CNI GC")
		kept(t, client, server)

		// Out of the orphan: its capture rules send the connection to a port nothing listens on.
		toServer := listenEdge(t, server)
		dctx, cancel := context.WithTimeout(ctx, edgeWait)
		defer cancel()
		if c, err := orphan.Dial(dctx, "tcp4", toServer.target.String()); err == nil {
			c.Close()
			t.Errorf("a forgotten pod connected out to %s", toServer.target)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("a forgotten pod's connection out: %v, want refused", err)
		}
		// Into the orphan: the client's proxy gets a reset from it and passes it on.
		toOrphan := listenEdge(t, orphan)
		if d := edgeDialDrain(t, client, toOrphan.target); !errors.Is(d.err, syscall.ECONNRESET) {
			t.Errorf("connection to a forgotten pod: read %q then %s (%v), want a reset", d.data, edgeErrKind(d.err), d.err)
		}
		// Neither application may have seen these connections.
		for _, srv := range []*edgeServer{toServer, toOrphan} {
			select {
			case s := <-srv.conns:
				t.Errorf("the app in %s got a connection from %s", srv.pod, s.RemoteAddr())
				s.Close()
			default:
			}
		}
	})
}

// TestLifecycleStatus: CNI STATUS succeeds while meshlessd serves the node and fails with code 50
// (plugin not available) while it is down, so the runtime holds new pods back.
func TestLifecycleStatus(t *testing.T) {
	n := newLifeNode(t)
	ctx := testCtx(t)
	if err := n.Status(ctx); err != nil {
		t.Fatalf("STATUS with meshlessd up: %v", err)
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	err := n.Status(ctx)
	var cniErr *types.Error
	switch {
	case err == nil:
		t.Error("STATUS succeeded with meshlessd down")
	case !errors.As(err, &cniErr) || cniErr.Code != types.ErrPluginNotAvailable:
		t.Errorf("STATUS with meshlessd down: %v, want CNI error code %d", err, types.ErrPluginNotAvailable)
	default:
		t.Logf("STATUS with meshlessd down: %v", err)
	}
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.Status(ctx); err != nil {
		t.Errorf("STATUS once meshlessd is back: %v", err)
	}
}
