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

// copyBufSize matches the largest TLS record (16 KiB) twice over, so a read
// from the app usually fills whole records.
const copyBufSize = 32 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

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
		buf := copyBufs.Get().(*[]byte)
		n, err = io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *buf)
		copyBufs.Put(buf)
	}
	if err != nil {
		return n, err
	}
	return n, dst.CloseWrite()
}

// readerOnly and writerOnly hide ReaderFrom/WriterTo so that io.CopyBuffer
// uses our pooled buffer instead of allocating its own per connection.
type readerOnly struct{ io.Reader }

type writerOnly struct{ io.Writer }
