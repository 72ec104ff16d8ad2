package spire

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/meshless/meshless/internal/logtest"
	"github.com/meshless/meshless/internal/podnet"
	"github.com/meshless/meshless/pkg/agent"
	"github.com/meshless/meshless/pkg/capture"
	"github.com/meshless/meshless/pkg/enroll"
	meshtls "github.com/meshless/meshless/pkg/tls"
	"github.com/meshless/meshless/pkg/tunnel"
)

// These tests run the daemon's core (pkg/agent, pkg/tunnel) with SPIRE as its identity source and
// pods in network namespaces on a bridge (internal/podnet), as pkg/agent's tests do.

// daemon is the node daemon's core with the SPIRE source.
type daemon struct {
	src     *Source
	configs *meshtls.Configs
	agent   *agent.Agent
	logs    *logtest.Buffer
}

func newDaemon(t *testing.T, env *spireEnv, accounts meshtls.Workloads) *daemon {
	t.Helper()
	logs := &logtest.Buffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	src := newSource(t, env, logs)
	configs := meshtls.NewConfigs(src, tlsconfig.AuthorizeMemberOf(testTD))
	proxy, err := tunnel.New(tunnel.Config{TLS: configs, Mesh: podnet.Mesh, Mode: tunnel.Strict, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(agent.Config{
		Node:        "test",
		TrustDomain: testTD,
		Mode:        tunnel.Strict,
		Backend:     capture.NFT,
		StateDir:    t.TempDir(),
		Directory:   agent.WorkloadsFile{Workloads: accounts},
		Identities:  src,
		TLS:         configs,
		Proxy:       proxy,
		Log:         log,
	})
	if err != nil {
		t.Fatal(err)
	}
	// Registered after newSource's cleanup, so it runs first: pods go before the source.
	t.Cleanup(a.Close)
	return &daemon{src: src, configs: configs, agent: a, logs: logs}
}

func (d *daemon) enroll(p *podnet.Pod, name string) error {
	_, err := d.agent.Enroll(context.Background(), enroll.Pod{
		ContainerID: "c-" + p.Name,
		IfName:      "eth0",
		Netns:       p.Netns,
		Namespace:   "shop",
		Name:        name,
		UID:         "uid-" + p.Name,
		IPs:         p.IPs,
	})
	return err
}

// conn is a client connection from inside a pod, as the pod's app would open it.
type conn struct {
	net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, from, to *podnet.Pod) (*conn, error) {
	t.Helper()
	c, err := podnet.Dial(from, netip.AddrPortFrom(to.IPs[0], 8080))
	if err != nil {
		return nil, err
	}
	cc := &conn{Conn: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	greeting, err := cc.r.ReadString('\n')
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if want := "from " + from.IPs[0].String() + "\n"; greeting != want {
		c.Close()
		return nil, fmt.Errorf("greeting %q, want %q", greeting, want)
	}
	return cc, nil
}

// roundTrip sends a line and reads its echo.
func (c *conn) roundTrip(msg string) error {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return err
	}
	got, err := c.r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != msg+"\n" {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// talk opens a connection, does one round trip and closes it.
func talk(t *testing.T, from, to *podnet.Pod, msg string) error {
	t.Helper()
	c, err := dial(t, from, to)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.roundTrip(msg)
}

func serial(t *testing.T, src *Source, id spiffeid.ID) string {
	t.Helper()
	svid, err := src.SVID(id)
	if err != nil {
		t.Fatal(err)
	}
	return svid.Certificates[0].SerialNumber.Text(16)
}

// handshakeSerials runs a handshake between the configs of client and server identities and
// returns the serials of the certificates each side was shown.
func handshakeSerials(t *testing.T, configs *meshtls.Configs, client, server spiffeid.ID) (clientSaw, serverSaw string) {
	t.Helper()
	// Loopback TCP rather than net.Pipe: the server writes session tickets after its handshake,
	// which an unbuffered pipe would block on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c1, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	c2, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	cc := tls.Client(c1, configs.Client(client))
	sc := tls.Server(c2, configs.Server(server))
	errc := make(chan error, 1)
	go func() { errc <- sc.Handshake() }()
	if err := cc.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	return cc.ConnectionState().PeerCertificates[0].SerialNumber.Text(16),
		sc.ConnectionState().PeerCertificates[0].SerialNumber.Text(16)
}

var accounts = meshtls.Workloads{"shop/client": "buyer", "shop/server": "seller", "shop/late": "late"}

// Two pods talk over mTLS with SVIDs that SPIRE issues, and keep talking while SPIRE rotates them:
// a connection opened before the rotation carries on, new handshakes present the new SVIDs.
func TestPodsTalkOverMTLSAcrossSPIRERotation(t *testing.T) {
	n := podnet.NewNode(t, "mlsn-")
	client, server := n.AddPod(t, 1), n.AddPod(t, 2)
	// 20s SVIDs (30s with SPIRE's 10s backdating): the agent renews them at about half-life.
	const ttl = 20 * time.Second
	env := startSPIRE(t, entry{"shop", "buyer", ttl}, entry{"shop", "seller", ttl})
	d := newDaemon(t, env, accounts)
	for name, p := range map[string]*podnet.Pod{"client": client, "server": server} {
		if err := d.enroll(p, name); err != nil {
			t.Fatalf("enroll %s: %v", name, err)
		}
	}
	podnet.EchoServer(t, server, 8080)

	before := serial(t, d.src, seller.id())
	beforeClient := serial(t, d.src, buyer.id())
	long, err := dial(t, client, server)
	if err != nil {
		t.Fatalf("connection before rotation: %v", err)
	}
	if err := long.roundTrip("before"); err != nil {
		t.Fatal(err)
	}

	waitUntil(t, 60*time.Second, "SPIRE rotates both SVIDs", func() bool {
		return serial(t, d.src, seller.id()) != before && serial(t, d.src, buyer.id()) != beforeClient
	})
	if err := long.roundTrip("after"); err != nil {
		t.Fatalf("connection opened before the rotation broke: %v", err)
	}
	if err := talk(t, client, server, "new"); err != nil {
		t.Fatalf("new connection after the rotation: %v", err)
	}
	clientSaw, serverSaw := handshakeSerials(t, d.configs, buyer.id(), seller.id())
	if clientSaw == before || serverSaw == beforeClient {
		t.Errorf("a handshake after the rotation presented a replaced SVID")
	}
	if len(d.logs.Records("svid rotated")) < 2 {
		t.Errorf("no rotation logged: %v", d.logs.Records("svid rotated"))
	}

	// Connections are logged when they end.
	long.Close()
	outbound := func() (n int) {
		for _, r := range d.logs.Records("connection") {
			if r["direction"] == "outbound" && r["peer_id"] == seller.id().String() && r["result"] == "ok" {
				n++
			}
		}
		return n
	}
	waitUntil(t, 10*time.Second, "both outbound connections logged ok with the SPIRE-issued peer ID", func() bool { return outbound() >= 2 })
	for _, r := range d.logs.Records("connection") {
		if r["result"] != "ok" {
			t.Errorf("connection failed: %v", r)
		}
	}
}

// When the SPIRE agent goes away, enrolled pods keep their SVIDs until they expire, a new pod's
// enrollment fails with the reason, and all comes back when the agent does.
func TestSPIREAgentAwayAndBack(t *testing.T) {
	n := podnet.NewNode(t, "mlsn-")
	client, server, late := n.AddPod(t, 1), n.AddPod(t, 2), n.AddPod(t, 3)
	env := startSPIRE(t, buyer, seller, entry{namespace: "shop", serviceAccount: "late"})
	d := newDaemon(t, env, accounts)
	for name, p := range map[string]*podnet.Pod{"client": client, "server": server} {
		if err := d.enroll(p, name); err != nil {
			t.Fatalf("enroll %s: %v", name, err)
		}
	}
	podnet.EchoServer(t, server, 8080)
	if err := talk(t, client, server, "agent up"); err != nil {
		t.Fatal(err)
	}

	env.killAgent()
	waitUntil(t, 30*time.Second, "the source notices the agent is gone", func() bool {
		return len(d.logs.Records("spire stream lost")) >= 3 // the bundle stream and both SVID streams
	})
	for _, r := range d.logs.Records("spire stream lost") {
		if r["reason"] == nil || r["retry_in"] == nil {
			t.Errorf("stream loss logged without reason or retry_in: %v", r)
		}
	}
	if err := talk(t, client, server, "agent away"); err != nil {
		t.Fatalf("new connection between enrolled pods while the agent is away: %v", err)
	}
	err := d.enroll(late, "late")
	if err == nil {
		t.Fatal("a new pod enrolled while the SPIRE agent was away")
	}
	if msg := err.Error(); !strings.Contains(msg, "spiffe://cluster.local/ns/shop/sa/late") ||
		!strings.Contains(msg, "SPIRE agent unavailable") || !strings.Contains(msg, "code = Unavailable") {
		t.Errorf("enrollment error does not say why: %v", err)
	}
	t.Logf("enrollment while the agent is away: %v", err)

	// Past their expiry the held SVIDs are refused locally, with the reason.
	d.src.setClock(2 * time.Hour)
	if _, err := d.src.SVID(seller.id()); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("an expired SVID was still served: %v", err)
	}
	d.src.setClock(0)

	env.startAgent()
	// The source retries at most MaxBackoff (1s here) apart; until its bundle stream is back it
	// takes the agent for away, as a kubelet retrying the ADD would find.
	waitUntil(t, 30*time.Second, "the bundle stream and the streams of the enrolled pods are back", func() bool {
		return len(d.logs.Records("spire stream restored")) >= 3
	})
	if err := d.enroll(late, "late"); err != nil {
		t.Fatalf("enroll after the agent came back: %v", err)
	}
	if err := talk(t, late, server, "agent back"); err != nil {
		t.Fatalf("new pod after recovery: %v", err)
	}
	if err := talk(t, client, server, "agent back"); err != nil {
		t.Fatalf("enrolled pods after recovery: %v", err)
	}
}
