package conformance

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// StartUDPEcho answers every datagram that reaches the pod on port (all addresses) with the same
// bytes, as a DNS server answers a query with one datagram. The socket is opened in the pod's
// namespace by this process and served by a goroutine until cleanup.
func (p *Pod) StartUDPEcho(port uint16) error {
	var conn *net.UDPConn
	err := ns.WithNetNSPath(p.NetnsPath(), func(ns.NetNS) error {
		var err error
		conn, err = net.ListenUDP("udp", &net.UDPAddr{Port: int(port)})
		return err
	})
	if err != nil {
		return fmt.Errorf("UDP echo on port %d in %s: %w", port, p, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64<<10)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return // closed at cleanup
			}
			// A lost answer is the client's to retry, as with DNS.
			_, _ = conn.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	p.Node.Cluster.Env.Cleanup(func() {
		conn.Close()
		<-done
	})
	return nil
}

// UDPExchange sends query from the pod to target and returns the first datagram that comes back,
// resending the query a few times on silence, as a DNS resolver does.
func (p *Pod) UDPExchange(ctx context.Context, target netip.AddrPort, query []byte) ([]byte, error) {
	c, err := DialIn(ctx, p.NetnsPath(), "udp", target.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	var last error
	for range 10 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if _, err := c.Write(query); err != nil {
			return nil, fmt.Errorf("UDP query to %s from %s: %w", target, p, err)
		}
		if err := c.SetReadDeadline(time.Now().Add(500 * time.Millisecond)); err != nil {
			return nil, err
		}
		n, err := c.Read(buf)
		if err == nil {
			return bytes.Clone(buf[:n]), nil
		}
		last = err
		// Silence is retried; an ICMP error (nothing listens) is an answer.
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
	}
	return nil, fmt.Errorf("no UDP answer from %s to %s: %w", target, p, last)
}
