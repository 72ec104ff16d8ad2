package meshtls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshless/meshless/internal/logtest"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// caPair is two CAs in their own directories, for a roll-over from old to new.
type caPair struct {
	old, new         map[string][]byte // file contents by name
	oldCert, newCert *x509.Certificate
	oldCA, newCA     *CA
}

func newCAPair(t *testing.T) *caPair {
	t.Helper()
	oldDir, newDir := t.TempDir(), t.TempDir()
	for _, dir := range []string{oldDir, newDir} {
		if err := InitCA(dir, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	p := &caPair{old: readFiles(t, oldDir), new: readFiles(t, newDir)}
	var err error
	if p.oldCA, err = LoadCA(oldDir); err != nil {
		t.Fatal(err)
	}
	if p.newCA, err = LoadCA(newDir); err != nil {
		t.Fatal(err)
	}
	p.oldCert, p.newCert = p.oldCA.Certificate(), p.newCA.Certificate()
	return p
}

// both is a ca.crt trusting both CAs.
func (p *caPair) both() []byte {
	return append(append([]byte(nil), p.old[CACertFile]...), p.new[CACertFile]...)
}

// ca builds a CA from ca.crt and ca.key contents, as a reload would.
func (p *caPair) ca(t *testing.T, cert, key []byte) *CA {
	t.Helper()
	dir := t.TempDir()
	writeAtomic(t, filepath.Join(dir, CACertFile), cert)
	writeAtomic(t, filepath.Join(dir, CAKeyFile), key)
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// writeAtomic replaces path the way an operator should: a new file renamed into place.
func writeAtomic(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// eventually polls cond until it holds; the deadline only guards against a hang.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func authorities(t *testing.T, src *CASource) []*x509.Certificate {
	t.Helper()
	b, err := src.GetX509BundleForTrustDomain(testTD)
	if err != nil {
		t.Fatal(err)
	}
	return b.X509Authorities()
}

func signedBy(svid *x509svid.SVID, ca *x509.Certificate) bool {
	return svid.Certificates[0].CheckSignatureFrom(ca) == nil
}

// TestWatchCADir rolls the CA of a watched directory over, step by step as an operator would,
// with broken states in between: the bundle follows the files, the signing CA follows ca.key
// with a prompt re-mint, and a broken directory never replaces the CA in use.
func TestWatchCADir(t *testing.T) {
	p := newCAPair(t)
	dir := t.TempDir()
	writeAtomic(t, filepath.Join(dir, CACertFile), p.old[CACertFile])
	writeAtomic(t, filepath.Join(dir, CAKeyFile), p.old[CAKeyFile])
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	var logs logtest.Buffer
	src := NewCASource(ca, testTD, time.Hour, jsonLogger(&logs))
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	for _, id := range []spiffeid.ID{a, b} {
		if err := src.Acquire(Workload{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	configs := NewConfigs(src, nil)
	var resets atomic.Int32
	src.OnBundleChange(func(previous x509bundle.Source) {
		resets.Add(1)
		configs.Reset(previous)
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go src.Run(ctx)
	go src.WatchCADir(ctx, dir, 10*time.Millisecond)

	logged := func(msg, fragment string) func() bool {
		return func() bool {
			for line := range strings.SplitSeq(logs.String(), "\n") {
				if strings.Contains(line, `"msg":"`+msg+`"`) && strings.Contains(line, fragment) {
					return true
				}
			}
			return false
		}
	}
	handshakeOK := func(step string) {
		t.Helper()
		if cli, srv := handshake(t, configs.Client(a), configs.Server(b)); cli.err != nil || srv.err != nil {
			t.Fatalf("%s: handshake: client %v, server %v", step, cli.err, srv.err)
		}
	}
	handshakeOK("before")

	// A half-written ca.crt (written in place, not renamed): logged, ignored.
	half := append(append([]byte(nil), p.old[CACertFile]...), p.new[CACertFile][:100]...)
	if err := os.WriteFile(filepath.Join(dir, CACertFile), half, 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the half-written ca.crt to be refused", logged("CA reload failed; keeping the CA in use", "unexpected data after certificate 1"))
	if got := authorities(t, src); len(got) != 1 || !got[0].Equal(p.oldCert) {
		t.Fatalf("after a half-written ca.crt the bundle is %d certificates", len(got))
	}
	handshakeOK("after a half-written ca.crt")

	// Both CAs trusted; the old one still signs.
	writeAtomic(t, filepath.Join(dir, CACertFile), p.both())
	eventually(t, "the bundle to hold both CAs", func() bool { return len(authorities(t, src)) == 2 })
	eventually(t, "the reload to be logged", logged("trust bundle reloaded", `"authorities":2`))
	if n := resets.Load(); n != 1 {
		t.Errorf("%d bundle change notifications, want 1", n)
	}
	if svid := mustSVID(t, src, a); !signedBy(svid, p.oldCert) {
		t.Error("the SVID changed CA although ca.key did not change")
	}
	handshakeOK("with both CAs trusted")

	// The new key signs: every held SVID is re-minted by the new CA without waiting for
	// half-life (an hour away).
	writeAtomic(t, filepath.Join(dir, CAKeyFile), p.new[CAKeyFile])
	eventually(t, "the signing CA change to be logged", logged("signing CA changed", `"new_serial":"`+p.newCert.SerialNumber.Text(16)+`"`))
	for _, id := range []spiffeid.ID{a, b} {
		eventually(t, id.String()+" to be re-minted by the new CA", func() bool { return signedBy(mustSVID(t, src, id), p.newCert) })
	}
	eventually(t, "the re-mint to be logged", logged("svid rotated", `"ca_serial":"`+p.newCert.SerialNumber.Text(16)+`"`))
	if n := resets.Load(); n != 1 {
		t.Errorf("%d bundle change notifications after a key change alone, want 1", n)
	}
	handshakeOK("after the signing CA changed")

	// The old CA leaves the bundle: its SVIDs are refused.
	writeAtomic(t, filepath.Join(dir, CACertFile), p.new[CACertFile])
	eventually(t, "the bundle to hold the new CA only", func() bool {
		got := authorities(t, src)
		return len(got) == 1 && got[0].Equal(p.newCert)
	})
	handshakeOK("after the old CA was removed")
	oldSVID, err := p.oldCA.mint(a, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rawClient := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, InsecureSkipVerify: true, Certificates: []tls.Certificate{tlsCert(oldSVID)}}
	if _, srv := handshake(t, rawClient, configs.Server(b)); srv.err == nil || !strings.Contains(srv.err.Error(), "certificate signed by unknown authority") {
		t.Errorf("an SVID of the removed CA: server error %v, want unknown authority", srv.err)
	}

	// Broken directories never empty the bundle or stop the signing.
	for _, step := range []struct {
		name, file string
		data       []byte // nil: remove the file
		wantErr    string
	}{
		{"missing key", CAKeyFile, nil, "ca.key is missing"},
		{"key of the removed CA", CAKeyFile, p.old[CAKeyFile], "matches no certificate"},
		{"empty ca.crt", CACertFile, []byte{}, "no PEM CERTIFICATE block found"},
	} {
		path := filepath.Join(dir, step.file)
		if step.data == nil {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
		} else {
			writeAtomic(t, path, step.data)
		}
		eventually(t, step.name+" to be refused", logged("CA reload failed; keeping the CA in use", step.wantErr))
		if got := authorities(t, src); len(got) != 1 || !got[0].Equal(p.newCert) {
			t.Fatalf("%s: the bundle is %d certificates, want the new CA", step.name, len(got))
		}
		handshakeOK(step.name)
	}
	if n := strings.Count(logs.String(), `"msg":"CA reload failed; keeping the CA in use"`); n != 4 {
		t.Errorf("%d reload failures logged, want 4 (one per broken state, not one per poll)", n)
	}
}

// TestResetAfterRollOver shows why the configs are reset when the bundle changes: sessions
// resumed with a peer certificate of a removed CA fail outright, whereas reset configs make a
// full handshake with the peers' new certificates.
func TestResetAfterRollOver(t *testing.T) {
	p := newCAPair(t)
	src := NewCASource(p.oldCA, testTD, time.Hour, nil)
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	for _, id := range []spiffeid.ID{a, b} {
		if err := src.Acquire(Workload{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	reset := NewConfigs(src, nil)
	src.OnBundleChange(reset.Reset)
	stale := NewConfigs(src, nil) // never told about the change

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for name, configs := range map[string]*Configs{"reset": reset, "stale": stale} {
		for i := range 2 {
			cli, srv := handshakeOn(t, ln, configs.Client(a), configs.Server(b))
			if cli.err != nil || srv.err != nil || cli.state.DidResume != (i == 1) {
				t.Fatalf("%s configs, handshake %d: client %v, server %v, resumed %v", name, i, cli.err, srv.err, cli.state.DidResume)
			}
		}
	}

	src.SetCA(p.ca(t, p.both(), p.new[CAKeyFile]))
	src.rotateDue() // due at once: the signing CA changed
	if !signedBy(mustSVID(t, src, a), p.newCert) || !signedBy(mustSVID(t, src, b), p.newCert) {
		t.Fatal("SVIDs not re-minted by the new CA")
	}
	src.SetCA(p.ca(t, p.new[CACertFile], p.new[CAKeyFile]))

	cli, srv := handshakeOn(t, ln, reset.Client(a), reset.Server(b))
	if cli.err != nil || srv.err != nil {
		t.Fatalf("reset configs: client %v, server %v", cli.err, srv.err)
	}
	if cli.state.DidResume || !cli.state.PeerCertificates[0].Equal(mustSVID(t, src, b).Certificates[0]) {
		t.Errorf("reset configs resumed (%v) or saw an old certificate", cli.state.DidResume)
	}
	cli, srv = handshakeOn(t, ln, stale.Client(a), stale.Server(b))
	if cli.err == nil && srv.err == nil {
		t.Fatal("stale configs resumed a session of the removed CA: the test no longer shows why Reset is needed")
	}
	for _, err := range []error{cli.err, srv.err} {
		if err != nil && !strings.Contains(err.Error(), "unknown authority") && !strings.Contains(err.Error(), "bad certificate") {
			t.Errorf("stale configs failed for another reason: %v", err)
		}
	}
}

// TestResetRetiresConfigs checks the handshakes that run across a bundle change: a config
// obtained before the change verifies against the bundle of its time, a config obtained after
// against the new one; Reset without a previous bundle leaves the old configs on the live one.
func TestResetRetiresConfigs(t *testing.T) {
	p := newCAPair(t)
	src := NewCASource(p.oldCA, testTD, time.Hour, nil)
	b := mustID(t, testTD, "demo", "b")
	if err := src.Acquire(Workload{ID: b}); err != nil {
		t.Fatal(err)
	}
	oldSVID, err := p.oldCA.mint(mustID(t, testTD, "demo", "a"), time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	client := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, InsecureSkipVerify: true, Certificates: []tls.Certificate{tlsCert(oldSVID)}}

	configs := NewConfigs(src, nil)
	src.OnBundleChange(configs.Reset)
	inFlight := configs.Server(b)
	src.SetCA(p.ca(t, p.new[CACertFile], p.new[CAKeyFile]))
	if configs.Server(b) == inFlight {
		t.Fatal("the bundle change did not reset the configs")
	}
	if _, srv := handshake(t, client, inFlight); srv.err != nil {
		t.Errorf("a config of the old bundle refused its SVID: %v", srv.err)
	}
	if _, srv := handshake(t, client, configs.Server(b)); srv.err == nil || !strings.Contains(srv.err.Error(), "unknown authority") {
		t.Errorf("a config of the new bundle: error %v, want unknown authority", srv.err)
	}

	live := configs.Server(b)
	configs.Reset(nil)
	if _, srv := handshake(t, client, live); srv.err == nil {
		t.Error("Reset(nil) froze the old config on a bundle")
	}
}

// TestSVIDOfReplacedCA covers the race of a mint with SetCA: an SVID signed by a CA that stopped
// signing in the meantime is due at once.
func TestSVIDOfReplacedCA(t *testing.T) {
	p := newCAPair(t)
	src := NewCASource(p.oldCA, testTD, time.Hour, nil)
	id := mustID(t, testTD, "demo", "a")
	m, err := src.mint(id)
	if err != nil {
		t.Fatal(err)
	}
	src.SetCA(p.ca(t, p.both(), p.new[CAKeyFile]))
	src.mu.Lock()
	got := src.staleCheckLocked(m)
	src.mu.Unlock()
	if got.renewAt.After(time.Now()) {
		t.Errorf("SVID of the replaced CA renews at %s, want now", got.renewAt)
	}
}

// TestSetCANoChange rewrites the same CA: no notification, no re-mint.
func TestSetCANoChange(t *testing.T) {
	var logs logtest.Buffer
	p := newCAPair(t)
	src := NewCASource(p.oldCA, testTD, time.Hour, jsonLogger(&logs))
	id := mustID(t, testTD, "demo", "a")
	if err := src.Acquire(Workload{ID: id}); err != nil {
		t.Fatal(err)
	}
	src.OnBundleChange(func(x509bundle.Source) { t.Error("bundle change notified for an unchanged CA") })
	next, _ := src.rotateDue()
	src.SetCA(p.ca(t, p.old[CACertFile], p.old[CAKeyFile]))
	if again, _ := src.rotateDue(); !again.Equal(next) {
		t.Errorf("renewal moved from %s to %s", next, again)
	}
	if strings.Contains(logs.String(), "trust bundle reloaded") || strings.Contains(logs.String(), "signing CA changed") {
		t.Errorf("a change was logged:\n%s", logs.String())
	}
}
