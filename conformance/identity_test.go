package conformance_test

// Identity failure cases, FIPS 140-3 and post-quantum key exchange end to end (issue 4, items 4 to
// 6): crafted TLS peers with bad certificates against meshless pods, with the daemon's refusal
// reasons; meshlessd refusing to start on a bad CA directory or without FIPS mode; and the key
// exchange group negotiated between nodes of different settings.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

const (
	idPort = 8080
	// idTLSPort is where a test plays a TLS server with a bad certificate, in a plain pod.
	idTLSPort = 9443
	idNS      = "ident"
	idALPN    = "meshless/1"
)

// idCA signs the certificates a test presents: the cluster's CA, read from its directory, or a
// stranger.
type idCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// loadIDCA reads the CA of a meshless CA directory: the certificate of ca.crt matching ca.key.
func loadIDCA(t *testing.T, dir string) idCA {
	t.Helper()
	keyPEM, err := os.ReadFile(filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		t.Fatalf("%s/ca.key: no PEM block", dir)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	key := k.(crypto.Signer)
	for _, cert := range idReadCerts(t, filepath.Join(dir, "ca.crt")) {
		if key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(cert.PublicKey) {
			return idCA{cert: cert, key: key}
		}
	}
	t.Fatalf("%s: no certificate matches ca.key", dir)
	return idCA{}
}

func idReadCerts(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		if block, data = pem.Decode(data); block == nil {
			return certs
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, cert)
	}
}

// idStrangerCA makes a CA that no meshless node trusts.
func idStrangerCA(t *testing.T) idCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "stranger CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return idCA{cert: cert, key: key}
}

// leaf signs a workload certificate for uri ("" for none: a DNS name only) valid from
// notBefore to notAfter.
func (ca idCA) leaf(t *testing.T, uri string, notBefore, notAfter time.Time) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		DNSNames:     []string{"crafted.test"},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if uri != "" {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// idBadCert is a certificate a meshless peer must refuse, and what the refusal must say.
type idBadCert struct {
	name   string
	cert   *tls.Certificate // nil: no certificate at all
	reason []string
}

// idBadCerts returns one certificate of each kind a meshless peer must refuse.
func idBadCerts(t *testing.T, cluster, stranger idCA, td string) []idBadCert {
	now := time.Now()
	id := conformance.SPIFFEID(td, idNS, "crafted")
	cert := func(ca idCA, uri string, from, to time.Time) *tls.Certificate {
		c := ca.leaf(t, uri, from, to)
		return &c
	}
	return []idBadCert{
		{"not chained to the bundle", cert(stranger, id, now.Add(-time.Hour), now.Add(time.Hour)),
			[]string{"certificate signed by unknown authority"}},
		// crypto/x509: "certificate has expired or is not yet valid: current time T is after
		// (before) NotAfter (NotBefore)".
		{"expired", cert(cluster, id, now.Add(-2*time.Hour), now.Add(-time.Hour)),
			[]string{"certificate has expired or is not yet valid", "is after"}},
		{"not yet valid", cert(cluster, id, now.Add(time.Hour), now.Add(2*time.Hour)),
			[]string{"certificate has expired or is not yet valid", "is before"}},
		{"another trust domain", cert(cluster, conformance.SPIFFEID("other.test", idNS, "crafted"), now.Add(-time.Hour), now.Add(time.Hour)),
			[]string{`no trust bundle for trust domain "other.test"`}},
		{"no SPIFFE ID", cert(cluster, "", now.Add(-time.Hour), now.Add(time.Hour)),
			[]string{"certificate contains no URI SAN"}},
	}
}

// idWaitRecord waits until the node has logged a record matching kv after its first since
// records.
func idWaitRecord(t *testing.T, n *conformance.Node, since int, kv ...any) conformance.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	for {
		l, err := n.Logs()
		if err != nil {
			t.Fatal(err)
		}
		if found := l.Since(since).Find(kv...); len(found) > 0 {
			return found[0]
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s logged no record %v", n.Name, kv)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// idLogLen returns how many records the node's daemon has logged so far.
func idLogLen(t *testing.T, n *conformance.Node) int {
	t.Helper()
	l, err := n.Logs()
	if err != nil {
		t.Fatal(err)
	}
	return len(l.Records)
}

// idRequireReason fails the test unless the record's reason holds every fragment.
func idRequireReason(t *testing.T, r conformance.Record, fragments []string) {
	t.Helper()
	for _, f := range fragments {
		if !strings.Contains(r.String("reason"), f) {
			t.Errorf("reason %q, want it to contain %q", r.String("reason"), f)
		}
	}
}

// idCraftedExchange plays a client that speaks meshless's TLS itself, from a pod outside the mesh:
// it presents cert (none if nil), trusts anything, and echoes one line through the testapp
// server. It returns its local address (the src of the daemon's record) and the exchange's error.
func idCraftedExchange(t *testing.T, from *conformance.Pod, target netip.AddrPort, cert *tls.Certificate) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	raw, err := from.Dial(ctx, "tcp", target.String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	deadline, _ := ctx.Deadline()
	raw.SetDeadline(deadline)
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{idALPN}, InsecureSkipVerify: true}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	conn := tls.Client(raw, cfg)
	local := raw.LocalAddr().String()
	// The server judges the client's certificate after the client's handshake is done: the
	// refusal shows when reading.
	if err := conn.HandshakeContext(ctx); err != nil {
		return local, err
	}
	if _, err := io.WriteString(conn, "echo\nping"); err != nil {
		return local, err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return local, err
	}
	if string(buf) != "ping" {
		return local, fmt.Errorf("echo returned %q", buf)
	}
	return local, nil
}

// idCraftedServer plays a TLS server with meshless's ALPN in a pod outside the mesh, presenting
// whatever certificate the test sets, and echoing.
type idCraftedServer struct {
	cert atomic.Pointer[tls.Certificate]
}

func idStartCraftedServer(t *testing.T, in *conformance.Pod) *idCraftedServer {
	t.Helper()
	ln, err := in.Listen("tcp", fmt.Sprintf(":%d", idTLSPort))
	if err != nil {
		t.Fatal(err)
	}
	s := &idCraftedServer{}
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS13,
		NextProtos:     []string{idALPN},
		ClientAuth:     tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.cert.Load(), nil },
		// Without tickets every handshake is a full one: a session resumed from the exchange
		// with a good certificate would never show the next, bad one.
		SessionTicketsDisabled: true,
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				tc := tls.Server(c, cfg)
				// A refused handshake ends the copy at once.
				io.Copy(tc, tc)
			}()
		}
	}()
	return s
}

// idMeshExchange sends one line from a mesh pod's app to target and expects it echoed. A refusal
// may come so fast that even the app's connect reports it.
func idMeshExchange(t *testing.T, from *conformance.Pod, target netip.AddrPort) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	conn, err := from.Dial(ctx, "tcp", target.String())
	if err != nil {
		return err
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	if _, err := io.WriteString(conn, "ping"); err != nil {
		return err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return err
	}
	return nil
}

// TestIdentityRefusals presents bad certificates to meshless from both sides: a crafted client
// in a plain pod against a mesh pod's server (inbound), and a mesh pod's client against a crafted
// server in a plain pod (outbound). Every one is refused, the connection fails for the
// application, and the daemon logs the reason. A good certificate from the cluster's CA, through
// the same crafted peers, works: the refusals are the certificates' doing.
func TestIdentityRefusals(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins: binaries(t), NodePrefix: "mlrn-", PodPrefix: "mlrp-",
		Workloads: map[string]string{idNS + "/client": "client-sa", idNS + "/server": "server-sa"},
	})
	if err != nil {
		t.Fatal(err)
	}
	node, err := c.AddNode(ctx, conformance.NodeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	client, err := node.AddPod(ctx, conformance.PodConfig{Namespace: idNS, Name: "client"})
	if err != nil {
		t.Fatal(err)
	}
	server, err := node.AddPod(ctx, conformance.PodConfig{Namespace: idNS, Name: "server"})
	if err != nil {
		t.Fatal(err)
	}
	outsider, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: idNS, Name: "outsider"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := server.StartServer(ctx, idPort); err != nil {
		t.Fatal(err)
	}
	crafted := idStartCraftedServer(t, outsider)
	clusterCA := loadIDCA(t, node.Config.CADir)
	td := c.Config.TrustDomain
	now := time.Now()
	good := clusterCA.leaf(t, conformance.SPIFFEID(td, idNS, "crafted"), now.Add(-time.Hour), now.Add(time.Hour))
	inbound := netip.AddrPortFrom(server.IPv4(), idPort)
	outbound := netip.AddrPortFrom(outsider.IPv4(), idTLSPort)

	t.Run("inbound", func(t *testing.T) {
		if _, err := idCraftedExchange(t, outsider, inbound, &good); err != nil {
			t.Fatalf("a crafted client with a good certificate: %v", err)
		}
		cases := append(idBadCerts(t, clusterCA, idStrangerCA(t), td),
			idBadCert{"no client certificate", nil, []string{"client didn't provide a certificate"}})
		for _, bc := range cases {
			t.Run(strings.ReplaceAll(bc.name, " ", "_"), func(t *testing.T) {
				since := idLogLen(t, node)
				local, err := idCraftedExchange(t, outsider, inbound, bc.cert)
				if err == nil {
					t.Fatal("the exchange went through")
				}
				r := idWaitRecord(t, node, since, "msg", "connection", "direction", "inbound", "src", local)
				if r.String("result") != "handshake_failed" {
					t.Errorf("result %q (%s), want handshake_failed", r.String("result"), r.String("reason"))
				}
				idRequireReason(t, r, bc.reason)
				t.Logf("client saw %v; daemon: %s", err, r.String("reason"))
			})
		}
	})

	t.Run("outbound", func(t *testing.T) {
		crafted.cert.Store(&good)
		if err := idMeshExchange(t, client, outbound); err != nil {
			t.Fatalf("a crafted server with a good certificate: %v", err)
		}
		// Its record comes when the connection has ended; the cases below look for the next one.
		idWaitRecord(t, node, 0, "msg", "connection", "direction", "outbound", "dst", outbound.String(), "result", "ok")
		for _, bc := range idBadCerts(t, clusterCA, idStrangerCA(t), td) {
			t.Run(strings.ReplaceAll(bc.name, " ", "_"), func(t *testing.T) {
				crafted.cert.Store(bc.cert)
				since := idLogLen(t, node)
				err := idMeshExchange(t, client, outbound)
				if err == nil {
					t.Fatal("the exchange went through")
				}
				// The only connection to the crafted server since the mark.
				r := idWaitRecord(t, node, since, "msg", "connection", "direction", "outbound", "dst", outbound.String())
				if r.String("result") != "handshake_failed" {
					t.Errorf("result %q (%s), want handshake_failed", r.String("result"), r.String("reason"))
				}
				idRequireReason(t, r, bc.reason)
				t.Logf("app saw %v; daemon: %s", err, r.String("reason"))
			})
		}
	})
}

// idRunDaemon runs `meshlessd run` outside any namespace with a bad setup that must make it exit
// before it serves; env replaces GODEBUG. It returns stderr and the exit error.
func idRunDaemon(t *testing.T, bins *conformance.Bins, caDir string, env []string, extra ...string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	args := append([]string{"run", "--node-name", "refusal", "--ca-dir", caDir, "--mesh-cidr", "10.244.0.0/16",
		"--state-dir", filepath.Join(dir, "state"), "--socket", filepath.Join(dir, "cni.sock"), "--health-addr", ""}, extra...)
	cmd := exec.CommandContext(ctx, bins.Daemon, args...)
	cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "GODEBUG=") }), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("meshlessd %v did not exit: it started serving\n%s", args, stderr.String())
	}
	return stderr.String(), err
}

// TestStartupRefusals runs the meshlessd binary with a CA directory that is missing, unreadable
// or malformed, and with --fips outside FIPS mode: each time it exits with status 1 before
// serving and says why on stderr.
func TestStartupRefusals(t *testing.T) {
	bins := binaries(t)
	good := filepath.Join(t.TempDir(), "ca")
	if err := conformance.InitCA(testCtx(t), bins, good); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "ca")
	if err := conformance.InitCA(testCtx(t), bins, other); err != nil {
		t.Fatal(err)
	}
	read := func(dir, name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	// caDir writes a CA directory; a nil file is left out, a file named "dir" is a directory.
	caDir := func(cert, key []byte) string {
		dir := t.TempDir()
		for name, data := range map[string][]byte{"ca.crt": cert, "ca.key": key} {
			switch {
			case data == nil:
			case string(data) == "dir":
				if err := os.Mkdir(filepath.Join(dir, name), 0o700); err != nil {
					t.Fatal(err)
				}
			default:
				if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
		return dir
	}
	goodCert, goodKey := read(good, "ca.crt"), read(good, "ca.key")

	for _, tc := range []struct {
		name, dir string
		want      string
	}{
		{"missing directory", filepath.Join(t.TempDir(), "absent"), "does not exist (create one with `meshlessd ca init"},
		{"missing certificate", caDir(nil, goodKey), "ca.crt is missing"},
		// A directory where the file should be: unreadable even for root, unlike mode 0.
		{"unreadable certificate", caDir([]byte("dir"), goodKey), "cannot read"},
		{"unreadable key", caDir(goodCert, []byte("dir")), "cannot read"},
		{"malformed certificate", caDir([]byte("-----BEGIN CERTIFICATE-----\nnot base64\n"), goodKey), "no PEM CERTIFICATE block found"},
		{"malformed key", caDir(goodCert, []byte("garbage")), "ca.key: no PEM block found"},
		{"key of another CA", caDir(goodCert, read(other, "ca.key")), "matches no certificate in"},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			stderr, err := idRunDaemon(t, bins, tc.dir, nil)
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 1 {
				t.Fatalf("exit: %v, want status 1\n%s", err, stderr)
			}
			if !strings.Contains(stderr, "meshlessd run: load CA: ") || !strings.Contains(stderr, tc.want) {
				t.Errorf("stderr %q, want 'meshlessd run: load CA: ...%s'", stderr, tc.want)
			}
		})
	}

	t.Run("fips_mode_off", func(t *testing.T) {
		stderr, err := idRunDaemon(t, bins, good, nil, "--fips")
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(stderr, "--fips: Go's FIPS 140-3 mode is not active") {
			t.Fatalf("exit %v, stderr %q; want status 1 and the FIPS mode named", err, stderr)
		}
	})
	t.Run("fips_mode_on", func(t *testing.T) {
		// In FIPS mode the check passes, and the daemon goes on to the next problem of this setup.
		stderr, _ := idRunDaemon(t, bins, filepath.Join(t.TempDir(), "absent"), []string{"GODEBUG=fips140=on"}, "--fips")
		if strings.Contains(stderr, "FIPS") || !strings.Contains(stderr, "load CA") {
			t.Errorf("stderr %q; want the FIPS check passed and the CA refused", stderr)
		}
	})
}

// idKXEnv is a cluster whose nodes differ in their crypto settings, each with a mesh pod running
// the test server: pod i on node i, and one more pod on node 0 (index len(nodes)) for traffic
// within a node.
type idKXEnv struct {
	nodes []*conformance.Node
	pods  []*conformance.Pod
}

func idSetupKeyExchange(t *testing.T, nodes []conformance.NodeConfig) *idKXEnv {
	t.Helper()
	needRoot(t)
	ctx := testCtx(t)
	workloads := map[string]string{}
	for i := range len(nodes) + 1 {
		workloads[fmt.Sprintf("%s/pod%d", idNS, i)] = fmt.Sprintf("sa%d", i)
	}
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins: binaries(t), NodePrefix: "mlrn-", PodPrefix: "mlrp-", Workloads: workloads,
	})
	if err != nil {
		t.Fatal(err)
	}
	e := &idKXEnv{}
	for i, cfg := range nodes {
		n, err := c.AddNode(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		p, err := n.AddPod(ctx, conformance.PodConfig{Namespace: idNS, Name: fmt.Sprintf("pod%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.StartServer(ctx, idPort); err != nil {
			t.Fatal(err)
		}
		e.nodes, e.pods = append(e.nodes, n), append(e.pods, p)
	}
	p, err := e.nodes[0].AddPod(ctx, conformance.PodConfig{Namespace: idNS, Name: fmt.Sprintf("pod%d", len(nodes))})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.StartServer(ctx, idPort); err != nil {
		t.Fatal(err)
	}
	e.pods = append(e.pods, p)
	return e
}

// requireGroup runs an exchange from pod i to pod j and checks the key exchange group that both
// daemons logged for it, with the peer's identity.
func (e *idKXEnv) requireGroup(t *testing.T, i, j int, want string) {
	t.Helper()
	from, to := e.pods[i], e.pods[j]
	outSince, inSince := idLogLen(t, from.Node), idLogLen(t, to.Node)
	target := netip.AddrPortFrom(to.IPv4(), idPort)
	res, err := from.Client(testCtx(t), target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 4096})
	if err != nil || !res.Match {
		t.Fatalf("%s -> %s: %v %+v", from, to, err, res)
	}
	out := idWaitRecord(t, from.Node, outSince, "msg", "connection", "direction", "outbound", "src", res.Local)
	in := idWaitRecord(t, to.Node, inSince, "msg", "connection", "direction", "inbound", "dst", target.String(),
		"src", func(s string) bool { ap, err := netip.ParseAddrPort(s); return err == nil && ap.Addr() == from.IPv4() })
	for _, r := range []struct {
		rec  conformance.Record
		peer string
	}{{out, to.SPIFFEID()}, {in, from.SPIFFEID()}} {
		if r.rec.String("result") != "ok" || r.rec.String("peer_id") != r.peer || r.rec.String("tls_group") != want {
			t.Errorf("%s -> %s, %s record: result %s, peer %s, tls_group %s; want ok, %s, %s", from, to, r.rec.String("direction"),
				r.rec.String("result"), r.rec.String("peer_id"), r.rec.String("tls_group"), r.peer, want)
		}
	}
	t.Logf("%s -> %s: tls_group %s", from.Node.Name, to.Node.Name, out.String("tls_group"))
}

// TestPostQuantum checks the key exchange between a node with the default (post-quantum hybrid
// first) and a node with --pq=false: hybrid within the first node, X25519 across, both ways.
func TestPostQuantum(t *testing.T) {
	e := idSetupKeyExchange(t, []conformance.NodeConfig{
		{},
		{DaemonArgs: []string{"--pq=false"}},
	})
	for i, want := range []string{"true", "false"} {
		idWaitRecord(t, e.nodes[i], 0, "msg", "meshlessd ready", "post_quantum", want)
	}
	e.requireGroup(t, 2, 0, "X25519MLKEM768")
	e.requireGroup(t, 0, 1, "X25519")
	e.requireGroup(t, 1, 2, "X25519")
}

// TestFIPS runs daemons in Go's FIPS 140-3 mode (one strict: fips140=only, where non-approved
// crypto fails) next to one that is not: mTLS works among all of them, with the post-quantum
// hybrid (approved in Go's module) by default, and P-256 rather than X25519 (not approved) when a
// FIPS node has post-quantum off.
func TestFIPS(t *testing.T) {
	e := idSetupKeyExchange(t, []conformance.NodeConfig{
		{DaemonArgs: []string{"--fips"}, DaemonEnv: []string{"GODEBUG=fips140=only"}},
		{DaemonArgs: []string{"--fips", "--pq=false"}, DaemonEnv: []string{"GODEBUG=fips140=on"}},
		{},
	})
	for i, want := range []string{"true", "true", "false"} {
		idWaitRecord(t, e.nodes[i], 0, "msg", "meshlessd ready", "fips140", want)
	}
	idWaitRecord(t, e.nodes[0], 0, "msg", "meshlessd ready", "fips140_enforced", "true")
	e.requireGroup(t, 3, 0, "X25519MLKEM768") // within the strict FIPS node
	e.requireGroup(t, 0, 2, "X25519MLKEM768")
	e.requireGroup(t, 2, 3, "X25519MLKEM768")
	e.requireGroup(t, 0, 1, "CurveP256")
	e.requireGroup(t, 1, 2, "CurveP256")
	e.requireGroup(t, 2, 1, "CurveP256")
}
