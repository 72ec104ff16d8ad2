package tunnel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"

	"github.com/meshless/meshless/internal/benchcpu"
	"github.com/meshless/meshless/internal/logtest"
	"github.com/meshless/meshless/pkg/capture"
	meshtls "github.com/meshless/meshless/pkg/tls"
)

// podPair is two pods wired by a veth pair, both captured and attached to one in-process Proxy,
// the way a node daemon serves two pods of its node: the data path end to end without CNI, for
// tests and for profiling (go test -bench Pods -cpuprofile ...).
type podPair struct {
	client, server   *testPod
	proxy            *Proxy
	logs             *logtest.Buffer
	serverAddr       netip.AddrPort
	clientIP         netip.Addr
	accepted         chan acceptedConn
	serverListener   net.Listener
	clientT, serverT *PodTunnel
}

type testPod struct {
	name  string
	path  string
	netns ns.NetNS
}

type acceptedConn struct {
	conn net.Conn
	peer netip.AddrPort
}

const (
	pairServerPort = 8080
	// pairEcho makes the server echo; pairPeer makes it answer with the client's address;
	// pairSink makes it read and discard.
	pairEcho = 'e'
	pairPeer = 'p'
	pairSink = 's'
)

var (
	pairClientIP = netip.MustParseAddr("10.98.0.2")
	pairServerIP = netip.MustParseAddr("10.98.0.3")
	pairMesh     = netip.MustParsePrefix("10.98.0.0/24")
)

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, iptables)")
	}
}

// newPodPair builds the two pods and attaches them. The server pod runs a one-byte-command
// server on pairServerPort: pairEcho echoes until the client half-closes, then half-closes;
// pairPeer writes the client's address and closes.
func newPodPair(t testing.TB, opts ...meshtls.Option) *podPair {
	t.Helper()
	needRoot(t)
	backend, err := capture.DetectBackend()
	if err != nil {
		t.Fatal(err)
	}
	p := &podPair{logs: &logtest.Buffer{}, serverAddr: netip.AddrPortFrom(pairServerIP, pairServerPort), clientIP: pairClientIP}
	p.client = newTestPod(t)
	p.server = newTestPod(t)
	run(t, "ip", "-n", p.client.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", p.server.name)
	for _, pod := range []struct {
		*testPod
		ip netip.Addr
	}{{p.client, pairClientIP}, {p.server, pairServerIP}} {
		run(t, "ip", "-n", pod.name, "link", "set", "lo", "up")
		run(t, "ip", "-n", pod.name, "addr", "add", pod.ip.String()+"/24", "dev", "eth0")
		run(t, "ip", "-n", pod.name, "link", "set", "eth0", "up")
		if err := capture.Apply(pod.path, capture.Config{Backend: backend, PodIPs: []netip.Addr{pod.ip}}); err != nil {
			t.Fatal(err)
		}
	}

	td, src := testCASource(t)
	configs := meshtls.NewConfigs(src, nil, opts...)
	src.OnBundleChange(configs.Reset)
	p.proxy, err = New(Config{
		TLS:  configs,
		Mesh: []netip.Prefix{pairMesh},
		Log:  slog.New(slog.NewJSONHandler(p.logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	attach := func(pod *testPod, name string, ip netip.Addr) *PodTunnel {
		id := spiffeid.RequireFromPath(td, "/ns/test/sa/"+name)
		if err := src.Acquire(meshtls.Workload{ID: id}); err != nil {
			t.Fatal(err)
		}
		pt, err := p.proxy.Attach(Pod{Namespace: "test", Name: name, Netns: pod.path, IPs: []netip.Addr{ip}, ID: id})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pt.Close)
		return pt
	}
	p.clientT = attach(p.client, "client", pairClientIP)
	p.serverT = attach(p.server, "server", pairServerIP)

	p.serverListener = listenIn(t, p.server.netns, netip.AddrPortFrom(pairServerIP, pairServerPort))
	p.accepted = make(chan acceptedConn, 16)
	go p.serve()
	return p
}

func newTestPod(t testing.TB) *testPod {
	t.Helper()
	suffix := make([]byte, 5)
	if _, err := rand.Read(suffix); err != nil {
		t.Fatal(err)
	}
	prefix := "mlpf-"
	if p := os.Getenv("MESHLESS_TEST_NETNS_PREFIX"); p != "" {
		prefix = p
	}
	name := prefix + hex.EncodeToString(suffix)
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	path := "/var/run/netns/" + name
	netns, err := ns.GetNS(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Close() })
	return &testPod{name: name, path: path, netns: netns}
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

func listenIn(t testing.TB, netns ns.NetNS, addr netip.AddrPort) net.Listener {
	t.Helper()
	var ln net.Listener
	err := netns.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func (p *podPair) serve() {
	for {
		c, err := p.serverListener.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			peer := addrPort(c.RemoteAddr())
			select {
			case p.accepted <- acceptedConn{c, peer}:
			default:
			}
			var cmd [1]byte
			if _, err := io.ReadFull(c, cmd[:]); err != nil {
				return
			}
			switch cmd[0] {
			case pairEcho:
				if _, err := io.Copy(c, c); err == nil {
					c.(*net.TCPConn).CloseWrite()
				}
				// Wait for the client to close, so that it sees our half-close first.
				io.Copy(io.Discard, c)
			case pairPeer:
				c.Write([]byte(peer.String() + "\n"))
			case pairSink:
				io.Copy(io.Discard, c)
			}
		}()
	}
}

// dial connects from the client pod, as its app would.
func (p *podPair) dial(t testing.TB) *net.TCPConn {
	t.Helper()
	return p.dialWith(t, net.Dialer{Timeout: 10 * time.Second})
}

// dialWith connects from the client pod with d, as an app with those socket options would.
func (p *podPair) dialWith(t testing.TB, d net.Dialer) *net.TCPConn {
	t.Helper()
	var c net.Conn
	err := p.client.netns.Do(func(ns.NetNS) error {
		var err error
		c, err = d.DialContext(context.Background(), "tcp4", p.serverAddr.String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// logLines returns the connection log lines written so far.
func (p *podPair) logLines(t testing.TB) []map[string]any {
	t.Helper()
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(p.logs.String()))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		if m["msg"] == "connection" {
			lines = append(lines, m)
		}
	}
	return lines
}

// waitLogLines returns the connection log lines once there are at least n, or whatever there is
// after 10 seconds. Each proxy logs a connection once it has closed both ends, which may be after
// the client read its answer.
func (p *podPair) waitLogLines(t testing.TB, n int) []map[string]any {
	t.Helper()
	var lines []map[string]any
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if lines = p.logLines(t); len(lines) >= n || time.Now().After(deadline) {
			return lines
		}
	}
}

// TestPodsEndToEnd carries connections between two attached pods over mTLS: bytes arrive intact
// both ways, the server sees the client pod's own address, a half-close travels through both
// proxies, and each side logs one line naming the peer's identity.
func TestPodsEndToEnd(t *testing.T) {
	p := newPodPair(t)

	c := p.dial(t)
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	payload := make([]byte, 1<<20)
	rand.Read(payload)
	go func() {
		c.Write([]byte{pairEcho})
		c.Write(payload)
		c.CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo: got %d bytes, want the %d sent", len(got), len(payload))
	}
	select {
	case a := <-p.accepted:
		if a.peer.Addr() != pairClientIP {
			t.Errorf("server saw the connection from %s, want the client pod's %s", a.peer, pairClientIP)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server accepted nothing")
	}
	c.Close()

	lines := p.waitLogLines(t, 2)
	if len(lines) != 2 {
		t.Fatalf("got %d connection log lines, want 2: %v", len(lines), lines)
	}
	peers := map[string]string{"outbound": "spiffe://cluster.local/ns/test/sa/server", "inbound": "spiffe://cluster.local/ns/test/sa/client"}
	for _, l := range lines {
		dir, _ := l["direction"].(string)
		if l["mtls"] != true || l["result"] != resultOK || l["peer_id"] != peers[dir] {
			t.Errorf("%s line: %v", dir, l)
		}
		if l["dst"] != p.serverAddr.String() {
			t.Errorf("%s line: dst %v, want %s", dir, l["dst"], p.serverAddr)
		}
	}
}

// TestPodsMultipathTCPApp: an app that dials with Multipath TCP (curl --mptcp, a Go program with
// MPTCP turned on, mptcpize) is carried like any other, over mTLS, not refused.
func TestPodsMultipathTCPApp(t *testing.T) {
	needMultipathTCP(t)
	p := newPodPair(t)
	d := net.Dialer{Timeout: 10 * time.Second}
	d.SetMultipathTCP(true)
	c := p.dialWith(t, d)
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write([]byte{pairEcho, 'h', 'i'}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "hi" {
		t.Fatalf("echo through the capture = %q, %v; want \"hi\"", got, err)
	}
	c.Close()
	lines := p.waitLogLines(t, 2)
	for _, l := range lines {
		if l["direction"] == "outbound" && (l["mtls"] != true || l["result"] != resultOK) {
			t.Errorf("outbound line: %v", l)
		}
	}
	if len(lines) != 2 {
		t.Fatalf("got %d connection log lines, want 2: %v", len(lines), lines)
	}
}

// TestPodsNewConnections opens connections one after another, so that every one after the first
// resumes a session, on both sides; each must reach the server from the client pod's own address.
// The log lines and the proxy's handshake counters must say so.
func TestPodsNewConnections(t *testing.T) {
	p := newPodPair(t)
	const conns = 5
	for i := range conns {
		if got := p.peerOf(t); got.Addr() != pairClientIP {
			t.Fatalf("connection %d: server saw %s, want %s", i, got, pairClientIP)
		}
	}
	lines := p.waitLogLines(t, 2*conns)
	resumed := map[any]int{}
	for _, l := range lines {
		if l["tls_resumed"] == true {
			resumed[l["direction"]]++
		}
	}
	for _, dir := range []string{"outbound", "inbound"} {
		if resumed[dir] != conns-1 {
			t.Errorf("%s: %d handshakes resumed a session, want %d: %v", dir, resumed[dir], conns-1, lines)
		}
	}
	stats := p.proxy.Stats()
	for dir, h := range map[string]*Handshakes{"outbound": &stats.Outbound, "inbound": &stats.Inbound} {
		if total, resumed := h.Total.Load(), h.Resumed.Load(); total != conns || resumed != conns-1 {
			t.Errorf("%s handshakes counted: %d, %d resumed; want %d, %d resumed", dir, total, resumed, conns, conns-1)
		}
	}
}

// peerOf opens a connection and returns the client address the server saw.
func (p *podPair) peerOf(t testing.TB) netip.AddrPort {
	t.Helper()
	c := p.dial(t)
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write([]byte{pairPeer}); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read peer: %v", err)
	}
	ap, err := netip.ParseAddrPort(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// BenchmarkPodsRequestResponse is a 64-byte ping-pong on one warm connection through both
// proxies of the pair, in-process, so that a CPU or allocation profile sees the whole data path.
func BenchmarkPodsRequestResponse(b *testing.B) {
	p := newPodPair(b)
	c := p.dial(b)
	defer c.Close()
	if _, err := c.Write([]byte{pairEcho}); err != nil {
		b.Fatal(err)
	}
	msg, buf := make([]byte, 64), make([]byte, 64)
	b.ReportAllocs()
	start := benchcpu.Now(b)
	for b.Loop() {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	benchcpu.Report(b, start)
}

// BenchmarkPodsNewConnection opens a connection per request through both proxies: a resumed
// handshake, two dials inside pod namespaces and the connection log, in-process; with the default
// hybrid post-quantum key exchange and with X25519 alone (--pq=false).
func BenchmarkPodsNewConnection(b *testing.B) {
	for _, v := range []struct {
		name string
		pq   bool
	}{{"pq", true}, {"x25519", false}} {
		b.Run(v.name, func(b *testing.B) {
			p := newPodPair(b, meshtls.PostQuantum(v.pq))
			b.ReportAllocs()
			start := benchcpu.Now(b)
			for b.Loop() {
				p.peerOf(b)
			}
			benchcpu.Report(b, start)
		})
	}
}

// BenchmarkPodsBulk streams 64 KiB writes from the client pod to the server pod through both
// proxies.
func BenchmarkPodsBulk(b *testing.B) {
	p := newPodPair(b)
	c := p.dial(b)
	defer c.Close()
	if _, err := c.Write([]byte{pairSink}); err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	start := benchcpu.Now(b)
	for b.Loop() {
		if _, err := c.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	benchcpu.Report(b, start)
}

// TestDialInErrors checks that a dial into a pod's netns reports a refusal and a timeout the way
// a Dialer does, since the connection log classifies them.
func TestDialInErrors(t *testing.T) {
	p := newPodPair(t)
	host := p.proxy.host
	podNS := int(p.client.netns.Fd())

	// Inbound connections to a pod are captured, except those to its own address from itself.
	_, err := host.dialIn(context.Background(), int(p.server.netns.Fd()), netip.Addr{}, netip.AddrPortFrom(pairServerIP, 9), true)
	if !isRefused(err) {
		t.Errorf("dial to a closed port: %v, want connection refused", err)
	}

	// Nobody answers ARP for this address of the pods' subnet.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = host.dialIn(ctx, podNS, netip.Addr{}, netip.MustParseAddrPort("10.98.0.99:80"), true)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("dial to a silent address: %v, want a timeout", err)
	}

	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	_, err = host.dialIn(ctx, podNS, netip.Addr{}, netip.MustParseAddrPort("10.98.0.99:80"), true)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled dial: %v, want context.Canceled", err)
	}
}

// TestDialInSocket checks what a dial into a pod's netns makes: a socket of the pod's netns with
// the daemon's mark, keep-alive probes only for a remote destination, and the dialling thread
// back in the daemon's netns afterwards.
func TestDialInSocket(t *testing.T) {
	p := newPodPair(t)
	host := p.proxy.host
	// A pod's connections to its own address are not captured.
	dst := netip.AddrPortFrom(pairServerIP, pairServerPort)
	for _, remote := range []bool{true, false} {
		c, err := host.dialIn(context.Background(), int(p.server.netns.Fd()), netip.Addr{}, dst, remote)
		if err != nil {
			t.Fatalf("remote %v: %v", remote, err)
		}
		if got := addrPort(c.LocalAddr()).Addr(); got != pairServerIP {
			t.Errorf("remote %v: local address %v, want the pod's %v", remote, got, pairServerIP)
		}
		if got := addrPort(c.RemoteAddr()); got != dst {
			t.Errorf("remote %v: remote address %v, want %v", remote, got, dst)
		}
		checkSockopts(t, c, wantSockopts(remote))
		c.Close()
	}

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if thread, daemon := netnsInode(t, "/proc/thread-self/ns/net"), netnsInode(t, "/proc/self/fd/"+strconv.Itoa(host.fd)); thread != daemon {
		t.Errorf("the dialling thread is in netns %d, want the daemon's %d", thread, daemon)
	}
}

// checkSockopts checks integer socket options of c: name to level, option, value.
func checkSockopts(t *testing.T, c syscall.Conn, want map[string][3]int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for name, w := range want {
		var got int
		err := control(rc, func(fd int) error {
			var err error
			got, err = unix.GetsockoptInt(fd, w[0], w[1])
			return err
		})
		if err != nil {
			t.Errorf("getsockopt %s: %v", name, err)
		} else if got != w[2] {
			t.Errorf("%s = %d, want %d", name, got, w[2])
		}
	}
}

func netnsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// BenchmarkPodsOpenConnection keeps b.N connections open and idle after one small exchange each,
// and reports the memory they hold (heap and goroutine stacks, after a GC) per connection: both
// proxies' share, with the test client's and server's ends of each connection included. Each
// connection holds six descriptors in this one process: keep b.N well under RLIMIT_NOFILE / 6
// (-benchtime 1000x).
func BenchmarkPodsOpenConnection(b *testing.B) {
	p := newPodPair(b)
	var conns []*net.TCPConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	heap0, stack0 := inUse()
	msg := make([]byte, 64)
	for b.Loop() {
		c := p.dial(b)
		conns = append(conns, c)
		if _, err := c.Write(append([]byte{pairEcho}, msg...)); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, msg); err != nil {
			b.Fatal(err)
		}
	}
	heap, stack := inUse()
	b.ReportMetric(float64(heap-heap0)/float64(b.N), "heap-B/conn")
	b.ReportMetric(float64(stack-stack0)/float64(b.N), "stack-B/conn")
}

// inUse returns the bytes of heap spans and goroutine stacks in use, after a collection (two:
// the first one's finalizers free more).
func inUse() (heap, stack int64) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse), int64(ms.StackInuse)
}

// BenchmarkAttach attaches b.N pods (network namespaces without capture rules) and reports the
// memory each one holds: its listeners, their goroutines and the namespace handle.
func BenchmarkAttach(b *testing.B) {
	needRoot(b)
	configs := meshtls.NewConfigs(nil, nil)
	proxy, err := New(Config{TLS: configs, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	pods := make([]*testPod, b.N)
	for i := range pods {
		pods[i] = newTestPod(b)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/test/sa/default")
	heap0, stack0 := inUse()
	b.ResetTimer()
	for _, pod := range pods {
		pt, err := proxy.Attach(Pod{Namespace: "test", Name: pod.name, Netns: pod.path, IPs: []netip.Addr{pairClientIP}, ID: id})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(pt.Close)
	}
	b.StopTimer()
	heap, stack := inUse()
	b.ReportMetric(float64(heap-heap0)/float64(b.N), "heap-B/pod")
	b.ReportMetric(float64(stack-stack0)/float64(b.N), "stack-B/pod")
}
