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
		lc := listenConfig(inbound)
		ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		client, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		t.Run(map[bool]string{true: "inbound", false: "outbound"}[inbound], func(t *testing.T) {
			checkSockopts(t, c.(*net.TCPConn), wantSockopts(inbound))
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
