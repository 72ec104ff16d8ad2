package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/meshless/meshless/pkg/capture"
	"github.com/meshless/meshless/pkg/enroll"
	meshtls "github.com/meshless/meshless/pkg/tls"
	"github.com/meshless/meshless/pkg/tunnel"
)

// These tests wire two pods to a bridge by hand (no CNI: the conformance suite
// covers that path) and run the agent, the data path and the capture rules
// together in this process.

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

type testNode struct {
	name     string
	gateway4 netip.Addr
	gateway6 netip.Addr
}

type testPod struct {
	name  string
	netns string
	ips   []netip.Addr
}

func newNode(t *testing.T) *testNode {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	suffix := make([]byte, 3)
	rand.Read(suffix)
	n := &testNode{
		name:     "mlagt-" + hex.EncodeToString(suffix),
		gateway4: netip.MustParseAddr("10.77.0.1"),
		gateway6: netip.MustParseAddr("fd77::1"),
	}
	run(t, "ip", "netns", "add", n.name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.name).Run() })
	run(t, "ip", "-n", n.name, "link", "add", "br0", "type", "bridge")
	run(t, "ip", "-n", n.name, "addr", "add", "10.77.0.1/24", "dev", "br0")
	run(t, "ip", "-n", n.name, "addr", "add", "fd77::1/64", "dev", "br0", "nodad")
	run(t, "ip", "-n", n.name, "link", "set", "br0", "up")
	run(t, "ip", "-n", n.name, "link", "set", "lo", "up")
	return n
}

func (n *testNode) addPod(t *testing.T, index int) *testPod {
	t.Helper()
	p := &testPod{
		name: fmt.Sprintf("%s-p%d", n.name, index),
		ips: []netip.Addr{
			netip.MustParseAddr(fmt.Sprintf("10.77.0.%d", 10+index)),
			netip.MustParseAddr(fmt.Sprintf("fd77::%d", 10+index)),
		},
	}
	p.netns = "/var/run/netns/" + p.name
	host := fmt.Sprintf("veth%d", index)
	run(t, "ip", "netns", "add", p.name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", p.name).Run() })
	run(t, "ip", "-n", n.name, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", p.name)
	run(t, "ip", "-n", n.name, "link", "set", host, "master", "br0", "up")
	run(t, "ip", "-n", p.name, "link", "set", "lo", "up")
	run(t, "ip", "-n", p.name, "addr", "add", p.ips[0].String()+"/24", "dev", "eth0")
	run(t, "ip", "-n", p.name, "addr", "add", p.ips[1].String()+"/64", "dev", "eth0", "nodad")
	run(t, "ip", "-n", p.name, "link", "set", "eth0", "up")
	run(t, "ip", "-n", p.name, "route", "add", "default", "via", n.gateway4.String())
	run(t, "ip", "-n", p.name, "-6", "route", "add", "default", "via", n.gateway6.String())
	err := capture.Apply(p.netns, capture.Config{
		Backend: capture.NFT,
		PodIPs:  p.ips,
		NodeIPs: []netip.Addr{n.gateway4, n.gateway6},
	})
	if err != nil {
		t.Fatalf("capture: %v", err)
	}
	return p
}

// logBuffer collects the agent's JSON log lines for assertions.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) records(msg string) []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(l.buf.Bytes()))
	for sc.Scan() {
		var r map[string]any
		if json.Unmarshal(sc.Bytes(), &r) == nil && r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

type fixture struct {
	agent *Agent
	logs  *logBuffer
	stop  context.CancelFunc
}

func newAgent(t *testing.T, mode tunnel.Mode, stateDir, caDir string) *fixture {
	t.Helper()
	ca, err := meshtls.LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	logs := &logBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	src := meshtls.NewCASource(ca, td, time.Hour, log)
	ctx, cancel := context.WithCancel(context.Background())
	go src.Run(ctx)
	configs := meshtls.NewConfigs(src, tlsconfig.AuthorizeMemberOf(td))
	proxy, err := tunnel.New(tunnel.Config{
		TLS:  configs,
		Mesh: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16"), netip.MustParsePrefix("fd77::/64")},
		Mode: mode,
		Log:  log,
	})
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(Config{
		Node:        "test",
		TrustDomain: td,
		Mode:        mode,
		Backend:     capture.NFT,
		StateDir:    stateDir,
		Accounts:    WorkloadsFile{meshtls.Workloads{"shop/client": "buyer", "shop/server": "seller"}},
		Identities:  src,
		TLS:         configs,
		Proxy:       proxy,
		Log:         log,
	})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{agent: a, logs: logs, stop: cancel}
	t.Cleanup(f.close)
	return f
}

func (f *fixture) close() {
	f.agent.Close()
	f.stop()
}

func (f *fixture) enroll(t *testing.T, p *testPod, name string) {
	t.Helper()
	_, err := f.agent.Enroll(context.Background(), enroll.Pod{
		ContainerID: "c-" + strings.ReplaceAll(p.name, "mlagt-", ""),
		IfName:      "eth0",
		Netns:       p.netns,
		Namespace:   "shop",
		Name:        name,
		IPs:         p.ips,
	})
	if err != nil {
		t.Fatalf("enroll %s: %v", name, err)
	}
}

// echoServer listens in the pod's netns on port and answers each connection
// with "from <remote addr>\n" followed by whatever the client sends.
func echoServer(t *testing.T, p *testPod, port int) {
	t.Helper()
	var lns []net.Listener
	err := ns.WithNetNSPath(p.netns, func(ns.NetNS) error {
		for _, addr := range []string{"0.0.0.0", "::"} {
			network := "tcp4"
			if addr == "::" {
				network = "tcp6"
			}
			ln, err := net.Listen(network, net.JoinHostPort(addr, fmt.Sprint(port)))
			if err != nil {
				return err
			}
			lns = append(lns, ln)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, ln := range lns {
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
					fmt.Fprintf(c, "from %s\n", host)
					io.Copy(c, c)
				}()
			}
		}()
	}
}

// dialFrom connects from inside the pod's netns, as the pod's app would.
func dialFrom(t *testing.T, p *testPod, dst netip.AddrPort) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	err := ns.WithNetNSPath(p.netns, func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp", dst.String(), 5*time.Second)
		return err
	})
	return c, err
}

func exchange(t *testing.T, c net.Conn, msg string) (greeting, echo string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	greeting, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("greeting: %v", err)
	}
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	rest, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("echo: %v", err)
	}
	return strings.TrimSpace(greeting), string(rest)
}

func TestPodsTalkOverMTLS(t *testing.T) {
	node := newNode(t)
	client, server := node.addPod(t, 1), node.addPod(t, 2)
	caDir := t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	f := newAgent(t, tunnel.Strict, t.TempDir(), caDir)
	f.enroll(t, client, "client")
	f.enroll(t, server, "server")
	echoServer(t, server, 8080)

	for _, i := range []int{0, 1} {
		dst := netip.AddrPortFrom(server.ips[i], 8080)
		c, err := dialFrom(t, client, dst)
		if err != nil {
			t.Fatalf("dial %s: %v", dst, err)
		}
		greeting, echo := exchange(t, c, "marker-"+dst.String())
		c.Close()
		if want := "from " + client.ips[i].String(); greeting != want {
			t.Errorf("server saw %q, want %q (source address must be preserved)", greeting, want)
		}
		if echo != "marker-"+dst.String() {
			t.Errorf("echo %q", echo)
		}
	}

	waitFor(t, func() bool { return len(f.logs.records("connection")) >= 4 })
	seen := map[string]string{}
	for _, r := range f.logs.records("connection") {
		if r["result"] != "ok" || r["mtls"] != true {
			t.Errorf("connection not ok over mTLS: %v", r)
		}
		if r["tls_group"] != "X25519MLKEM768" {
			t.Errorf("key exchange %v, want the post-quantum X25519MLKEM768", r["tls_group"])
		}
		seen[r["direction"].(string)] = fmt.Sprint(r["peer_id"])
	}
	if got := seen["outbound"]; got != "spiffe://cluster.local/ns/shop/sa/seller" {
		t.Errorf("outbound peer_id = %q", got)
	}
	if got := seen["inbound"]; got != "spiffe://cluster.local/ns/shop/sa/buyer" {
		t.Errorf("inbound peer_id = %q", got)
	}
}

func TestStrictRefusesPlaintextAndPermissiveForwards(t *testing.T) {
	node := newNode(t)
	outsider, server := node.addPod(t, 1), node.addPod(t, 2)
	caDir := t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	// The outsider has capture rules but is not enrolled: remove them so it
	// behaves like a pod outside the mesh.
	if err := capture.Remove(outsider.netns, capture.Config{Backend: capture.NFT, PodIPs: outsider.ips}); err != nil {
		t.Fatal(err)
	}
	echoServer(t, server, 8080)
	dst := netip.AddrPortFrom(server.ips[0], 8080)

	strict := newAgent(t, tunnel.Strict, t.TempDir(), caDir)
	strict.enroll(t, server, "server")
	c, err := dialFrom(t, outsider, dst)
	if err == nil {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = io.ReadAll(c)
		c.Close()
	}
	if err == nil {
		t.Fatal("strict mode let plaintext from outside the mesh through")
	}
	strict.close()

	permissive := newAgent(t, tunnel.Permissive, t.TempDir(), caDir)
	permissive.enroll(t, server, "server")
	c, err = dialFrom(t, outsider, dst)
	if err != nil {
		t.Fatal(err)
	}
	// The outsider speaks first, as plaintext HTTP would.
	io.WriteString(c, "plain")
	c.(*net.TCPConn).CloseWrite()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || string(got) != "from "+outsider.ips[0].String()+"\nplain" {
		t.Fatalf("permissive: got %q, %v", got, err)
	}
}

func TestRestartReattachesAndFailsClosedMeanwhile(t *testing.T) {
	node := newNode(t)
	client, server := node.addPod(t, 1), node.addPod(t, 2)
	caDir, stateDir := t.TempDir(), t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	echoServer(t, server, 8080)
	dst := netip.AddrPortFrom(server.ips[0], 8080)

	first := newAgent(t, tunnel.Strict, stateDir, caDir)
	first.enroll(t, client, "client")
	first.enroll(t, server, "server")
	first.close()

	if c, err := dialFrom(t, client, dst); err == nil {
		c.Close()
		t.Fatal("connection accepted while the daemon was down")
	}

	second := newAgent(t, tunnel.Strict, stateDir, caDir)
	if n := second.agent.Restore(); n != 2 {
		t.Fatalf("re-attached %d pods, want 2", n)
	}
	c, err := dialFrom(t, client, dst)
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
	greeting, echo := exchange(t, c, "again")
	c.Close()
	if greeting != "from "+client.ips[0].String() || echo != "again" {
		t.Fatalf("after restart: %q %q", greeting, echo)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A restarted daemon that finds a pod's capture port still held (the old
// daemon is exiting during an upgrade) keeps the pod pending and attaches it
// as soon as the port is free.
func TestRestoreRetriesBusyPod(t *testing.T) {
	node := newNode(t)
	client, server := node.addPod(t, 1), node.addPod(t, 2)
	caDir, stateDir := t.TempDir(), t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	echoServer(t, server, 8080)
	first := newAgent(t, tunnel.Strict, stateDir, caDir)
	first.enroll(t, client, "client")
	first.enroll(t, server, "server")
	first.close()

	var busy net.Listener
	err := ns.WithNetNSPath(client.netns, func(ns.NetNS) error {
		var err error
		busy, err = net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", capture.OutboundPort))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	second := newAgent(t, tunnel.Strict, stateDir, caDir)
	if n := second.agent.Restore(); n != 1 {
		t.Fatalf("re-attached %d pods while one port was busy, want 1", n)
	}
	busy.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go second.agent.Reconcile(ctx, 50*time.Millisecond)
	waitFor(t, func() bool { return second.agent.Status(ctx).Pods == 2 })

	c, err := dialFrom(t, client, netip.AddrPortFrom(server.ips[0], 8080))
	if err != nil {
		t.Fatal(err)
	}
	_, echo := exchange(t, c, "retry")
	c.Close()
	if echo != "retry" {
		t.Fatalf("echo %q", echo)
	}
}
