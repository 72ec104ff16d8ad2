package agent

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/meshless/meshless/internal/logtest"
	"github.com/meshless/meshless/internal/podnet"
	"github.com/meshless/meshless/pkg/capture"
	"github.com/meshless/meshless/pkg/enroll"
	meshtls "github.com/meshless/meshless/pkg/tls"
	"github.com/meshless/meshless/pkg/tunnel"
)

// These tests wire pods to a bridge by hand (internal/podnet; the conformance
// suite covers the CNI path) and run the agent, the data path and the capture
// rules together in this process.

type fixture struct {
	agent *Agent
	logs  *logtest.Buffer
	stop  context.CancelFunc
}

func newAgent(t *testing.T, mode tunnel.Mode, stateDir, caDir string) *fixture {
	t.Helper()
	ca, err := meshtls.LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	logs := &logtest.Buffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	src := meshtls.NewCASource(ca, td, time.Hour, log)
	ctx, cancel := context.WithCancel(context.Background())
	go src.Run(ctx)
	configs := meshtls.NewConfigs(src, tlsconfig.AuthorizeMemberOf(td))
	proxy, err := tunnel.New(tunnel.Config{
		TLS:  configs,
		Mesh: podnet.Mesh,
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
		Directory:   WorkloadsFile{meshtls.Workloads{"shop/client": "buyer", "shop/server": "seller"}},
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

func (f *fixture) enroll(t *testing.T, p *podnet.Pod, name string) {
	t.Helper()
	_, err := f.agent.Enroll(context.Background(), enroll.Pod{
		ContainerID: "c-" + strings.ReplaceAll(p.Name, "mlagt-", ""),
		IfName:      "eth0",
		Netns:       p.Netns,
		Namespace:   "shop",
		Name:        name,
		IPs:         p.IPs,
	})
	if err != nil {
		t.Fatalf("enroll %s: %v", name, err)
	}
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
	node := podnet.NewNode(t, "mlagt-")
	client, server := node.AddPod(t, 1), node.AddPod(t, 2)
	caDir := t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	f := newAgent(t, tunnel.Strict, t.TempDir(), caDir)
	f.enroll(t, client, "client")
	f.enroll(t, server, "server")
	podnet.EchoServer(t, server, 8080)

	for _, i := range []int{0, 1} {
		dst := netip.AddrPortFrom(server.IPs[i], 8080)
		c, err := podnet.Dial(client, dst)
		if err != nil {
			t.Fatalf("dial %s: %v", dst, err)
		}
		greeting, echo := exchange(t, c, "marker-"+dst.String())
		c.Close()
		if want := "from " + client.IPs[i].String(); greeting != want {
			t.Errorf("server saw %q, want %q (source address must be preserved)", greeting, want)
		}
		if echo != "marker-"+dst.String() {
			t.Errorf("echo %q", echo)
		}
	}

	waitFor(t, func() bool { return len(f.logs.Records("connection")) >= 4 })
	seen := map[string]string{}
	for _, r := range f.logs.Records("connection") {
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
	node := podnet.NewNode(t, "mlagt-")
	outsider, server := node.AddPod(t, 1), node.AddPod(t, 2)
	caDir := t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	// The outsider has capture rules but is not enrolled: remove them so it
	// behaves like a pod outside the mesh.
	if err := capture.Remove(outsider.Netns, capture.Config{Backend: capture.NFT, PodIPs: outsider.IPs}); err != nil {
		t.Fatal(err)
	}
	podnet.EchoServer(t, server, 8080)
	dst := netip.AddrPortFrom(server.IPs[0], 8080)

	strict := newAgent(t, tunnel.Strict, t.TempDir(), caDir)
	strict.enroll(t, server, "server")
	c, err := podnet.Dial(outsider, dst)
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
	c, err = podnet.Dial(outsider, dst)
	if err != nil {
		t.Fatal(err)
	}
	// The outsider speaks first, as plaintext HTTP would.
	io.WriteString(c, "plain")
	c.(*net.TCPConn).CloseWrite()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || string(got) != "from "+outsider.IPs[0].String()+"\nplain" {
		t.Fatalf("permissive: got %q, %v", got, err)
	}
}

func TestRestartReattachesAndFailsClosedMeanwhile(t *testing.T) {
	node := podnet.NewNode(t, "mlagt-")
	client, server := node.AddPod(t, 1), node.AddPod(t, 2)
	caDir, stateDir := t.TempDir(), t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	podnet.EchoServer(t, server, 8080)
	dst := netip.AddrPortFrom(server.IPs[0], 8080)

	first := newAgent(t, tunnel.Strict, stateDir, caDir)
	first.enroll(t, client, "client")
	first.enroll(t, server, "server")
	first.close()

	if c, err := podnet.Dial(client, dst); err == nil {
		c.Close()
		t.Fatal("connection accepted while the daemon was down")
	}

	second := newAgent(t, tunnel.Strict, stateDir, caDir)
	if n := second.agent.Restore(); n != 2 {
		t.Fatalf("re-attached %d pods, want 2", n)
	}
	c, err := podnet.Dial(client, dst)
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
	greeting, echo := exchange(t, c, "again")
	c.Close()
	if greeting != "from "+client.IPs[0].String() || echo != "again" {
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
	node := podnet.NewNode(t, "mlagt-")
	client, server := node.AddPod(t, 1), node.AddPod(t, 2)
	caDir, stateDir := t.TempDir(), t.TempDir()
	if err := meshtls.InitCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	podnet.EchoServer(t, server, 8080)
	first := newAgent(t, tunnel.Strict, stateDir, caDir)
	first.enroll(t, client, "client")
	first.enroll(t, server, "server")
	first.close()

	var busy net.Listener
	err := ns.WithNetNSPath(client.Netns, func(ns.NetNS) error {
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

	c, err := podnet.Dial(client, netip.AddrPortFrom(server.IPs[0], 8080))
	if err != nil {
		t.Fatal(err)
	}
	_, echo := exchange(t, c, "retry")
	c.Close()
	if echo != "retry" {
		t.Fatalf("echo %q", echo)
	}
}
