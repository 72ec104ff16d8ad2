package tunnel

import (
	"crypto/tls"
	"net"
	"sync"
)

// batchConn is the TCP connection under a relay's tls.Conn. crypto/tls sends every record with a
// write of its own, and with TCP_NODELAY every write leaves at once as packets of its own. While a
// relay writes its large buffer (up to sixteen records), batchConn gathers the records and sends
// them with one write.
type batchConn struct {
	*net.TCPConn
	// mu orders the writes: crypto/tls may write a record of its own (a KeyUpdate answer) from
	// the reading goroutine while the relay's records are held.
	mu   sync.Mutex
	held *[]byte
	// raw sends the records held, made at the first such write.
	raw *rawSocket
}

// batchBufs hold the records of one large write: its plaintext plus each record's header and tag.
var batchBufs = sync.Pool{New: func() any { b := make([]byte, 0, batchBufSize); return &b }}

func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held != nil {
		*c.held = append(*c.held, p...)
		return len(p), nil
	}
	return c.TCPConn.Write(p)
}

// writeBatched writes p to conn, whose records c holds and then sends with one write.
func (c *batchConn) writeBatched(conn *tls.Conn, p []byte) (int, error) {
	c.mu.Lock()
	c.held = batchBufs.Get().(*[]byte)
	c.mu.Unlock()
	n, err := conn.Write(p)
	c.mu.Lock()
	defer c.mu.Unlock()
	held := c.held
	c.held = nil
	if len(*held) > 0 {
		if werr := c.sendHeld(*held); werr != nil && err == nil {
			err = werr
		}
	}
	*held = (*held)[:0]
	batchBufs.Put(held)
	return n, err
}

// sendHeld sends the records a large write held, without telling the scheduler (see rawSocket).
func (c *batchConn) sendHeld(b []byte) error {
	if c.raw == nil {
		raw, err := newRawSocket(c.TCPConn)
		if err != nil {
			return err
		}
		c.raw = raw
	}
	_, err := c.raw.Write(b)
	return err
}

// batchOf returns the batchConn under w, or nil if w is not a tls.Conn over one.
func batchOf(w any) (*tls.Conn, *batchConn) {
	c, ok := w.(*tls.Conn)
	if !ok {
		return nil, nil
	}
	switch nc := c.NetConn().(type) {
	case *batchConn:
		return c, nc
	case *helloConn:
		if b := nc.batch(); b != nil {
			return c, b
		}
	}
	return nil, nil
}

// tcpConn returns the TCP connection under c, for waiting on its socket.
func (c *batchConn) tcpConn() (*net.TCPConn, bool) { return c.TCPConn, true }
