package tunnel

import (
	"context"
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
// a dial into a pod's netns only has to create its socket there: the dialling goroutine locks its
// thread, enters the netns, and a net.Dialer creates the socket; the Dialer's Control hook, which
// runs right after socket(), takes the thread back to the daemon's netns and unlocks it, so the
// connect waits in the runtime's poller like any other dial, and the connection comes out of the
// Dialer ready (addresses known, TCP_NODELAY), with no descriptor duplicated. Running the whole
// dial on a locked thread inside the netns (ns.Do) costs far more: it opens namespace files under
// /proc twice per call and pins a thread while the connect waits.

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

// Keep-alive probing of the connections that leave the pod (a dead peer node, a silent network
// failure), as a net.Dialer would do by default. Connections between the daemon and the pod's own
// app never leave the pod's netns and get none: the kernel sees both ends.
var remoteKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 15 * time.Second, Count: 9}

// dialIn connects from inside the netns podNS to dst, from local (any port) if valid, with the
// daemon's mark so that the pod's capture rules do not send the connection back to us. A local
// address needs IP_TRANSPARENT: the inbound side connects to the app from the client's own IP.
// remote turns on keep-alive probes, for a destination outside the pod.
//
// The calling goroutine's thread enters podNS for the socket() call. Should it fail to come back,
// it stays locked to the caller, so that no other goroutine ever runs in the pod's netns: the
// caller must be a goroutine that ends soon (see onOwnStack), taking the thread with it.
func (h *hostNetns) dialIn(ctx context.Context, podNS int, local netip.Addr, dst netip.AddrPort, remote bool) (*net.TCPConn, error) {
	network, family := "tcp4", unix.AF_INET
	if !dst.Addr().Unmap().Is4() {
		network, family = "tcp6", unix.AF_INET6
	}
	d := net.Dialer{KeepAlive: -1}
	// Plain TCP whatever GODEBUG=multipathtcp says: the mark and IP_TRANSPARENT are set on the
	// socket the Dialer makes, and the peer's capture listener speaks plain TCP anyway.
	d.SetMultipathTCP(false)
	if remote {
		d.KeepAliveConfig = remoteKeepAlive
	}
	if local.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: local.AsSlice(), Zone: local.Zone()}
	}
	var (
		inPod    bool
		leaveErr error
	)
	leave := func() error {
		if inPod {
			inPod = false
			if err := unix.Setns(h.fd, unix.CLONE_NEWNET); err != nil {
				leaveErr = fmt.Errorf("return to the daemon's netns: %w", os.NewSyscallError("setns", err))
				return leaveErr
			}
			runtime.UnlockOSThread()
		}
		return leaveErr
	}
	d.Control = func(_, _ string, rc syscall.RawConn) error {
		if err := leave(); err != nil {
			return err
		}
		return control(rc, func(fd int) error { return prepareSocket(fd, family, local) })
	}

	runtime.LockOSThread()
	if err := unix.Setns(podNS, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, opError(network, local, dst, os.NewSyscallError("setns", err))
	}
	inPod = true
	c, err := d.DialContext(ctx, network, dst.String())
	// The Dialer returns without calling Control when socket() itself fails.
	if lerr := leave(); lerr != nil {
		if c != nil {
			c.Close()
		}
		return nil, opError(network, local, dst, lerr)
	}
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func opError(network string, local netip.Addr, dst netip.AddrPort, err error) error {
	e := &net.OpError{Op: "dial", Net: network, Addr: net.TCPAddrFromAddrPort(dst), Err: err}
	if local.IsValid() {
		e.Source = net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
	}
	return e
}

// prepareSocket sets the daemon's mark and, for a local address, lets the socket bind to it
// transparently (the address belongs to another pod); the Dialer binds after this.
func prepareSocket(fd, family int, local netip.Addr) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, capture.SocketMark); err != nil {
		return os.NewSyscallError("setsockopt SO_MARK", err)
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
	return nil
}
