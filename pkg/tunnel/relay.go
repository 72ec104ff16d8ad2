package tunnel

import (
	"crypto/tls"
	"errors"
	"io"
	"math"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

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
// streaming. The large buffer holds sixteen records: a read from the app then fills up to sixteen
// whole records, sent with one write (see batchConn), and a TLS source whose socket already holds
// more records reads them all before the relay writes (see readMore). Fewer, larger writes mean
// fewer system calls, fewer wake-ups of the process at the other end and fewer packets, and each
// packet costs at every netfilter hook, bridge and TCP stack it crosses.
const (
	smallBufSize = 2 << 10
	tlsRecordMax = 16 << 10
	largeRecords = 16
	largeBufSize = largeRecords * tlsRecordMax
	batchBufSize = largeBufSize + largeRecords*recordOverhead
	// recordOverhead bounds what a record adds to its plaintext on the wire: header and tag.
	recordOverhead = 5 + 256
)

var (
	smallBufs  = sync.Pool{New: func() any { b := make([]byte, smallBufSize); return &b }}
	largeBufs  = sync.Pool{New: func() any { b := make([]byte, largeBufSize); return &b }}
	recordBufs = sync.Pool{New: func() any { b := make([]byte, tlsRecordMax); return &b }}
)

// bulkBudgetFor bounds the memory of the large buffers lent at once, counting for each the batch
// buffer it takes when its direction writes TLS (see batchConn): a quarter of the memory limit
// given to the Go runtime (GOMEMLIMIT, which the DaemonSet sets to the container's limit), or
// defaultBulkBudget without one. With the DaemonSet's 256 MiB that is 64 MiB, about 120 streaming
// directions. Past it a relay streams through a one-record buffer, with more system calls per
// byte, instead of taking the daemon towards its memory limit, where an OOM kill would cut every
// pod on the node off the network.
func bulkBudgetFor(memoryLimit int64) int64 {
	if memoryLimit == math.MaxInt64 {
		return defaultBulkBudget
	}
	return memoryLimit / 4
}

const defaultBulkBudget = 64 << 20

// bulk lends the relays their large buffers within the budget.
var bulk = newBulkBuffers(bulkBudgetFor(debug.SetMemoryLimit(-1)) / (largeBufSize + batchBufSize))

type bulkBuffers struct {
	max    atomic.Int64 // large buffers that may be lent at once
	lent   atomic.Int64
	denied atomic.Int64
}

func newBulkBuffers(max int64) *bulkBuffers {
	b := new(bulkBuffers)
	b.max.Store(max)
	return b
}

// take lends a large buffer, or a one-record buffer once max large ones are lent.
func (b *bulkBuffers) take() *[]byte {
	if b.lent.Add(1) <= b.max.Load() {
		return largeBufs.Get().(*[]byte)
	}
	b.lent.Add(-1)
	b.denied.Add(1)
	return recordBufs.Get().(*[]byte)
}

// give takes back a buffer that take lent.
func (b *bulkBuffers) give(buf *[]byte) {
	if len(*buf) == largeBufSize {
		largeBufs.Put(buf)
		b.lent.Add(-1)
		return
	}
	recordBufs.Put(buf)
}

// BulkBufferStats describes the relays' large buffers: how many are lent now, how many may be lent
// at once, and how many times a relay that began to stream got a one-record buffer instead because
// the budget was spent.
type BulkBufferStats struct{ Lent, Max, Denied int64 }

// BulkBuffers reports the relays' large buffers.
func BulkBuffers() BulkBufferStats {
	return BulkBufferStats{Lent: bulk.lent.Load(), Max: bulk.max.Load(), Denied: bulk.denied.Load()}
}

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
// taken: the first read into it often just finishes a TLS record that the small buffer cut. While
// a connection is idle, its relay holds no buffer at all (see source).
func copyAdaptive(dst io.Writer, src io.Reader) (int64, error) {
	in, err := newSource(src)
	if err != nil {
		return 0, err
	}
	tlsDst, batch := batchOf(dst)
	// Large writes to a plain TCP destination go without telling the scheduler (see rawSocket).
	var rawDst *rawSocket
	if tc, ok := dst.(*net.TCPConn); ok {
		if rawDst, err = newRawSocket(tc); err != nil {
			return 0, err
		}
	}
	var large *[]byte
	fresh := false
	defer func() {
		if large != nil {
			bulk.give(large)
		}
	}()
	var written int64
	for {
		var (
			buf  *[]byte
			nr   int
			rerr error
		)
		if large != nil {
			buf = large
			nr, rerr = in.read(*large)
			if rerr == nil && nr > 0 {
				var m int
				m, rerr = in.readMore((*large)[nr:])
				nr += m
			}
			if errors.Is(rerr, errIdle) {
				bulk.give(large)
				large = nil
				continue
			}
		} else {
			buf, nr, rerr = in.readSmall()
		}
		var werr error
		if nr > 0 {
			var nw int
			if nr > tlsRecordMax && batch != nil {
				nw, werr = batch.writeBatched(tlsDst, (*buf)[:nr])
			} else if rawDst != nil && nr > smallBufSize {
				nw, werr = rawDst.Write((*buf)[:nr])
			} else {
				nw, werr = dst.Write((*buf)[:nr])
			}
			written += int64(nw)
			if werr == nil && nw != nr {
				werr = io.ErrShortWrite
			}
		}
		if buf != large {
			in.release(buf)
		}
		switch {
		case werr != nil:
			return written, werr
		case rerr == io.EOF:
			return written, nil
		case rerr != nil:
			return written, rerr
		}
		switch {
		case large == nil && nr == smallBufSize:
			large, fresh = bulk.take(), true
		case large != nil && nr < tlsRecordMax && !fresh:
			bulk.give(large)
			large = nil
		default:
			fresh = false
		}
	}
}

// idleAfter is how long a TLS source may stay silent before its relay gives its buffer back.
// Reading it costs a read deadline, set at most once per idleAfter. A variable for the tests.
var idleAfter = time.Second

// errIdle reports that a TLS source stayed silent for idleAfter.
var errIdle = errors.New("source idle")

// source is the reading end of one direction of a relay. A plain TCP source is waited on without
// any buffer: the small one comes from a pool once data is there. A TLS source cannot be waited on
// that way at every read (crypto/tls may hold decrypted or received bytes that the socket no longer
// signals), so it reads into a pooled buffer under a read deadline; only when that expires, which
// proves that crypto/tls needs the socket, does it give the buffer back and wait on the socket.
type source struct {
	r  io.Reader
	rc syscall.RawConn
	// raw reads a plain TCP source into the large buffer, without telling the scheduler (see
	// rawSocket); nil for other sources.
	raw *rawSocket
	// tls is set for a TLS source whose socket can be waited on; nil for a plain TCP one.
	tls interface{ SetReadDeadline(time.Time) error }
	// armed tells whether tls has a read deadline set.
	armed bool
	// small is the buffer of a source that can be waited on neither way.
	small *[]byte
	// try and count are tryRead and countQueued, bound once: a closure per call would be an
	// allocation per call.
	try   func(fd uintptr) bool
	count func(fd uintptr)
	buf   *[]byte
	n     int
	opErr error
	inq   int
}

func newSource(r io.Reader) (*source, error) {
	s := &source{r: r}
	switch c := r.(type) {
	case *net.TCPConn:
		raw, err := newRawSocket(c)
		if err != nil {
			return nil, err
		}
		s.raw, s.rc = raw, raw.rc
	case *tls.Conn:
		if w, ok := c.NetConn().(interface{ tcpConn() (*net.TCPConn, bool) }); ok {
			if tc, ok := w.tcpConn(); ok {
				rc, err := tc.SyscallConn()
				if err != nil {
					return nil, err
				}
				s.rc, s.tls = rc, c
			}
		}
	}
	if s.rc == nil {
		b := make([]byte, smallBufSize)
		s.small = &b
		return s, nil
	}
	s.try, s.count = s.tryRead, s.countQueued
	return s, nil
}

// readSmall reads into a small buffer, which the caller gives back with release.
func (s *source) readSmall() (*[]byte, int, error) {
	switch {
	case s.small != nil:
		n, err := s.r.Read(*s.small)
		return s.small, n, err
	case s.tls == nil:
		return s.readTCP()
	}
	for {
		b := smallBufs.Get().(*[]byte)
		n, err := s.read(*b)
		if !errors.Is(err, errIdle) {
			return b, n, err
		}
		smallBufs.Put(b)
		if err := s.waitReadable(); err != nil {
			return nil, 0, err
		}
	}
}

// read reads into buf; a TLS source silent for idleAfter returns errIdle.
func (s *source) read(buf []byte) (int, error) {
	if s.raw != nil {
		return s.raw.Read(buf)
	}
	if s.tls == nil {
		return s.r.Read(buf)
	}
	if !s.armed {
		if err := s.tls.SetReadDeadline(time.Now().Add(idleAfter)); err != nil {
			return 0, err
		}
		s.armed = true
	}
	n, err := s.r.Read(buf)
	// crypto/tls keeps a partial record across a timeout and does not fail the connection.
	if n == 0 && errors.Is(err, os.ErrDeadlineExceeded) {
		s.armed = false
		if err := s.tls.SetReadDeadline(time.Time{}); err != nil {
			return 0, err
		}
		return 0, errIdle
	}
	return n, err
}

// readMore reads on into buf while the socket holds at least a whole record, so that a relay
// writes a burst of records with one send instead of one send per record. With a whole record
// queued, the next read cannot wait.
func (s *source) readMore(buf []byte) (int, error) {
	if s.tls == nil {
		return 0, nil
	}
	n := 0
	for len(buf)-n >= tlsRecordMax && s.queued() >= tlsRecordMax+recordOverhead {
		m, err := s.read(buf[n:])
		n += m
		if errors.Is(err, errIdle) {
			// The deadline ran out while the socket had data: not idle, just time to re-arm it.
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// queued is how many bytes the socket holds, not yet read.
func (s *source) queued() int {
	s.inq = 0
	s.rc.Control(s.count)
	return s.inq
}

func (s *source) countQueued(fd uintptr) {
	s.inq, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
}

func (s *source) release(b *[]byte) {
	if b != nil && b != s.small {
		smallBufs.Put(b)
	}
}

// readTCP reads a plain TCP socket into a small pooled buffer, taken only once the socket has
// data (or its end) to give.
func (s *source) readTCP() (*[]byte, int, error) {
	s.buf, s.n, s.opErr = nil, 0, nil
	err := s.rc.Read(s.try)
	buf := s.buf
	switch {
	case err != nil:
		s.release(buf)
		return nil, 0, err
	case s.opErr != nil:
		s.release(buf)
		return nil, 0, os.NewSyscallError("read", s.opErr)
	case s.n == 0:
		s.release(buf)
		return nil, 0, io.EOF
	}
	return buf, s.n, nil
}

// tryRead is readTCP's RawConn callback: false sends the goroutine to wait for readability.
func (s *source) tryRead(fd uintptr) bool {
	b := smallBufs.Get().(*[]byte)
	for {
		s.n, s.opErr = unix.Read(int(fd), *b)
		if s.opErr != unix.EINTR {
			break
		}
	}
	if s.opErr == unix.EAGAIN {
		smallBufs.Put(b)
		return false
	}
	s.buf = b
	return true
}

// waitReadable waits until the TLS source's socket has bytes, its end or an error to give,
// without taking them.
func (s *source) waitReadable() error {
	var peek [1]byte
	return s.rc.Read(func(fd uintptr) bool {
		_, _, err := unix.Recvfrom(int(fd), peek[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return err != unix.EAGAIN
	})
}
