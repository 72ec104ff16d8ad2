package conformance_test

// One node's meshlessd restarted (stopped with SIGTERM, or killed with SIGKILL, then started)
// while a client keeps exchanging across nodes (issue 3): the wire between the nodes never
// carries anything but TLS, exchanges fail only while the daemon is down and then fail closed
// (refused or reset, never in plaintext), and traffic flows again once it is back.

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

const (
	restartNS     = "restart"
	restartMarker = "MESHLESS-RESTART-MARKER-c40e"
	// restartBytes per exchange: a few TLS records each way, and the marker in every 4 KiB.
	restartBytes = 16 << 10
)

func TestDaemonRestartAcrossNodes(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins: binaries(t), NodePrefix: "mlxn-", PodPrefix: "mlxp-",
		Workloads: map[string]string{restartNS + "/client": "client-sa", restartNS + "/server": "server-sa"},
	})
	if err != nil {
		t.Fatal(err)
	}
	var nodes [2]*conformance.Node
	for i := range nodes {
		if nodes[i], err = c.AddNode(ctx, conformance.NodeConfig{}); err != nil {
			t.Fatal(err)
		}
	}
	client, err := nodes[0].AddPod(ctx, conformance.PodConfig{Namespace: restartNS, Name: "client"})
	if err != nil {
		t.Fatal(err)
	}
	server, err := nodes[1].AddPod(ctx, conformance.PodConfig{Namespace: restartNS, Name: "server"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := server.StartServer(ctx, xPort); err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(server.IPv4(), xPort)
	for _, side := range []struct {
		name string
		node *conformance.Node
	}{{"client_node", nodes[0]}, {"server_node", nodes[1]}} {
		// A stopping meshlessd resets the connections it carries. A killed one cannot: the
		// kernel closes its sockets, with a FIN where nothing was left unread, so an exchange
		// in flight may also end early without an error.
		for _, stop := range []struct {
			name  string
			do    func() error
			cutOK bool
		}{{"sigterm", side.node.Stop, false}, {"sigkill", side.node.Kill, true}} {
			name := side.name + "_" + stop.name
			t.Run(name, func(t *testing.T) {
				restartUnderLoad(t, name, client, server, target, side.node, stop.do, stop.cutOK)
			})
		}
	}
}

// restartUnderLoad stops node's daemon with stop and starts it again while client exchanges
// with target in a loop, capturing on the client node's link to the other node all along.
// cutOK accepts exchanges that ended early without an error besides refusals and resets.
func restartUnderLoad(t *testing.T, name string, client, server *conformance.Pod, target netip.AddrPort, node *conformance.Node, stop func() error, cutOK bool) {
	ctx := testCtx(t)
	capture, err := startWireCapture(ctx, t, client.Node, "restart-"+name)
	if err != nil {
		t.Fatal(err)
	}
	l := startClientLoop(client, target)
	defer l.stop()
	l.waitSuccesses(t, time.Time{}, 3)

	downAt := time.Now()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	stoppedAt := time.Now()
	// Let the loop run into the stopped daemon for a while.
	time.Sleep(time.Second)
	startAt := time.Now()
	if err := node.Start(ctx); err != nil {
		t.Fatal(err)
	}
	upAt := time.Now()
	first := l.waitSuccesses(t, startAt, 1)
	l.waitSuccesses(t, upAt, 3)
	attempts := l.stop()
	conformance.Figure(t, "restart_"+name+"_start_to_ready", upAt.Sub(startAt).Seconds(), "s")
	conformance.Figure(t, "restart_"+name+"_start_to_first_exchange", first.Sub(startAt).Seconds(), "s")

	var failed int
	kinds := map[string]int{}
	for _, a := range attempts {
		switch {
		case a.err != nil:
			t.Errorf("attempt at %s: %v", a.start.Format(time.StampMicro), a.err)
		case a.ok():
			if a.start.After(stoppedAt) && a.end.Before(startAt) {
				t.Errorf("an exchange succeeded while meshlessd was down (%s .. %s): %+v", a.start.Format(time.StampMicro), a.end.Format(time.StampMicro), a.res)
			}
		default:
			failed++
			kinds[a.res.ErrorKind]++
			if !a.start.Before(upAt) || !a.end.After(downAt) {
				t.Errorf("an exchange failed while meshlessd was running (%s .. %s, down %s .. %s): %+v",
					a.start.Format(time.StampMicro), a.end.Format(time.StampMicro), downAt.Format(time.StampMicro), upAt.Format(time.StampMicro), a.res)
			}
			// Fail closed and at once: refused or reset, never a hang.
			k := a.res.ErrorKind
			cut := k == conformance.KindEOF || k == ""
			if k != conformance.KindRefused && k != conformance.KindReset && !(cutOK && cut) {
				t.Errorf("an exchange failed as %q, want refused or reset: %+v", k, a.res)
			}
		}
	}
	if failed == 0 {
		t.Error("no exchange failed while meshlessd was down: did the loop run into the outage?")
	}
	t.Logf("%d exchanges, %d failed while meshlessd was down (by kind: %v)", len(attempts), failed, kinds)

	tr, err := capture.StopAndRead()
	if err != nil {
		t.Fatal(err)
	}
	if hits := tr.FlowsWithClear([]byte(restartMarker)); len(hits) > 0 {
		t.Errorf("marker in clear on the wire: %v", hits)
	}
	flows := conformance.WithPayload(tr.Between(client.IPv4(), server.IPv4()))
	if len(flows) == 0 {
		t.Fatal("no payload between the pods in the capture")
	}
	for _, f := range flows {
		if f.Src.Port() != xPort && f.Dst.Port() != xPort {
			t.Errorf("flow %s is not on the application's port %d", f, xPort)
		}
		if err := checkTLSCut(f); err != nil {
			t.Error(err)
		}
	}

	// The restarted daemon knows the identities again.
	clientSince, serverSince := logLen(t, client.Node), logLen(t, server.Node)
	exchange(t, client, target, conformance.ModeEcho, conformance.ClientOptions{Bytes: restartBytes, Marker: restartMarker})
	requireIdentities(t, client, server, target, clientSince, serverSince, 1)
}

// checkTLSCut checks that a flow carries TLS records only. A connection the daemon's death cut
// may stop inside a record: the last record may then be incomplete, but as far as it got, its
// header must still be a TLS header.
func checkTLSCut(f *conformance.Flow) error {
	if f.Missing > 0 {
		return fmt.Errorf("%s: the capture lost %d bytes of this flow", f, f.Missing)
	}
	off := 0
	for off+5 <= len(f.Data) {
		n := int(binary.BigEndian.Uint16(f.Data[off+3 : off+5]))
		if off+5+n > len(f.Data) {
			break
		}
		off += 5 + n
	}
	if _, err := conformance.CheckTLS(f.Data[:off]); err != nil {
		return fmt.Errorf("%s: %w", f, err)
	}
	rest := f.Data[off:]
	if len(rest) == 0 {
		return nil
	}
	if !f.FIN && !f.RST {
		return fmt.Errorf("%s: %d bytes after the last whole TLS record, and the connection did not end", f, len(rest))
	}
	if ct := rest[0]; ct < conformance.TLSChangeCipherSpec || ct > conformance.TLSApplicationData {
		return fmt.Errorf("%s: byte %d: content type 0x%02x is not TLS", f, off, ct)
	}
	if len(rest) >= 3 && (rest[1] != 3 || (rest[2] != 3 && rest[2] != 1)) {
		return fmt.Errorf("%s: byte %d: record version 0x%02x%02x is not TLS", f, off, rest[1], rest[2])
	}
	return nil
}

// attempt is one exchange of the client loop.
type attempt struct {
	start, end time.Time
	res        conformance.ClientResult
	err        error // running the client failed (not the exchange)
}

func (a attempt) ok() bool { return a.err == nil && a.res.Match && a.res.Error == "" }

// clientLoop runs exchanges from a pod back to back until stopped.
type clientLoop struct {
	mu       sync.Mutex
	attempts []attempt
	stopping atomic.Bool
	done     chan struct{}
}

func startClientLoop(client *conformance.Pod, target netip.AddrPort) *clientLoop {
	l := &clientLoop{done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for !l.stopping.Load() {
			a := attempt{start: time.Now()}
			// The deadline only bounds a hang, which the test then reports as a timeout.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			a.res, a.err = client.Client(ctx, target, conformance.ModeEcho, conformance.ClientOptions{
				Bytes: restartBytes, Marker: restartMarker, Timeout: 10 * time.Second,
			})
			cancel()
			a.end = time.Now()
			l.mu.Lock()
			l.attempts = append(l.attempts, a)
			l.mu.Unlock()
			// Failures are immediate while the daemon is down: do not spin.
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return l
}

// waitSuccesses waits until n exchanges that started after since have succeeded, and returns
// the end of the first of them.
func (l *clientLoop) waitSuccesses(t *testing.T, since time.Time, n int) time.Time {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		l.mu.Lock()
		var ends []time.Time
		var last attempt
		for _, a := range l.attempts {
			if !a.start.Before(since) && a.ok() {
				ends = append(ends, a.end)
			}
			last = a
		}
		l.mu.Unlock()
		if len(ends) >= n {
			return ends[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d exchanges succeeded since %s; the last: %+v %v", len(ends), n, since.Format(time.StampMicro), last.res, last.err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop ends the loop after its current exchange and returns every attempt.
func (l *clientLoop) stop() []attempt {
	l.stopping.Store(true)
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.attempts
}
