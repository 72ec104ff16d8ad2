package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// ioTimeout bounds each accept and read, so that a broken rule fails the test instead of hanging it.
const ioTimeout = 10 * time.Second

// addrs of one family in the traffic test: the pod, and two addresses of its peer namespace, one
// of which the pod's config lists as the node's.
type familyAddrs struct {
	family            int
	network           string // "tcp4" or "tcp6"
	pod, node, other  netip.Addr
	any               string // wildcard listen host
	prefixLen         string
	addrFlags         []string
	redirectLoopback  netip.Addr
	transparentOption int
}

var trafficFamilies = []familyAddrs{
	{
		family: 4, network: "tcp4", any: "0.0.0.0", prefixLen: "/24",
		pod: netip.MustParseAddr("10.77.0.2"), node: netip.MustParseAddr("10.77.0.1"), other: netip.MustParseAddr("10.77.0.3"),
		redirectLoopback: netip.MustParseAddr("127.0.0.1"), transparentOption: unix.IP_TRANSPARENT,
	},
	{
		family: 6, network: "tcp6", any: "::", prefixLen: "/64", addrFlags: []string{"nodad"},
		pod: netip.MustParseAddr("fd77::2"), node: netip.MustParseAddr("fd77::1"), other: netip.MustParseAddr("fd77::3"),
		redirectLoopback: netip.MustParseAddr("::1"), transparentOption: unix.IPV6_TRANSPARENT,
	},
}

// TestTraffic applies the rules in a dual-stack pod namespace wired by a veth pair to a peer
// namespace, and shows where real TCP connections end up, for each backend and family.
func TestTraffic(t *testing.T) {
	needRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			pod, podPath := newNetns(t)
			peer, peerPath := newNetns(t)
			run(t, "ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer)
			for _, netns := range []string{pod, peer} {
				run(t, "ip", "-n", netns, "link", "set", "lo", "up")
				run(t, "ip", "-n", netns, "link", "set", "eth0", "up")
			}
			for _, fa := range trafficFamilies {
				run(t, "ip", append([]string{"-n", pod, "addr", "add", fa.pod.String() + fa.prefixLen, "dev", "eth0"}, fa.addrFlags...)...)
				for _, a := range []netip.Addr{fa.node, fa.other} {
					run(t, "ip", append([]string{"-n", peer, "addr", "add", a.String() + fa.prefixLen, "dev", "eth0"}, fa.addrFlags...)...)
				}
			}
			c := podConfig(b, true)
			if err := Apply(podPath, c); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			for _, fa := range trafficFamilies {
				t.Run(fmt.Sprintf("IPv%d", fa.family), func(t *testing.T) {
					testTraffic(t, fa, podPath, peerPath)
				})
			}
		})
	}
}

func testTraffic(t *testing.T, fa familyAddrs, podPath, peerPath string) {
	hostPort := func(a string, port int) string { return net.JoinHostPort(a, fmt.Sprint(port)) }
	// In the pod: the daemon's two listeners (as meshlessd opens them) and the app.
	outbound := listen(t, podPath, fa.network, hostPort(fa.any, OutboundPort))
	inbound := listen(t, podPath, fa.network, hostPort(fa.any, InboundPort))
	app := listen(t, podPath, fa.network, hostPort(fa.any, 8080))
	appExcluded := listen(t, podPath, fa.network, hostPort(fa.any, 9090))
	// In the peer: servers the pod talks to.
	peerServer := listen(t, peerPath, fa.network, hostPort(fa.node.String(), 9000))
	peerExcluded := listen(t, peerPath, fa.network, hostPort(fa.node.String(), 9001))

	t.Run("outbound is redirected to the daemon", func(t *testing.T) {
		dst := netip.AddrPortFrom(fa.node, 9000)
		conn := dial(t, podPath, fa.network, netip.Addr{}, dst, nil)
		got := accept(t, outbound)
		assertPair(t, conn, got)
		if local := addrPort(got.LocalAddr()); local != netip.AddrPortFrom(fa.redirectLoopback, OutboundPort) {
			t.Errorf("redirected connection arrived at %s, want %s:%d", local, fa.redirectLoopback, OutboundPort)
		}
		if orig := originalDst(t, got, fa.family); orig != dst {
			t.Errorf("SO_ORIGINAL_DST = %s, want %s", orig, dst)
		}
		if remote := addrPort(conn.RemoteAddr()); remote != dst {
			t.Errorf("the app sees its connection going to %s, want %s", remote, dst)
		}
	})
	t.Run("the daemon's marked connections are not redirected", func(t *testing.T) {
		conn := dial(t, podPath, fa.network, netip.Addr{}, netip.AddrPortFrom(fa.node, 9000), sockopts(unix.SOL_SOCKET, unix.SO_MARK, SocketMark))
		assertPair(t, conn, accept(t, peerServer))
	})
	t.Run("excluded outbound port is not redirected", func(t *testing.T) {
		conn := dial(t, podPath, fa.network, netip.Addr{}, netip.AddrPortFrom(fa.node, 9001), nil)
		assertPair(t, conn, accept(t, peerExcluded))
	})
	t.Run("the pod's own address is not redirected", func(t *testing.T) {
		conn := dial(t, podPath, fa.network, netip.Addr{}, netip.AddrPortFrom(fa.pod, 8080), nil)
		assertPair(t, conn, accept(t, app))
	})
	t.Run("inbound from the node reaches the app", func(t *testing.T) {
		conn := dial(t, peerPath, fa.network, fa.node, netip.AddrPortFrom(fa.pod, 8080), nil)
		assertPair(t, conn, accept(t, app))
	})
	t.Run("inbound from elsewhere is redirected to the daemon", func(t *testing.T) {
		dst := netip.AddrPortFrom(fa.pod, 8080)
		conn := dial(t, peerPath, fa.network, fa.other, dst, nil)
		got := accept(t, inbound)
		assertPair(t, conn, got)
		if orig := originalDst(t, got, fa.family); orig != dst {
			t.Errorf("SO_ORIGINAL_DST = %s, want %s", orig, dst)
		}
	})
	t.Run("excluded inbound port reaches the app", func(t *testing.T) {
		conn := dial(t, peerPath, fa.network, fa.other, netip.AddrPortFrom(fa.pod, 9090), nil)
		assertPair(t, conn, accept(t, appExcluded))
	})
	t.Run("the app's replies to a spoofed client come back to the daemon", func(t *testing.T) {
		// What meshlessd does for inbound: connect to the app from the client's address with
		// IP_TRANSPARENT and the socket mark. Without the mangle rules and the policy route the
		// app's SYN-ACK would leave the pod towards the peer, which owns that address, and the
		// connect would never complete.
		level := unix.SOL_IP
		if fa.family == 6 {
			level = unix.SOL_IPV6
		}
		conn := dial(t, podPath, fa.network, fa.other, netip.AddrPortFrom(fa.pod, 8080),
			sockopts(level, fa.transparentOption, 1, unix.SOL_SOCKET, unix.SO_MARK, SocketMark))
		got := accept(t, app)
		assertPair(t, conn, got)
		if src := addrPort(got.RemoteAddr()).Addr(); src != fa.other {
			t.Errorf("the app sees the connection coming from %s, want the client's %s", src, fa.other)
		}
	})
	t.Run("UDP is not redirected", func(t *testing.T) {
		udp := "udp" + fa.network[3:]
		var server *net.UDPConn
		err := ns.WithNetNSPath(peerPath, func(ns.NetNS) error {
			var err error
			server, err = net.ListenUDP(udp, net.UDPAddrFromAddrPort(netip.AddrPortFrom(fa.node, 9000)))
			return err
		})
		if err != nil {
			t.Fatalf("listen UDP in the peer: %v", err)
		}
		defer server.Close()
		err = ns.WithNetNSPath(podPath, func(ns.NetNS) error {
			client, err := net.DialUDP(udp, nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(fa.node, 9000)))
			if err != nil {
				return err
			}
			defer client.Close()
			_, err = client.Write([]byte("dns?"))
			return err
		})
		if err != nil {
			t.Fatalf("send UDP from the pod: %v", err)
		}
		buf := make([]byte, 16)
		if err := server.SetReadDeadline(time.Now().Add(ioTimeout)); err != nil {
			t.Fatal(err)
		}
		n, from, err := server.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != "dns?" || from.Addr().Unmap() != fa.pod {
			t.Errorf("peer got %q from %s (%v), want \"dns?\" from %s", buf[:n], from, err, fa.pod)
		}
	})
}

func listen(t *testing.T, nsPath, network, addr string) *net.TCPListener {
	t.Helper()
	var l net.Listener
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, nsPath, err)
	}
	t.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

// sockopts returns a Dialer.Control setting integer socket options, given as level, name, value triples.
func sockopts(opts ...int) func(string, string, syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			for i := 0; i+2 < len(opts); i += 3 {
				if serr = unix.SetsockoptInt(int(fd), opts[i], opts[i+1], opts[i+2]); serr != nil {
					return
				}
			}
		})
		return errors.Join(err, serr)
	}
}

// dial connects from inside the netns at nsPath, from local (when valid) to dst.
func dial(t *testing.T, nsPath, network string, local netip.Addr, dst netip.AddrPort, control func(string, string, syscall.RawConn) error) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: ioTimeout, Control: control}
	if local.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
	}
	var conn net.Conn
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		conn, err = d.Dial(network, dst.String())
		return err
	})
	if err != nil {
		t.Fatalf("dial %s from %s in %s: %v", dst, local, nsPath, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn.(*net.TCPConn)
}

func accept(t *testing.T, l *net.TCPListener) *net.TCPConn {
	t.Helper()
	if err := l.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
		t.Fatal(err)
	}
	conn, err := l.AcceptTCP()
	if err != nil {
		t.Fatalf("accept on %s: %v (the connection went elsewhere)", l.Addr(), err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// assertPair checks that accepted is the other end of dialed, and that bytes flow both ways.
func assertPair(t *testing.T, dialed, accepted *net.TCPConn) {
	t.Helper()
	if d, a := addrPort(dialed.LocalAddr()), addrPort(accepted.RemoteAddr()); d != a {
		t.Fatalf("accepted a connection from %s, want the one dialed from %s", a, d)
	}
	for _, p := range [][2]*net.TCPConn{{dialed, accepted}, {accepted, dialed}} {
		if _, err := p[0].Write([]byte("ping")); err != nil {
			t.Fatalf("write: %v", err)
		}
		buf := make([]byte, 4)
		if err := p[1].SetReadDeadline(time.Now().Add(ioTimeout)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p[1], buf); err != nil || string(buf) != "ping" {
			t.Fatalf("read %q, %v; want \"ping\"", buf, err)
		}
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// originalDst reads the destination a redirected connection had before REDIRECT rewrote it:
// SO_ORIGINAL_DST (SOL_IP) or IP6T_SO_ORIGINAL_DST (SOL_IPV6, the same number).
func originalDst(t *testing.T, c *net.TCPConn, family int) netip.AddrPort {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var (
		got  netip.AddrPort
		serr error
	)
	err = rc.Control(func(fd uintptr) {
		var (
			v4    unix.RawSockaddrInet4
			v6    unix.RawSockaddrInet6
			ptr   unsafe.Pointer
			size  uint32
			level = unix.SOL_IP
		)
		if family == 6 {
			ptr, size, level = unsafe.Pointer(&v6), uint32(unsafe.Sizeof(v6)), unix.SOL_IPV6
		} else {
			ptr, size = unsafe.Pointer(&v4), uint32(unsafe.Sizeof(v4))
		}
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), unix.SO_ORIGINAL_DST,
			uintptr(ptr), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			serr = errno
			return
		}
		if family == 6 {
			got = netip.AddrPortFrom(netip.AddrFrom16(v6.Addr), networkPort(&v6.Port))
		} else {
			got = netip.AddrPortFrom(netip.AddrFrom4(v4.Addr), networkPort(&v4.Port))
		}
	})
	if err != nil || serr != nil {
		t.Fatalf("SO_ORIGINAL_DST: %v", errors.Join(err, serr))
	}
	return got
}

// networkPort reads a port stored in network byte order.
func networkPort(p *uint16) uint16 {
	return binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(p))[:])
}
