package conformance_test

// Protocol edge cases through the proxy: the test plays both applications itself, with Go sockets
// inside the pods' namespaces (Pod.Dial, Pod.Listen), so that it decides exactly when each end
// writes, half-closes, resets or stays silent, and sees exactly what the other end gets. Every
// case runs between a mesh client and a mesh server on the same node and on another node.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

const (
	edgeNS = "edges"
	// edgeWait bounds every accept, read and write: an edge case that takes longer is a hang.
	edgeWait = 20 * time.Second
	// edgeIdle is how long a client stays silent: past every timeout of the data path (peek 5s,
	// handshake and dial 10s), so that none of them can be what keeps the connection open.
	edgeIdle = 12 * time.Second
)

// edgeServer is a listener in a server pod whose connections the test takes one by one.
type edgeServer struct {
	pod    *conformance.Pod
	target netip.AddrPort
	conns  chan *net.TCPConn
}

// listenEdge listens on a port the kernel picks in pod, for one connection. The listener stays
// until the cluster is torn down, so that no two connections of a test share a destination: that
// is how requireEdgeFlow finds a connection's record in the daemon's log. (The client's source port
// cannot tell them apart: the capture's NAT remaps it when an earlier connection's conntrack entry
// still holds the same one.)
func listenEdge(t *testing.T, pod *conformance.Pod) *edgeServer {
	t.Helper()
	ln, err := pod.Listen("tcp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	s := &edgeServer{pod: pod, target: netip.AddrPortFrom(pod.IPv4(), port), conns: make(chan *net.TCPConn, 4)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				// Closed at teardown, when no test takes connections any more.
				close(s.conns)
				for c := range s.conns {
					c.Close()
				}
				return
			}
			select {
			case s.conns <- c.(*net.TCPConn):
			default:
				c.Close() // more connections than any case takes
			}
		}
	}()
	return s
}

// accept returns the server's next connection: it arrives once the proxy has completed mTLS and
// connected to the app.
func (s *edgeServer) accept(t *testing.T) *net.TCPConn {
	t.Helper()
	select {
	case c := <-s.conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(edgeWait):
		t.Fatalf("no connection reached the server at %s in %s within %v", s.target, s.pod, edgeWait)
		return nil
	}
}

// dialEdge connects from the client pod, through its capture like any application.
func dialEdge(t *testing.T, from *conformance.Pod, target netip.AddrPort) *net.TCPConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), edgeWait)
	defer cancel()
	c, err := from.Dial(ctx, "tcp4", target.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// edgeSend writes b, or fails the test.
func edgeSend(t *testing.T, c net.Conn, b []byte) {
	t.Helper()
	if err := c.SetWriteDeadline(time.Now().Add(edgeWait)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(b); err != nil {
		t.Fatalf("write %d bytes from %s: %v", len(b), c.LocalAddr(), err)
	}
}

// edgeExpect reads exactly len(want) bytes and fails unless they are want.
func edgeExpect(t *testing.T, c net.Conn, want []byte) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(edgeWait)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if n, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read at %s after %d of %d bytes: %v (%s)", c.LocalAddr(), n, len(want), err, edgeErrKind(err))
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read at %s: %d bytes differ from what was sent", c.LocalAddr(), len(want))
	}
}

// edgeDrained is how a connection's read side ended.
type edgeDrained struct {
	data []byte
	err  error // nil for a clean EOF
	at   time.Time
}

// edgeDrain reads c until it ends (or edgeWait passes) in the background, so a test can measure when
// an event at the other end arrives.
func edgeDrain(c net.Conn) <-chan edgeDrained {
	ch := make(chan edgeDrained, 1)
	if err := c.SetReadDeadline(time.Now().Add(edgeWait)); err != nil {
		ch <- edgeDrained{err: err, at: time.Now()}
		return ch
	}
	go func() {
		b, err := io.ReadAll(c)
		ch <- edgeDrained{data: b, err: err, at: time.Now()}
	}()
	return ch
}

// edgeErrKind names how a read ended, for messages.
func edgeErrKind(err error) string {
	var ne net.Error
	switch {
	case err == nil, errors.Is(err, io.EOF):
		return "EOF"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout (a hang)"
	}
	return "other error"
}

// edgePayload returns n random bytes.
func edgePayload(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func edgeMillis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// requireEdgeFlow checks the client node's log record of the connection from client to dst: carried
// over mTLS to the server's identity, ended with result. The record is written when the proxy is
// done with the connection, so both ends must be closed (or reset) first.
func requireEdgeFlow(t *testing.T, client, server *conformance.Pod, dst netip.AddrPort, result string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), edgeWait)
	defer cancel()
	r, err := client.Node.WaitLog(ctx, "msg", "connection", "direction", "outbound",
		"src", hasHost(client.IPv4().String()), "dst", dst.String())
	if err != nil {
		t.Error(err)
		return
	}
	if r.String("mtls") != "true" || r.String("peer_id") != server.SPIFFEID() || r.String("result") != result {
		t.Errorf("daemon's record of %s -> %s: mtls %s, peer %q, result %q (reason %q); want mTLS to %s, result %q",
			r.String("src"), dst, r.String("mtls"), r.String("peer_id"), r.String("result"), r.String("reason"), server.SPIFFEID(), result)
	}
}

// edgeDialDrain connects from the client pod and reads until the connection ends. The proxy may
// reset it before connect has even returned; then that is how it ended.
func edgeDialDrain(t *testing.T, from *conformance.Pod, target netip.AddrPort) edgeDrained {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), edgeWait)
	defer cancel()
	c, err := from.Dial(ctx, "tcp4", target.String())
	if err != nil {
		return edgeDrained{err: err, at: time.Now()}
	}
	t.Cleanup(func() { c.Close() })
	return <-edgeDrain(c)
}

type edgeEnv struct {
	client *conformance.Pod
	// near runs on the client's node, far on the other node.
	near, far *conformance.Pod
}

func setupEdges(t *testing.T) *edgeEnv {
	t.Helper()
	needRoot(t)
	ctx := testCtx(t)
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins:       binaries(t),
		NodePrefix: "mlen-",
		PodPrefix:  "mlep-",
		Join:       conformance.JoinHostGW,
		Workloads: map[string]string{
			edgeNS + "/client": "client-sa",
			edgeNS + "/near":   "server-sa",
			edgeNS + "/far":    "server-sa",
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	var nodes []*conformance.Node
	for range 2 {
		n, err := c.AddNode(ctx, conformance.NodeConfig{})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	e := &edgeEnv{}
	for _, p := range []struct {
		pod  **conformance.Pod
		node *conformance.Node
		name string
	}{{&e.client, nodes[0], "client"}, {&e.near, nodes[0], "near"}, {&e.far, nodes[1], "far"}} {
		if *p.pod, err = p.node.AddPod(ctx, conformance.PodConfig{Namespace: edgeNS, Name: p.name}); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// TestEdges runs every edge case against a server pod on the client's node and one on another
// node (joined host-gw).
func TestEdges(t *testing.T) {
	e := setupEdges(t)
	for _, where := range []struct {
		name   string
		server *conformance.Pod
	}{{"same_node", e.near}, {"cross_node", e.far}} {
		t.Run(where.name, func(t *testing.T) {
			// The two placements share nothing but the client pod, and the silent-client case
			// waits on the clock: run them side by side.
			t.Parallel()
			for _, c := range []struct {
				name string
				run  func(*testing.T, *edgeEnv, *conformance.Pod, string)
			}{
				{"server_speaks_first", edgeServerFirst},
				{"early_close", edgeEarlyClose},
				{"half_close", edgeHalfClose},
				{"reset", edgeReset},
				{"silent_client", edgeSilentClient},
				{"closed_port", edgeClosedPort},
			} {
				t.Run(c.name, func(t *testing.T) { c.run(t, e, where.server, where.name) })
			}
		})
	}
}

// edgeServerFirst: the server writes a banner as soon as it accepts and the client reads before it
// writes anything, as SMTP, SSH or MySQL do. The client's connect completes locally, so the banner
// can only come once the proxy has set up mTLS on its own initiative, without client bytes.
func edgeServerFirst(t *testing.T, e *edgeEnv, server *conformance.Pod, where string) {
	srv := listenEdge(t, server)
	banner := []byte("220 meshless edge banner\r\n")
	start := time.Now()
	c := dialEdge(t, e.client, srv.target)
	s := srv.accept(t)
	edgeSend(t, s, banner)
	edgeExpect(t, c, banner)
	bannerLatency := time.Since(start)

	// One request and answer on the same connection: the yardstick for the banner's latency.
	start = time.Now()
	edgeSend(t, c, []byte("EHLO client\r\n"))
	edgeExpect(t, s, []byte("EHLO client\r\n"))
	edgeSend(t, s, []byte("250 ok\r\n"))
	edgeExpect(t, c, []byte("250 ok\r\n"))
	roundTrip := time.Since(start)

	conformance.Figure(t, "edge_banner_latency_"+where, edgeMillis(bannerLatency), "ms")
	conformance.Figure(t, "edge_round_trip_"+where, edgeMillis(roundTrip), "ms")
	c.Close()
	s.Close()
	requireEdgeFlow(t, e.client, server, srv.target, "ok")
}

// edgeEarlyClose: the server closes right after accepting, or right after its banner; the client
// reads what was sent and then a clean EOF: not a reset, not a hang.
func edgeEarlyClose(t *testing.T, e *edgeEnv, server *conformance.Pod, _ string) {
	for _, banner := range [][]byte{nil, []byte("bye\n")} {
		name := "after_accept"
		if banner != nil {
			name = "after_banner"
		}
		t.Run(name, func(t *testing.T) {
			srv := listenEdge(t, server)
			c := dialEdge(t, e.client, srv.target)
			s := srv.accept(t)
			if banner != nil {
				edgeSend(t, s, banner)
			}
			s.Close()
			d := <-edgeDrain(c)
			if d.err != nil || !bytes.Equal(d.data, banner) {
				t.Fatalf("client read %q then %s (%v); want %q then EOF", d.data, edgeErrKind(d.err), d.err, banner)
			}
			c.Close()
			requireEdgeFlow(t, e.client, server, srv.target, "ok")
		})
	}
}

// edgeHalfClose: one end shuts its write side and the other still sends afterwards; each end gets
// every byte and then EOF. Both orders: the client finishes first (a request then its answer), or
// the server does (a stream, then the client's late upload).
func edgeHalfClose(t *testing.T, e *edgeEnv, server *conformance.Pod, _ string) {
	const size = 256 << 10
	for _, clientFirst := range []bool{true, false} {
		name := "server_first"
		if clientFirst {
			name = "client_first"
		}
		t.Run(name, func(t *testing.T) {
			srv := listenEdge(t, server)
			c := dialEdge(t, e.client, srv.target)
			s := srv.accept(t)
			first, second := c, s
			if !clientFirst {
				first, second = s, c
			}
			one, two := edgePayload(t, size), edgePayload(t, size)

			got := edgeDrain(second)
			edgeSend(t, first, one)
			if err := first.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if d := <-got; d.err != nil || !bytes.Equal(d.data, one) {
				t.Fatalf("%s read %d of %d bytes, then %s (%v)", second.LocalAddr(), len(d.data), size, edgeErrKind(d.err), d.err)
			}

			// The other direction is still open: the answer comes after the first end's EOF.
			got = edgeDrain(first)
			edgeSend(t, second, two)
			if err := second.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if d := <-got; d.err != nil || !bytes.Equal(d.data, two) {
				t.Fatalf("%s read %d of %d bytes after its half-close, then %s (%v)", first.LocalAddr(), len(d.data), size, edgeErrKind(d.err), d.err)
			}
			c.Close()
			s.Close()
			requireEdgeFlow(t, e.client, server, srv.target, "ok")
		})
	}
}

// edgeReset: an abortive close (SO_LINGER 0, an RST) at one end mid-stream reaches the other end
// as a reset, promptly: not as a clean EOF, which would pass a truncated stream off as complete.
func edgeReset(t *testing.T, e *edgeEnv, server *conformance.Pod, where string) {
	for _, byServer := range []bool{true, false} {
		who := "client"
		if byServer {
			who = "server"
		}
		t.Run("by_"+who, func(t *testing.T) {
			srv := listenEdge(t, server)
			c := dialEdge(t, e.client, srv.target)
			s := srv.accept(t)
			// Bytes flow one way first, so the reset comes mid-stream.
			resetter, peer := s, c
			if !byServer {
				resetter, peer = c, s
			}
			chunk := edgePayload(t, 32<<10)
			edgeSend(t, resetter, chunk)
			edgeExpect(t, peer, chunk)

			got := edgeDrain(peer)
			if err := resetter.SetLinger(0); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			resetter.Close()
			d := <-got
			if !errors.Is(d.err, syscall.ECONNRESET) {
				t.Fatalf("after the %s's reset, %s read %d more bytes then %s (%v); want a reset", who, peer.LocalAddr(), len(d.data), edgeErrKind(d.err), d.err)
			}
			conformance.Figure(t, "edge_reset_by_"+who+"_"+where, edgeMillis(d.at.Sub(start)), "ms")
			peer.Close()
			requireEdgeFlow(t, e.client, server, srv.target, "reset")
		})
	}
}

// edgeSilentClient: a client that connects and says nothing while the server waits for its
// request keeps its connection (no proxy timeout applies once mTLS is up) and is served when it
// finally speaks; a client that connects and closes without a byte gives the server a clean EOF.
func edgeSilentClient(t *testing.T, e *edgeEnv, server *conformance.Pod, _ string) {
	t.Run("speaks_late", func(t *testing.T) {
		srv := listenEdge(t, server)
		c := dialEdge(t, e.client, srv.target)
		s := srv.accept(t)
		if err := s.SetReadDeadline(time.Now().Add(edgeIdle + edgeWait)); err != nil {
			t.Fatal(err)
		}
		req := make(chan edgeDrained, 1)
		go func() {
			b := make([]byte, 64)
			n, err := s.Read(b)
			req <- edgeDrained{data: b[:n], err: err, at: time.Now()}
		}()
		select {
		case d := <-req:
			t.Fatalf("while the client was silent the server read %q, %s (%v)", d.data, edgeErrKind(d.err), d.err)
		case <-time.After(edgeIdle):
		}
		edgeSend(t, c, []byte("late request\n"))
		if d := <-req; d.err != nil || string(d.data) != "late request\n" {
			t.Fatalf("after %v of silence the server read %q, %s (%v)", edgeIdle, d.data, edgeErrKind(d.err), d.err)
		}
		edgeSend(t, s, []byte("served\n"))
		edgeExpect(t, c, []byte("served\n"))
		c.Close()
		s.Close()
		requireEdgeFlow(t, e.client, server, srv.target, "ok")
	})

	t.Run("closes_without_sending", func(t *testing.T) {
		srv := listenEdge(t, server)
		c := dialEdge(t, e.client, srv.target)
		// Closed at once: the proxy may still be setting up mTLS when the client's FIN arrives.
		c.Close()
		s := srv.accept(t)
		if d := <-edgeDrain(s); d.err != nil || len(d.data) > 0 {
			t.Fatalf("server read %q then %s (%v); want EOF and no data", d.data, edgeErrKind(d.err), d.err)
		}
		s.Close()
		requireEdgeFlow(t, e.client, server, srv.target, "ok")
	})
}

// edgeClosedPort: nothing listens on the port in the server pod. The client's connect succeeds
// locally (at the proxy), so the refusal must come back as a prompt reset.
func edgeClosedPort(t *testing.T, e *edgeEnv, server *conformance.Pod, where string) {
	// A port the kernel just picked as free in the server pod, closed again.
	ln, err := server.Listen("tcp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(server.IPv4(), uint16(ln.Addr().(*net.TCPAddr).Port))
	ln.Close()
	start := time.Now()
	d := edgeDialDrain(t, e.client, target)
	if !errors.Is(d.err, syscall.ECONNRESET) {
		t.Fatalf("closed port: the client read %q then %s (%v); want a reset", d.data, edgeErrKind(d.err), d.err)
	}
	conformance.Figure(t, "edge_closed_port_reset_"+where, edgeMillis(d.at.Sub(start)), "ms")
	requireEdgeFlow(t, e.client, server, target, "reset")
}
