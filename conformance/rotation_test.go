package conformance_test

// SVID rotation and CA roll-over under load (issue 4, item 2): two nodes with SVIDs of a few
// seconds carry a continuous load both ways, many short connections and one long-lived
// connection, while the SVIDs rotate several times and then the CA is rolled over node by node.
// The test counts every failed request: there must be none. Afterwards a node still signing with
// the old CA is refused, with the reason in the log.

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

const (
	rotPort = 8080
	rotNS   = "rot"
	rotTTL  = 4 * time.Second
	// rotReload is the daemons' --ca-reload-interval.
	rotReload = 200 * time.Millisecond
	// rotPause is the pause of each load worker between two short connections.
	rotPause = 20 * time.Millisecond
	// rotWorkers run short connections on each route at once.
	rotWorkers = 2
)

// rotLoad is the continuous client load: short connections on every route, one long-lived
// connection echoing a line periodically. Every failure is counted and the first few kept.
type rotLoad struct {
	ok, failed     atomic.Int64
	ticks          atomic.Int64
	stop           chan struct{}
	wg             sync.WaitGroup
	mu             sync.Mutex
	firstFailures  []string
	longLocal      string
	longTickFailed atomic.Bool
}

func (l *rotLoad) fail(format string, args ...any) {
	l.failed.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.firstFailures) < 10 {
		l.firstFailures = append(l.firstFailures, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, args...))
	}
}

// rotRoute is traffic from a pod's app to a server.
type rotRoute struct {
	from   *conformance.Pod
	target netip.AddrPort
}

// rotStartLoad starts rotWorkers short-connection workers per route and the long-lived connection
// on the first route.
func rotStartLoad(t *testing.T, routes []rotRoute) *rotLoad {
	t.Helper()
	l := &rotLoad{stop: make(chan struct{})}
	for _, r := range routes {
		for w := range rotWorkers {
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				for i := 0; ; i++ {
					select {
					case <-l.stop:
						return
					case <-time.After(rotPause):
					}
					if err := rotShortExchange(r, fmt.Sprintf("%s worker %d request %d", r.from, w, i)); err != nil {
						l.fail("%s -> %s: %v", r.from, r.target, err)
						continue
					}
					l.ok.Add(1)
				}
			}()
		}
	}

	long, err := routes[0].from.Dial(testCtx(t), "tcp", routes[0].target.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { long.Close() })
	l.longLocal = long.LocalAddr().String()
	if _, err := io.WriteString(long, "echo\n"); err != nil {
		t.Fatal(err)
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for i := 0; ; i++ {
			select {
			case <-l.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if err := rotEchoLine(long, fmt.Sprintf("tick %d\n", i)); err != nil {
				l.longTickFailed.Store(true)
				l.fail("long-lived connection, tick %d: %v", i, err)
				return
			}
			l.ticks.Add(1)
		}
	}()
	return l
}

// rotShortExchange runs one request on a new connection: the echo of a line, then both sides close.
func rotShortExchange(r rotRoute, line string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	conn, err := r.from.Dial(ctx, "tcp", r.target.String())
	if err != nil {
		return err
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	payload := []byte(line + "\n")
	if _, err := conn.Write(append([]byte("echo\n"), payload...)); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("half-close: %w", err)
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		return fmt.Errorf("read: %w (after %d bytes)", err, len(got))
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo returned %q, want %q", got, payload)
	}
	return nil
}

func rotEchoLine(c net.Conn, line string) error {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, line); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, len(line))
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(buf) != line {
		return fmt.Errorf("echo returned %q, want %q", buf, line)
	}
	return nil
}

// finish stops the load and reports it.
func (l *rotLoad) finish(t *testing.T) {
	t.Helper()
	close(l.stop)
	l.wg.Wait()
	t.Logf("load: %d requests ok, %d failed; long-lived connection (%s): %d echoes", l.ok.Load(), l.failed.Load(), l.longLocal, l.ticks.Load())
	if n := l.failed.Load(); n > 0 {
		t.Errorf("%d failed requests; first ones:\n%s", n, strings.Join(l.firstFailures, "\n"))
	}
	if l.ok.Load() == 0 || l.ticks.Load() == 0 || l.longTickFailed.Load() {
		t.Error("the load did not run")
	}
}

// rotWriteFile replaces path the way a CA roll-out should: a new file renamed into place.
func rotWriteFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func rotReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rotCopyCADir gives a node its own copy of a CA directory, so that a roll-over can reach the nodes
// one at a time as a real roll-out does.
func rotCopyCADir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ca.crt", "ca.key"} {
		rotWriteFile(t, filepath.Join(to, name), rotReadFile(t, filepath.Join(from, name)))
	}
}

// rotProbeServerSVID makes a full handshake with target from a pod outside the mesh, as a client of
// the cluster's CA, and returns the serial of the certificate the server presented.
func rotProbeServerSVID(t *testing.T, from *conformance.Pod, target netip.AddrPort, cert tls.Certificate) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	raw, err := from.Dial(ctx, "tcp", target.String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	// No session cache: every probe is a full handshake.
	conn := tls.Client(raw, &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{idALPN},
		InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})
	if err := conn.HandshakeContext(ctx); err != nil {
		t.Fatal(err)
	}
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.Text(16)
}

func TestRotation(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	bins := binaries(t)
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins: bins, NodePrefix: "mlrn-", PodPrefix: "mlrp-",
		Workloads: map[string]string{
			rotNS + "/client1": "client1", rotNS + "/server1": "server1",
			rotNS + "/client2": "client2", rotNS + "/server2": "server2",
			rotNS + "/client3": "client3", rotNS + "/server3": "server3",
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	oldDir, err := c.CADir(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var nodes [2]*conformance.Node
	var clients, servers [2]*conformance.Pod
	for i := range nodes {
		caDir := filepath.Join(c.Dir, fmt.Sprintf("ca-node%d", i+1))
		rotCopyCADir(t, oldDir, caDir)
		if nodes[i], err = c.AddNode(ctx, conformance.NodeConfig{
			CADir: caDir, SVIDTTL: rotTTL, DaemonArgs: []string{"--ca-reload-interval", rotReload.String()},
		}); err != nil {
			t.Fatal(err)
		}
		if clients[i], err = nodes[i].AddPod(ctx, conformance.PodConfig{Namespace: rotNS, Name: fmt.Sprintf("client%d", i+1)}); err != nil {
			t.Fatal(err)
		}
		if servers[i], err = nodes[i].AddPod(ctx, conformance.PodConfig{Namespace: rotNS, Name: fmt.Sprintf("server%d", i+1)}); err != nil {
			t.Fatal(err)
		}
		if _, err := servers[i].StartServer(ctx, rotPort); err != nil {
			t.Fatal(err)
		}
	}
	prober, err := nodes[0].AddPlainPod(ctx, conformance.PodConfig{Namespace: rotNS, Name: "prober"})
	if err != nil {
		t.Fatal(err)
	}
	target := func(p *conformance.Pod) netip.AddrPort { return netip.AddrPortFrom(p.IPv4(), rotPort) }
	// Identities held by each node: its client's and its server's.
	held := func(i int) []string { return []string{clients[i].SPIFFEID(), servers[i].SPIFFEID()} }

	var loadSince [2]int
	for i, n := range nodes {
		loadSince[i] = idLogLen(t, n)
	}
	load := rotStartLoad(t, []rotRoute{{clients[0], target(servers[1])}, {clients[1], target(servers[0])}})
	defer func() {
		select {
		case <-load.stop:
		default:
			close(load.stop)
			load.wg.Wait()
		}
	}()
	start := time.Now()

	t.Log("phase 1: SVID rotation")
	oldCA := loadIDCA(t, oldDir)
	probeCert := oldCA.leaf(t, conformance.SPIFFEID(c.Config.TrustDomain, rotNS, "prober"), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	var probed []string
	probed = append(probed, rotProbeServerSVID(t, prober, target(servers[1]), probeCert))
	// Three rotations of every SVID on both nodes (one every TTL/2) under the load.
	for i := range nodes {
		for _, id := range held(i) {
			rotWaitCount(t, nodes[i], loadSince[i], 3, "msg", "svid rotated", "spiffe_id", id)
		}
	}
	probed = append(probed, rotProbeServerSVID(t, prober, target(servers[1]), probeCert))
	// Each presented certificate is one that node 2 minted for server2 (the log line follows the
	// minting by a moment, hence the wait).
	for _, serial := range probed {
		idWaitRecord(t, nodes[1], 0, "spiffe_id", servers[1].SPIFFEID(), "serial", serial)
	}
	if probed[0] == probed[1] {
		t.Errorf("server2 presented the same SVID (%s) before and after three rotations", probed[0])
	}
	t.Logf("server2 presented SVID %s, then %s after the rotations", probed[0], probed[1])
	if n := load.failed.Load(); n > 0 {
		t.Errorf("%d failed requests during rotation", n)
	}
	t.Logf("phase 1 took %s: %d requests", time.Since(start).Round(time.Millisecond), load.ok.Load())

	t.Log("phase 2: CA roll-over, node by node")
	newDir := filepath.Join(c.Dir, "ca-new")
	if err := conformance.InitCA(ctx, bins, newDir); err != nil {
		t.Fatal(err)
	}
	newCA := loadIDCA(t, newDir)
	newSerial := newCA.cert.SerialNumber.Text(16)
	oldCrt, newCrt, newKey := rotReadFile(t, filepath.Join(oldDir, "ca.crt")), rotReadFile(t, filepath.Join(newDir, "ca.crt")), rotReadFile(t, filepath.Join(newDir, "ca.key"))
	both := append(slices.Clone(oldCrt), newCrt...)
	// step changes one file of node i's CA directory, waits until the daemon has taken the change
	// in, and lets the load run on the new state for settle.
	step := func(name string, i int, file string, data []byte, settle time.Duration, wait func(since int)) {
		t.Helper()
		since := idLogLen(t, nodes[i])
		rotWriteFile(t, filepath.Join(nodes[i].Config.CADir, file), data)
		wait(since)
		t.Logf("%s on node %d done after %s", name, i+1, time.Since(start).Round(time.Millisecond))
		time.Sleep(settle)
	}
	for i := range nodes {
		step("trust both CAs", i, "ca.crt", both, time.Second, func(since int) {
			idWaitRecord(t, nodes[i], since, "msg", "trust bundle reloaded", "authorities", "2")
		})
	}
	for i := range nodes {
		// No pause after the last node's switch: the old CA leaves the bundles while the sessions
		// cached on both nodes still hold unexpired SVIDs of it, which must not be resumed then.
		settle := time.Second
		if i == len(nodes)-1 {
			settle = 0
		}
		step("sign with the new CA", i, "ca.key", newKey, settle, func(since int) {
			idWaitRecord(t, nodes[i], since, "msg", "signing CA changed", "new_serial", newSerial)
			for _, id := range held(i) {
				idWaitRecord(t, nodes[i], since, "msg", "svid rotated", "spiffe_id", id, "ca_serial", newSerial)
			}
		})
	}
	for i := range nodes {
		step("drop the old CA", i, "ca.crt", newCrt, time.Second, func(since int) {
			idWaitRecord(t, nodes[i], since, "msg", "trust bundle reloaded", "authorities", "1")
		})
	}
	load.finish(t)
	for i, n := range nodes {
		l := rotLogs(t, n)
		if failed := l.Find("msg", "connection", "result", "handshake_failed"); len(failed) > 0 {
			t.Errorf("node %d logged %d failed handshakes, first: %s", i+1, len(failed), failed[0].String("reason"))
		}
		t.Logf("node %d: %d outbound mTLS connections, %d of them resumed", i+1,
			len(l.Find("msg", "connection", "direction", "outbound", "mtls", "true")),
			len(l.Find("msg", "connection", "direction", "outbound", "tls_resumed", "true")))
	}
	t.Logf("rotation and roll-over took %s", time.Since(start).Round(time.Millisecond))

	t.Log("phase 3: a node still signing with the old CA is refused")
	// It trusts both CAs, so that the refusal comes from the rolled nodes, not from itself.
	lateDir := filepath.Join(c.Dir, "ca-node3")
	if err := os.MkdirAll(lateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	rotWriteFile(t, filepath.Join(lateDir, "ca.crt"), both)
	rotWriteFile(t, filepath.Join(lateDir, "ca.key"), rotReadFile(t, filepath.Join(oldDir, "ca.key")))
	late, err := c.AddNode(ctx, conformance.NodeConfig{CADir: lateDir})
	if err != nil {
		t.Fatal(err)
	}
	lateClient, err := late.AddPod(ctx, conformance.PodConfig{Namespace: rotNS, Name: "client3"})
	if err != nil {
		t.Fatal(err)
	}
	lateServer, err := late.AddPod(ctx, conformance.PodConfig{Namespace: rotNS, Name: "server3"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lateServer.StartServer(ctx, rotPort); err != nil {
		t.Fatal(err)
	}
	const unknownCA = "x509: certificate signed by unknown authority"
	// Its client's SVID, towards a rolled node's server.
	since := idLogLen(t, nodes[0])
	if err := rotShortExchange(rotRoute{lateClient, target(servers[0])}, "from the old CA"); err == nil {
		t.Error("a client with an SVID of the old CA was served")
	}
	r := idWaitRecord(t, nodes[0], since, "msg", "connection", "direction", "inbound", "result", "handshake_failed",
		"src", func(s string) bool {
			ap, err := netip.ParseAddrPort(s)
			return err == nil && ap.Addr() == lateClient.IPv4()
		})
	idRequireReason(t, r, []string{unknownCA})
	t.Logf("node 1 refused the old CA's client: %s", r.String("reason"))
	// Its server's SVID, towards a rolled node's client.
	since = idLogLen(t, nodes[0])
	if err := rotShortExchange(rotRoute{clients[0], target(lateServer)}, "to the old CA"); err == nil {
		t.Error("a server with an SVID of the old CA was accepted")
	}
	r = idWaitRecord(t, nodes[0], since, "msg", "connection", "direction", "outbound", "result", "handshake_failed",
		"dst", target(lateServer).String())
	idRequireReason(t, r, []string{unknownCA})
	t.Logf("node 1 refused the old CA's server: %s", r.String("reason"))
	t.Logf("whole test %s", time.Since(start).Round(time.Millisecond))
}

// rotWaitCount waits until the node has logged n records matching kv after its first since.
func rotWaitCount(t *testing.T, node *conformance.Node, since, n int, kv ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), 30*time.Second)
	defer cancel()
	for len(rotLogs(t, node).Since(since).Find(kv...)) < n {
		select {
		case <-ctx.Done():
			t.Fatalf("%s logged fewer than %d records %v", node.Name, n, kv)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func rotLogs(t *testing.T, n *conformance.Node) conformance.Log {
	t.Helper()
	l, err := n.Logs()
	if err != nil {
		t.Fatal(err)
	}
	return l
}
