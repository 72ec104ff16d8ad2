package tunnel

import (
	"log/slog"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// scriptedListener hands out the results of a script, then reports itself closed.
type scriptedListener struct {
	script []func() (net.Conn, error)
}

func (l *scriptedListener) Accept() (net.Conn, error) {
	if len(l.script) == 0 {
		return nil, net.ErrClosed
	}
	next := l.script[0]
	l.script = l.script[1:]
	return next()
}

func (l *scriptedListener) Close() error   { return nil }
func (l *scriptedListener) Addr() net.Addr { return &net.TCPAddr{} }

// A listener that runs out of descriptors keeps serving once they are back, instead of leaving
// the pod's traffic refused until the pod is re-attached.
func TestServeSurvivesDescriptorShortage(t *testing.T) {
	client, server := tcpPair(t)
	defer client.Close()
	emfile := func() (net.Conn, error) {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	ln := &scriptedListener{script: []func() (net.Conn, error){
		emfile, emfile, func() (net.Conn, error) { return server, nil },
	}}
	pt := &PodTunnel{proxy: &Proxy{}, log: slog.New(slog.DiscardHandler), conns: make(map[*net.TCPConn]struct{})}
	handled := make(chan *net.TCPConn, 1)
	pt.wg.Add(1)
	done := make(chan struct{})
	go func() {
		pt.serve(ln, func(c *net.TCPConn) { handled <- c })
		close(done)
	}()
	select {
	case c := <-handled:
		if c != server {
			t.Error("handled another connection than the one accepted")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the connection accepted after EMFILE was never handled")
	}
	<-done
}
