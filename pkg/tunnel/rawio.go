package tunnel

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawSocket reads and writes a TCP socket with system calls that the Go scheduler is not told
// about, for the relays' large transfers. A large read or write on a socket whose peer is on
// this machine runs the peer's side of the transfer too, and lasts tens of microseconds. Told
// that a thread is in such a call, the runtime's monitor, which then checks every 20 us, takes the
// thread's processor away and hands it to another thread, and the call's return waits for one
// back: under bulk load that cost 10 to 25% of the daemon's CPU per byte. The sockets are
// non-blocking, so no such call waits for the network: with nothing to do it fails with EAGAIN,
// and the goroutine waits in the netpoller as usual, deadlines included. Small transfers, the
// ones latency depends on, keep the usual calls: they are short. Errors are those of
// net.TCPConn: io.EOF at the end, a *net.OpError otherwise. Not for concurrent use.
type rawSocket struct {
	conn *net.TCPConn
	rc   syscall.RawConn
	// The operation under way; tryRead and tryWrite are bound once to read, write: a closure
	// per call would be an allocation per call.
	p           []byte
	n           int
	errno       syscall.Errno
	read, write func(fd uintptr) bool
}

func newRawSocket(c *net.TCPConn) (*rawSocket, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &rawSocket{conn: c, rc: rc}
	s.read, s.write = s.tryRead, s.tryWrite
	return s, nil
}

// Read reads into p what the socket holds, waiting until it holds something.
func (s *rawSocket) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.p, s.n, s.errno = p, 0, 0
	err := s.rc.Read(s.read)
	s.p = nil
	switch {
	case err != nil:
		return 0, s.opError("read", err)
	case s.errno != 0:
		return 0, s.opError("read", os.NewSyscallError("read", s.errno))
	case s.n == 0:
		return 0, io.EOF
	}
	return s.n, nil
}

func (s *rawSocket) tryRead(fd uintptr) bool {
	for {
		r, _, e := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&s.p[0])), uintptr(len(s.p)))
		switch e {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.n, s.errno = int(r), e
		return true
	}
}

// Write writes all of p, waiting for room in the socket as often as needed.
func (s *rawSocket) Write(p []byte) (int, error) {
	s.p, s.n, s.errno = p, 0, 0
	err := s.rc.Write(s.write)
	s.p = nil
	switch {
	case err != nil:
		return s.n, s.opError("write", err)
	case s.errno != 0:
		return s.n, s.opError("write", os.NewSyscallError("write", s.errno))
	}
	return s.n, nil
}

func (s *rawSocket) tryWrite(fd uintptr) bool {
	for s.n < len(s.p) {
		r, _, e := unix.RawSyscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(&s.p[s.n])), uintptr(len(s.p)-s.n))
		switch e {
		case 0:
			s.n += int(r)
		case unix.EINTR:
		case unix.EAGAIN:
			return false
		default:
			s.errno = e
			return true
		}
	}
	return true
}

// opError wraps err as net.TCPConn wraps the errors of its reads and writes.
func (s *rawSocket) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: s.conn.LocalAddr(), Addr: s.conn.RemoteAddr(), Err: err}
}
