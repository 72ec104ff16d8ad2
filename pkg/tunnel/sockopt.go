package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshless/meshless/pkg/capture"
)

// markSocket tags a socket with the daemon's mark so that the pod's capture
// rules let it through instead of redirecting it back to us.
func markSocket(_, _ string, rc syscall.RawConn) error {
	return control(rc, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, capture.SocketMark)
	})
}

func control(rc syscall.RawConn, f func(fd int) error) error {
	var opErr error
	if err := rc.Control(func(fd uintptr) { opErr = f(int(fd)) }); err != nil {
		return err
	}
	return opErr
}

// originalDst returns the address the app connected to before the pod's nat
// rules redirected the connection to our listener.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	local, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, errors.New("original destination: not a TCP socket")
	}
	var dst netip.AddrPort
	err = control(rc, func(fd int) error {
		if local.IP.To4() != nil {
			// struct sockaddr_in fits in the 20 bytes of an ipv6_mreq; x/sys has no
			// generic getsockopt, so this is the usual way to read it.
			mreq, err := unix.GetsockoptIPv6Mreq(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST)
			if err != nil {
				return err
			}
			raw := mreq.Multiaddr
			port := binary.BigEndian.Uint16(raw[2:4])
			dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(raw[4:8])), port)
			return nil
		}
		// struct sockaddr_in6 is the head of an ip6_mtuinfo.
		info, err := unix.GetsockoptIPv6MTUInfo(fd, unix.SOL_IPV6, unix.SO_ORIGINAL_DST)
		if err != nil {
			return err
		}
		// The kernel wrote the port in network byte order; x/sys read it as a
		// native integer.
		var b [2]byte
		binary.NativeEndian.PutUint16(b[:], info.Addr.Port)
		port := binary.BigEndian.Uint16(b[:])
		dst = netip.AddrPortFrom(netip.AddrFrom16(info.Addr.Addr), port)
		return nil
	})
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	return dst, nil
}

// listenConfig returns how a capture listener is opened. Its sockets carry the daemon's mark. The
// connections accepted on the inbound port come from other pods: the listener gets the keep-alive
// settings of remoteKeepAlive, which Linux copies to every connection it accepts, instead of
// each accepted connection getting them with four more system calls. The outbound port's
// connections come from the pod's own app and need none.
//
// The listener is plain TCP, not Go's default of Multipath TCP: Linux answers SO_ORIGINAL_DST
// on an accepted MPTCP socket with EOPNOTSUPP, so every connection of an app (or an outside
// client) that speaks MPTCP would be refused for want of its destination. Against a plain TCP
// listener such a client falls back to TCP, as it does against any server without MPTCP.
func listenConfig(inbound bool) net.ListenConfig {
	lc := net.ListenConfig{Control: markSocket, KeepAlive: -1}
	lc.SetMultipathTCP(false)
	if inbound {
		lc.Control = func(network, address string, rc syscall.RawConn) error {
			if err := markSocket(network, address, rc); err != nil {
				return err
			}
			return control(rc, func(fd int) error { return setKeepAlive(fd, remoteKeepAlive) })
		}
	}
	return lc
}

// setKeepAlive turns on keep-alive probes on fd, as ka says.
func setKeepAlive(fd int, ka net.KeepAliveConfig) error {
	for _, o := range []struct {
		level, name, value int
		what               string
	}{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(ka.Idle / time.Second), "TCP_KEEPIDLE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(ka.Interval / time.Second), "TCP_KEEPINTVL"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, ka.Count, "TCP_KEEPCNT"},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.name, o.value); err != nil {
			return os.NewSyscallError("setsockopt "+o.what, err)
		}
	}
	return nil
}
