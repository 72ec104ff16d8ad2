package tunnel

import (
	"context"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshless/meshless/pkg/capture"
)

// The connections accepted on the inbound port get their keep-alive settings from the listener
// (Linux copies them at accept), those on the outbound port none; both carry the daemon's mark.
func TestListenConfigKeepAlive(t *testing.T) {
	needRoot(t) // SO_MARK
	for _, inbound := range []bool{true, false} {
		t.Run(map[bool]string{true: "inbound", false: "outbound"}[inbound], func(t *testing.T) {
			_, c := captureListenerPair(t, inbound, net.Dialer{})
			checkSockopts(t, c, wantSockopts(inbound))
		})
	}
}

// captureListenerPair listens on loopback as a capture port does and returns a connection that d
// dialled to it, and the connection accepted; all are closed when the test ends.
func captureListenerPair(t *testing.T, inbound bool, d net.Dialer) (client, accepted *net.TCPConn) {
	t.Helper()
	lc := listenConfig(inbound)
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	c, err := d.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return c.(*net.TCPConn), a.(*net.TCPConn)
}

// needMultipathTCP skips the test on a kernel that cannot make an MPTCP socket: a client's
// MPTCP would silently be plain TCP there, and the test would prove nothing.
func needMultipathTCP(t *testing.T) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_MPTCP)
	if err != nil {
		t.Skipf("the kernel makes no MPTCP socket: %v", err)
	}
	unix.Close(fd)
}

// A client that speaks Multipath TCP to a capture port falls back to plain TCP, so that the
// daemon can read the connection's original destination, which Linux does not give for an
// accepted MPTCP socket.
func TestCaptureListenersArePlainTCP(t *testing.T) {
	needRoot(t) // SO_MARK
	needMultipathTCP(t)
	for _, inbound := range []bool{true, false} {
		t.Run(map[bool]string{true: "inbound", false: "outbound"}[inbound], func(t *testing.T) {
			var d net.Dialer
			d.SetMultipathTCP(true)
			client, c := captureListenerPair(t, inbound, d)
			if mp, err := c.MultipathTCP(); err != nil || mp {
				t.Errorf("accepted connection uses MPTCP = %v (%v), want plain TCP", mp, err)
			}
			if mp, err := client.MultipathTCP(); err != nil || mp {
				t.Errorf("the MPTCP client still uses MPTCP = %v (%v), want its fallback to TCP", mp, err)
			}
		})
	}
}

// wantSockopts is what a daemon socket in a pod's netns carries: the daemon's mark, no delay, and
// remoteKeepAlive's probes if keepAlive.
func wantSockopts(keepAlive bool) map[string][3]int {
	want := map[string][3]int{
		"SO_MARK":      {unix.SOL_SOCKET, unix.SO_MARK, capture.SocketMark},
		"TCP_NODELAY":  {unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
		"SO_KEEPALIVE": {unix.SOL_SOCKET, unix.SO_KEEPALIVE, 0},
	}
	if keepAlive {
		want["SO_KEEPALIVE"] = [3]int{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1}
		want["TCP_KEEPIDLE"] = [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(remoteKeepAlive.Idle / time.Second)}
		want["TCP_KEEPINTVL"] = [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(remoteKeepAlive.Interval / time.Second)}
		want["TCP_KEEPCNT"] = [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, remoteKeepAlive.Count}
	}
	return want
}
