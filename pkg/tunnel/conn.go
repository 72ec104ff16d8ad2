package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshless/meshless/pkg/capture"
	meshtls "github.com/meshless/meshless/pkg/tls"
)

// Results written to the connection log.
const (
	resultOK              = "ok"
	resultReset           = "reset"
	resultRefused         = "refused"
	resultDialFailed      = "dial_failed"
	resultHandshakeFailed = "handshake_failed"
)

// The directions of a proxied connection, as the connection log names them: the pod's app opened
// it, or it arrived for the pod.
const (
	dirOutbound = "outbound"
	dirInbound  = "inbound"
)

// flow is the log record of one proxied connection.
type flow struct {
	direction string
	src, dst  netip.AddrPort
	peer      spiffeid.ID
	mtls      bool
	// group and resumed describe the TLS handshake: the key exchange
	// (X25519MLKEM768 unless post-quantum is off) and whether a session ticket
	// saved the certificate exchange.
	group    tls.CurveID
	resumed  bool
	start    time.Time
	up, down int64
}

// handshook records what the verified handshake of f established, and counts it.
func (t *PodTunnel) handshook(f *flow, cs tls.ConnectionState) {
	f.peer, _ = meshtls.PeerID(cs)
	f.group = cs.CurveID
	f.resumed = cs.DidResume
	t.proxy.stats.handshake(f.direction, f.resumed)
}

func (t *PodTunnel) finish(f *flow, result string, reason error) {
	stats := &t.proxy.stats
	stats.Total.Add(1)
	if result != resultOK {
		stats.Failed.Add(1)
	}
	if !f.mtls && result == resultOK {
		stats.Plaintext.Add(1)
	}
	attrs := []slog.Attr{
		slog.String("direction", f.direction),
		slog.String("src", f.src.String()),
		slog.String("dst", f.dst.String()),
		slog.Bool("mtls", f.mtls),
		slog.Int64("client_bytes", f.up),
		slog.Int64("server_bytes", f.down),
		slog.Duration("duration", time.Since(f.start)),
		slog.String("result", result),
	}
	if !f.peer.IsZero() {
		attrs = append(attrs, slog.String("peer_id", f.peer.String()),
			slog.String("tls_group", f.group.String()), slog.Bool("tls_resumed", f.resumed))
	}
	level := slog.LevelInfo
	if reason != nil {
		attrs = append(attrs, slog.String("reason", reason.Error()))
		if result != resultOK {
			level = slog.LevelWarn
		}
	}
	t.log.LogAttrs(context.Background(), level, "connection", attrs...)
}

// outbound carries one connection that the pod's app opened: over mTLS as the
// pod's identity when the destination is in the mesh, in plaintext otherwise
// (unless egress is strict).
func (t *PodTunnel) outbound(app *net.TCPConn) {
	f, ok := t.begin(dirOutbound, app)
	if !ok {
		return
	}
	dst := f.dst
	cfg := &t.proxy.cfg
	f.mtls = cfg.inMesh(dst.Addr())
	if !f.mtls && cfg.StrictEgress {
		t.refuse(app, f, resultRefused, errors.New("destination outside the mesh and egress is strict"))
		return
	}

	// The dial and the handshake share one goroutine of their own (see onOwnStack and dialIn).
	var (
		up   *net.TCPConn
		conn *tls.Conn
		err  error
	)
	onOwnStack(func() {
		if up, err = t.dialContext(netip.Addr{}, dst, true); err != nil || !f.mtls {
			return
		}
		conn = tls.Client(&batchConn{TCPConn: up}, cfg.TLS.Client(t.pod.ID))
		err = handshake(conn, cfg.HandshakeTimeout)
	})
	if up == nil {
		t.refuse(app, f, resultDialFailed, err)
		return
	}
	defer t.untrack(up)
	abort := func() { reset(app); reset(up) }

	if !f.mtls {
		f.up, f.down, err = relay(app, up, abort)
		t.finish(f, relayResult(err), err)
		return
	}
	if err != nil {
		abort()
		t.finish(f, resultHandshakeFailed, err)
		return
	}
	t.handshook(f, conn.ConnectionState())
	f.up, f.down, err = relay(app, conn, abort)
	t.finish(f, relayResult(err), err)
}

// inbound carries one connection that arrived for the pod: mTLS with
// meshless's ALPN is terminated as the pod's identity; anything else is
// plaintext from outside the mesh, refused in strict mode.
func (t *PodTunnel) inbound(client *net.TCPConn) {
	f, ok := t.begin(dirInbound, client)
	if !ok {
		return
	}
	cfg := &t.proxy.cfg
	// The handshake, which tells meshless mTLS from the rest, and the dial to the app share one
	// goroutine of their own (see onOwnStack and dialIn).
	var (
		// result is set when the connection ends before the relay.
		result string
		mesh   bool
		seen   []byte
		conn   *tls.Conn
		app    *net.TCPConn
		err    error
	)
	onOwnStack(func() {
		conn, mesh, seen, err = serverHandshake(&batchConn{TCPConn: client}, cfg.TLS.Server(t.pod.ID), cfg.PeekTimeout, cfg.HandshakeTimeout)
		switch {
		case mesh && err != nil:
			result = resultHandshakeFailed
			return
		case mesh:
		case errors.Is(err, io.EOF):
			// Closed without a byte: nothing to carry.
			result, err = resultOK, nil
			return
		case err != nil && !(errors.Is(err, os.ErrDeadlineExceeded) && cfg.Mode == Permissive):
			// A silent client may be waiting for a server-speaks-first protocol;
			// only permissive mode lets such plaintext through.
			result = resultRefused
			return
		case cfg.Mode == Strict:
			result, err = resultRefused, errors.New("plaintext or non-meshless TLS in strict mode")
			return
		}
		if app, err = t.dialContext(f.src.Addr(), f.dst, false); err != nil {
			result = resultDialFailed
			if isRefused(err) {
				result = resultReset
			}
		}
	})
	f.mtls = mesh
	switch result {
	case "":
	case resultOK:
		client.Close()
		t.finish(f, resultOK, nil)
		return
	default:
		t.refuse(client, f, result, err)
		return
	}
	var from stream = client
	if mesh {
		t.handshook(f, conn.ConnectionState())
		from = conn
	}
	t.toApp(f, client, from, app, seen)
}

// toApp relays between the client and the app, to which app is connected on the original port
// from the client's own address (so the app sees the real peer); pending are bytes that the
// client sent already.
func (t *PodTunnel) toApp(f *flow, raw *net.TCPConn, client stream, app *net.TCPConn, pending []byte) {
	defer t.untrack(app)
	abort := func() { reset(raw); reset(app) }
	if len(pending) > 0 {
		if _, err := app.Write(pending); err != nil {
			abort()
			t.finish(f, resultReset, err)
			return
		}
	}
	var err error
	f.up, f.down, err = relay(client, app, abort)
	f.up += int64(len(pending))
	t.finish(f, relayResult(err), err)
}

// dialContext dials from the pod's netns within the dial timeout (see dial).
func (t *PodTunnel) dialContext(local netip.Addr, dst netip.AddrPort, remote bool) (*net.TCPConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), t.proxy.cfg.DialTimeout)
	defer cancel()
	return t.dial(ctx, local, dst, remote)
}

// begin opens the record of an accepted connection and finds where it was
// going. A connection without an original destination (it was not redirected,
// say the app dialled the capture port on loopback) or aimed at a capture port
// of another pod is refused: proxying it would loop.
func (t *PodTunnel) begin(direction string, c *net.TCPConn) (*flow, bool) {
	f := &flow{direction: direction, src: addrPort(c.RemoteAddr()), start: time.Now()}
	dst, err := originalDst(c)
	if err == nil && (dst.Port() == capture.OutboundPort || dst.Port() == capture.InboundPort) {
		err = errors.New("destination is a meshless capture port")
	}
	if err != nil {
		t.refuse(c, f, resultRefused, err)
		return nil, false
	}
	f.dst = dst
	return f, true
}

// refuse resets the connection the pod's side opened and logs why.
func (t *PodTunnel) refuse(c *net.TCPConn, f *flow, result string, reason error) {
	reset(c)
	t.finish(f, result, reason)
}

func relayResult(err error) string {
	if err != nil {
		return resultReset
	}
	return resultOK
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// handshake runs the TLS handshake of c within timeout. It needs a deep stack: callers run it on
// one of its own (see onOwnStack).
func handshake(c *tls.Conn, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return c.HandshakeContext(ctx)
}

// onOwnStack runs f on a goroutine of its own and waits for it. Parsing a ClientHello and running
// a handshake need a deep stack (certificate checks, key exchange), while relaying needs a shallow
// one for as long as the connection lives. A grown stack only shrinks at a collection, which an
// idle daemon rarely runs, so the deep work done on the connection's own goroutine would leave
// every long-lived connection holding it.
func onOwnStack(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}
