package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshless/meshless/pkg/capture"
)

// Pod is what the data path needs to know about an enrolled pod.
type Pod struct {
	Namespace string
	Name      string
	// Netns is the path of the pod's network namespace.
	Netns string
	// IPs are the pod's own addresses; their families decide which listeners open.
	IPs []netip.Addr
	// ID is the pod's SPIFFE identity, presented on both sides of its connections.
	ID spiffeid.ID
}

// Proxy opens and runs the data path of the node's pods.
type Proxy struct {
	cfg   Config
	stats Stats
	host  *hostNetns
}

// Stats counts connections across every pod of the node.
type Stats struct {
	Open      atomic.Int64
	Total     atomic.Int64
	Failed    atomic.Int64
	Plaintext atomic.Int64
	// Outbound and Inbound count the mTLS handshakes that completed as the client and as the
	// server. A resumed one sends, signs and verifies no certificate, so a falling share of
	// resumed handshakes makes every new connection dearer: worth an operator's attention.
	Outbound, Inbound Handshakes
}

// Handshakes counts the completed mTLS handshakes of one direction.
type Handshakes struct {
	Total   atomic.Int64
	Resumed atomic.Int64 // those that resumed a session
}

func (s *Stats) handshake(direction string, resumed bool) {
	h := &s.Inbound
	if direction == dirOutbound {
		h = &s.Outbound
	}
	h.Total.Add(1)
	if resumed {
		h.Resumed.Add(1)
	}
}

// New returns a Proxy for cfg, filling in default timeouts.
func New(cfg Config) (*Proxy, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	host, err := openHostNetns()
	if err != nil {
		return nil, err
	}
	return &Proxy{cfg: cfg, host: host}, nil
}

// Stats returns the node-wide connection counters.
func (p *Proxy) Stats() *Stats { return &p.stats }

// PodTunnel is one pod's data path: its listeners inside the pod's netns and
// the connections they carry.
type PodTunnel struct {
	pod   Pod
	proxy *Proxy
	netns ns.NetNS
	log   *slog.Logger

	listeners []net.Listener
	wg        sync.WaitGroup

	mu     sync.Mutex
	closed bool
	conns  map[*net.TCPConn]struct{}
}

// Attach opens the pod's capture listeners inside its netns and starts serving
// them. The listeners live in the pod's netns but belong to this process, so
// when the daemon stops they vanish and captured connections are refused.
func (p *Proxy) Attach(pod Pod) (*PodTunnel, error) {
	if len(pod.IPs) == 0 {
		return nil, fmt.Errorf("attach pod %s/%s: no IPs", pod.Namespace, pod.Name)
	}
	netns, err := ns.GetNS(pod.Netns)
	if err != nil {
		return nil, fmt.Errorf("attach pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	t := &PodTunnel{
		pod:   pod,
		proxy: p,
		netns: netns,
		log:   p.cfg.Log.With("pod", pod.Name, "namespace", pod.Namespace),
		conns: make(map[*net.TCPConn]struct{}),
	}
	if err := t.listen(); err != nil {
		t.Close()
		return nil, fmt.Errorf("attach pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return t, nil
}

func (t *PodTunnel) listen() error {
	var families []string
	if hasIPv4(t.pod.IPs) {
		families = append(families, "tcp4")
	}
	if hasIPv6(t.pod.IPs) {
		families = append(families, "tcp6")
	}
	for _, network := range families {
		for _, port := range []int{capture.OutboundPort, capture.InboundPort} {
			addr := net.JoinHostPort(wildcard(network), strconv.Itoa(port))
			lc := listenConfig(port == capture.InboundPort)
			var ln net.Listener
			err := t.netns.Do(func(ns.NetNS) error {
				var err error
				ln, err = lc.Listen(context.Background(), network, addr)
				return err
			})
			if err != nil {
				return fmt.Errorf("listen on %s in %s: %w", addr, t.pod.Netns, err)
			}
			t.listeners = append(t.listeners, ln)
			handle := t.outbound
			if port == capture.InboundPort {
				handle = t.inbound
			}
			t.wg.Add(1)
			go t.serve(ln, handle)
		}
	}
	return nil
}

func wildcard(network string) string {
	if network == "tcp6" {
		return "::"
	}
	return "0.0.0.0"
}

func hasIPv4(ips []netip.Addr) bool {
	for _, ip := range ips {
		if ip.Unmap().Is4() {
			return true
		}
	}
	return false
}

func hasIPv6(ips []netip.Addr) bool {
	for _, ip := range ips {
		if !ip.Unmap().Is4() {
			return true
		}
	}
	return false
}

func (t *PodTunnel) serve(ln net.Listener, handle func(*net.TCPConn)) {
	defer t.wg.Done()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if !isResourceShortage(err) {
				t.log.Error("accept failed; listener stops", "addr", ln.Addr().String(), "reason", err)
				return
			}
			// Out of descriptors or memory: the connections waiting in the backlog get their
			// turn once others have closed, as with net/http's servers.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			t.log.Warn("accept failed; retrying", "addr", ln.Addr().String(), "reason", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		tc := c.(*net.TCPConn)
		if !t.track(tc) {
			reset(tc)
			return
		}
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			defer t.untrack(tc)
			t.proxy.stats.Open.Add(1)
			defer t.proxy.stats.Open.Add(-1)
			handle(tc)
		}()
	}
}

// dial connects from inside the pod's netns, from local if valid, with keep-alive probes if
// remote (see hostNetns.dialIn, also for the goroutine it must run on).
func (t *PodTunnel) dial(ctx context.Context, local netip.Addr, dst netip.AddrPort, remote bool) (*net.TCPConn, error) {
	tc, err := t.proxy.host.dialIn(ctx, int(t.netns.Fd()), local, dst, remote)
	if err != nil {
		return nil, err
	}
	if !t.track(tc) {
		reset(tc)
		return nil, errors.New("pod detached")
	}
	return tc, nil
}

func (t *PodTunnel) track(c *net.TCPConn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.conns[c] = struct{}{}
	return true
}

func (t *PodTunnel) untrack(c *net.TCPConn) {
	t.mu.Lock()
	delete(t.conns, c)
	t.mu.Unlock()
	c.Close()
}

// Close stops the pod's listeners, resets its open connections and waits for
// their handlers to finish. The pod's capture rules stay: with nothing
// listening, its traffic is refused rather than sent in the clear.
func (t *PodTunnel) Close() {
	t.mu.Lock()
	t.closed = true
	for c := range t.conns {
		reset(c)
	}
	t.mu.Unlock()
	for _, ln := range t.listeners {
		ln.Close()
	}
	t.wg.Wait()
	t.netns.Close()
}

// reset closes c with an RST instead of a FIN, so the peer sees a failure.
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	c.Close()
}

// isResourceShortage tells apart the accept errors that pass when other connections close.
func isResourceShortage(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// isRefused tells a closed port (the peer answered with RST) apart from other
// dial failures, for the connection log.
func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }
