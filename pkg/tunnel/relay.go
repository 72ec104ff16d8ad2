package tunnel

import (
	"errors"
	"io"
	"net"
	"sync"
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

var largeBufs = sync.Pool{New: func() any { b := make([]byte, largeBufSize); return &b }}

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

// copyAdaptive copies src to dst until src ends, through the small buffer while reads are small
// and a pooled large one while they fill the small one. A read of less than a record gives the
// large buffer back before the next read (which may wait for long), except right after it was
// taken: the first read into it often just finishes a TLS record that the small buffer cut.
func copyAdaptive(dst io.Writer, src io.Reader) (int64, error) {
	small := make([]byte, smallBufSize)
	buf := small
	var large *[]byte
	fresh := false
	defer func() {
		if large != nil {
			largeBufs.Put(large)
		}
	}()
	var written int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			written += int64(nw)
			if werr != nil {
				return written, werr
			}
			if nw != nr {
				return written, io.ErrShortWrite
			}
		}
		if rerr == io.EOF {
			return written, nil
		}
		if rerr != nil {
			return written, rerr
		}
		switch {
		case large == nil && nr == len(small):
			large = largeBufs.Get().(*[]byte)
			buf, fresh = *large, true
		case large != nil && nr < tlsRecordMax && !fresh:
			largeBufs.Put(large)
			large, buf = nil, small
		default:
			fresh = false
		}
	}
}
