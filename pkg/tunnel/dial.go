package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshless/meshless/pkg/capture"
)

// A socket belongs to the network namespace it was created in, whatever thread uses it later. So
// a dial into a pod's netns only has to create its socket there: a locked thread enters the netns,
// calls socket() and comes back, a few microseconds; binding, connecting and the I/O then run on
// any goroutine. Running the whole dial on a locked thread inside the netns (ns.Do) costs far more:
// it opens namespace files under /proc twice per call and pins a thread while the connect waits.

// hostNetns is the network namespace of the daemon's threads, to which a thread returns after
// creating a socket in a pod's netns.
type hostNetns struct {
	// f stays referenced so that the descriptor stays open for the life of the Proxy.
	f  *os.File
	fd int
}

func openHostNetns() (*hostNetns, error) {
	// Every unlocked thread is in the process's netns: a thread left inside a pod's netns is
	// never unlocked, and dies with its goroutine.
	f, err := os.Open("/proc/self/ns/net")
	if err != nil {
		return nil, fmt.Errorf("open the daemon's network namespace: %w", err)
	}
	return &hostNetns{f: f, fd: int(f.Fd())}, nil
}

// socketIn creates a non-blocking TCP socket of family (AF_INET or AF_INET6) inside the network
// namespace podNS.
func (h *hostNetns) socketIn(podNS int, family int) (int, error) {
	type result struct {
		fd  int
		err error
	}
	done := make(chan result, 1)
	// A goroutine of its own, so that a thread that cannot get back to the host netns is
	// thrown away with it (a goroutine that exits while locked takes its thread with it).
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(podNS, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{-1, os.NewSyscallError("setns", err)}
			return
		}
		fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if serr := unix.Setns(h.fd, unix.CLONE_NEWNET); serr != nil {
			if err == nil {
				unix.Close(fd)
			}
			done <- result{-1, fmt.Errorf("return to the daemon's netns: %w", os.NewSyscallError("setns", serr))}
			return
		}
		runtime.UnlockOSThread()
		done <- result{fd, os.NewSyscallError("socket", err)}
	}()
	r := <-done
	return r.fd, r.err
}

// dialIn connects from inside the netns podNS to dst, from local (any port) if valid, with the
// daemon's mark so that the pod's capture rules do not send the connection back to us. A local
// address needs IP_TRANSPARENT: the inbound side connects to the app from the client's own IP.
func (h *hostNetns) dialIn(ctx context.Context, podNS int, local netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	network, family := "tcp4", unix.AF_INET
	if !dst.Addr().Unmap().Is4() {
		network, family = "tcp6", unix.AF_INET6
	}
	opErr := func(err error) error {
		e := &net.OpError{Op: "dial", Net: network, Addr: net.TCPAddrFromAddrPort(dst), Err: err}
		if local.IsValid() {
			e.Source = net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
		}
		return e
	}
	fd, err := h.socketIn(podNS, family)
	if err != nil {
		return nil, opErr(err)
	}
	if err := prepareSocket(fd, family, local); err != nil {
		unix.Close(fd)
		return nil, opErr(err)
	}
	// The os.File waits for the connect through the runtime's poller; net.FileConn then makes a
	// TCPConn of a duplicate, with both addresses known (crypto/tls keys client sessions by the
	// remote one), TCP_NODELAY and keep-alives, as a Dialer would.
	f := os.NewFile(uintptr(fd), "")
	defer f.Close()
	if err := connect(ctx, f, sockaddr(dst)); err != nil {
		return nil, opErr(err)
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, opErr(err)
	}
	return c.(*net.TCPConn), nil
}

// prepareSocket sets the daemon's mark and, for a local address, binds the socket to it
// transparently (the address belongs to another pod). IPv6 sockets are IPv6 only, as Go's are.
func prepareSocket(fd, family int, local netip.Addr) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, capture.SocketMark); err != nil {
		return os.NewSyscallError("setsockopt SO_MARK", err)
	}
	if family == unix.AF_INET6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			return os.NewSyscallError("setsockopt IPV6_V6ONLY", err)
		}
	}
	if !local.IsValid() {
		return nil
	}
	var err error
	if family == unix.AF_INET6 {
		err = unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
	} else {
		err = unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1)
	}
	if err != nil {
		return os.NewSyscallError("setsockopt IP_TRANSPARENT", err)
	}
	if err := unix.Bind(fd, sockaddr(netip.AddrPortFrom(local, 0))); err != nil {
		return os.NewSyscallError("bind", err)
	}
	return nil
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if a := ap.Addr().Unmap(); a.Is4() {
		return &unix.SockaddrInet4{Addr: a.As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

// aLongTimeAgo is a deadline in the past, to interrupt a connect in progress.
var aLongTimeAgo = time.Unix(1, 0)

// connect connects the non-blocking socket f to sa and waits, through the runtime's poller, until
// it is connected, refused, or ctx ends.
func connect(ctx context.Context, f *os.File, sa unix.Sockaddr) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var connErr error
	if err := rc.Control(func(fd uintptr) { connErr = unix.Connect(int(fd), sa) }); err != nil {
		return err
	}
	switch connErr {
	case nil, unix.EISCONN:
		return nil
	case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
	default:
		return os.NewSyscallError("connect", connErr)
	}

	if d, ok := ctx.Deadline(); ok {
		if err := f.SetWriteDeadline(d); err != nil {
			return err
		}
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(aLongTimeAgo) })
	// The socket is writable once the handshake is over, either way; SO_ERROR tells which.
	err = rc.Write(func(fd uintptr) bool {
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			connErr = os.NewSyscallError("getsockopt", err)
			return true
		}
		switch e := syscall.Errno(v); e {
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		case 0, unix.EISCONN:
			// Writable without an error can also be a wake-up before the handshake ended.
			_, err := unix.Getpeername(int(fd))
			connErr = nil
			return err == nil
		default:
			connErr = os.NewSyscallError("connect", e)
			return true
		}
	})
	stopped := stop()
	switch {
	case err != nil:
		// A deadline reads "i/o timeout", as from a Dialer; a cancellation says so.
		if errors.Is(ctx.Err(), context.Canceled) {
			return ctx.Err()
		}
		return err
	case connErr != nil:
		return connErr
	case !stopped:
		// ctx ended just as the connect did; the write deadline may be in the past by now.
		return ctx.Err()
	}
	return nil
}
