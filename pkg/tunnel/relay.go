package tunnel

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// stream is one side of a relayed connection: a TCP connection, or TLS over one.
// Both can half-close: TCP sends FIN, TLS sends close_notify.
type stream interface {
	io.ReadWriter
	CloseWrite() error
}

// Each direction of a relay reads into a small buffer of its own, which is all that an idle or
// interactive connection holds, and borrows a large pooled one while data streams. A read of at
// least a TLS record's plaintext (crypto/tls returns at most one record per Read) counts as
// streaming; the large buffer holds two, so that a read from the app fills two whole records.
const (
	smallBufSize = 2 << 10
	tlsRecordMax = 16 << 10
	largeBufSize = 2 * tlsRecordMax
)

var (
	smallBufs = sync.Pool{New: func() any { b := make([]byte, smallBufSize); return &b }}
	largeBufs = sync.Pool{New: func() any { b := make([]byte, largeBufSize); return &b }}
)

// relay copies client->server and server->client until both directions have
// ended. A clean end of one direction is passed on as a half-close, so
// protocols that shut down their write side keep working. Any error aborts
// both sides at once (abort resets the TCP connections), so a reset or a
// failure at one end shows up at the other end as a reset, never as a hang.
func relay(client, server stream, abort func()) (up, down int64, err error) {
	var (
		wg      sync.WaitGroup
		once    sync.Once
		upErr   error
		downErr error
	)
	stop := func() { once.Do(abort) }
	wg.Add(1)
	go func() {
		defer wg.Done()
		if up, upErr = pipe(server, client); upErr != nil {
			stop()
		}
	}()
	if down, downErr = pipe(client, server); downErr != nil {
		stop()
	}
	wg.Wait()
	// The first failure is the cause; the other side's error is our reset.
	return up, down, firstCause(upErr, downErr)
}

func firstCause(a, b error) error {
	if a != nil && !errors.Is(a, net.ErrClosed) {
		return a
	}
	if b != nil && !errors.Is(b, net.ErrClosed) {
		return b
	}
	if a != nil {
		return a
	}
	return b
}

// pipe copies src to dst and half-closes dst when src ends cleanly.
func pipe(dst, src stream) (int64, error) {
	var (
		n   int64
		err error
	)
	d, dstTCP := dst.(*net.TCPConn)
	_, srcTCP := src.(*net.TCPConn)
	if dstTCP && srcTCP {
		// Plaintext both ways: let the kernel splice.
		n, err = d.ReadFrom(src)
	} else {
		n, err = copyAdaptive(dst, src)
	}
	if err != nil {
		return n, err
	}
	return n, dst.CloseWrite()
}

// copyAdaptive copies src to dst until src ends, through a small buffer while reads are small
// and a pooled large one while they fill the small one. A read of less than a record gives the
// large buffer back before the next read (which may wait for long), except right after it was
// taken: the first read into it often just finishes a TLS record that the small buffer cut.
//
// A plain TCP source is waited on without any buffer: the small one comes from a pool once data
// is there, so an idle connection holds none. A TLS source needs a buffer of its own across the
// wait (crypto/tls may hold decrypted bytes that the socket no longer signals).
func copyAdaptive(dst io.Writer, src io.Reader) (int64, error) {
	var raw *pooledReader
	if tc, ok := src.(*net.TCPConn); ok {
		rc, err := tc.SyscallConn()
		if err != nil {
			return 0, err
		}
		raw = newPooledReader(rc)
	}
	var small []byte
	if raw == nil {
		small = make([]byte, smallBufSize)
	}
	var large *[]byte
	fresh := false
	defer func() {
		if large != nil {
			largeBufs.Put(large)
		}
	}()
	var written int64
	for {
		var (
			nr     int
			rerr   error
			chunk  []byte
			pooled *[]byte
		)
		switch {
		case large != nil:
			nr, rerr = src.Read(*large)
			chunk = (*large)[:nr]
		case raw != nil:
			pooled, nr, rerr = raw.read()
			if pooled != nil {
				chunk = (*pooled)[:nr]
			}
		default:
			nr, rerr = src.Read(small)
			chunk = small[:nr]
		}
		if nr > 0 {
			nw, werr := dst.Write(chunk)
			written += int64(nw)
			if werr == nil && nw != nr {
				werr = io.ErrShortWrite
			}
			if werr != nil {
				putSmall(pooled)
				return written, werr
			}
		}
		putSmall(pooled)
		if rerr == io.EOF {
			return written, nil
		}
		if rerr != nil {
			return written, rerr
		}
		switch {
		case large == nil && nr == smallBufSize:
			large, fresh = largeBufs.Get().(*[]byte), true
		case large != nil && nr < tlsRecordMax && !fresh:
			largeBufs.Put(large)
			large = nil
		default:
			fresh = false
		}
	}
}

// pooledReader reads a plain TCP socket into a small pooled buffer, taken only once the socket
// has data (or its end) to give: while it waits, the connection holds no buffer.
type pooledReader struct {
	rc syscall.RawConn
	// try is r.tryRead, bound once: a closure per read would be an allocation per read.
	try   func(fd uintptr) bool
	buf   *[]byte
	n     int
	opErr error
}

func newPooledReader(rc syscall.RawConn) *pooledReader {
	r := &pooledReader{rc: rc}
	r.try = r.tryRead
	return r
}

// tryRead is the RawConn callback: false sends the goroutine to wait for readability.
func (r *pooledReader) tryRead(fd uintptr) bool {
	b := smallBufs.Get().(*[]byte)
	for {
		r.n, r.opErr = unix.Read(int(fd), *b)
		if r.opErr != unix.EINTR {
			break
		}
	}
	if r.opErr == unix.EAGAIN {
		smallBufs.Put(b)
		return false
	}
	r.buf = b
	return true
}

// read returns the pooled buffer holding the n bytes read; the caller puts it back.
func (r *pooledReader) read() (*[]byte, int, error) {
	r.buf, r.n, r.opErr = nil, 0, nil
	err := r.rc.Read(r.try)
	buf := r.buf
	switch {
	case err != nil:
		putSmall(buf)
		return nil, 0, err
	case r.opErr != nil:
		putSmall(buf)
		return nil, 0, os.NewSyscallError("read", r.opErr)
	case r.n == 0:
		putSmall(buf)
		return nil, 0, io.EOF
	}
	return buf, r.n, nil
}

func putSmall(b *[]byte) {
	if b != nil {
		smallBufs.Put(b)
	}
}
