package meshtls

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/meshless/meshless/internal/logtest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func TestMint(t *testing.T) {
	clock := &fakeClock{t: time.Now().Truncate(time.Second)}
	src := NewCASource(newTestCA(t), testTD, 3*time.Hour, nil)
	src.now = clock.Now
	id := mustID(t, testTD, "demo", "client")
	if err := src.Acquire(Workload{ID: id}); err != nil {
		t.Fatal(err)
	}
	svid, err := src.SVID(id)
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID != id || len(svid.Certificates) != 1 {
		t.Fatalf("SVID %s with %d certificates, want %s with the leaf only", svid.ID, len(svid.Certificates), id)
	}
	leaf := svid.Certificates[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("URI SANs %v, want [%s]", leaf.URIs, id)
	}
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Errorf("public key %T, want ECDSA P-256", leaf.PublicKey)
	}
	if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(svid.PrivateKey.Public()) {
		t.Error("private key does not match the certificate")
	}
	if leaf.IsCA || leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("IsCA %v, key usage %v; want a leaf with DigitalSignature only", leaf.IsCA, leaf.KeyUsage)
	}
	if eku := leaf.ExtKeyUsage; len(eku) != 2 || eku[0] != x509.ExtKeyUsageServerAuth || eku[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("extended key usage %v, want ServerAuth, ClientAuth", eku)
	}
	if want := clock.Now().Add(-time.Minute); !leaf.NotBefore.Equal(want) {
		t.Errorf("NotBefore %s, want %s (now - 1m)", leaf.NotBefore, want)
	}
	if want := clock.Now().Add(3 * time.Hour); !leaf.NotAfter.Equal(want) {
		t.Errorf("NotAfter %s, want %s (now + ttl)", leaf.NotAfter, want)
	}
	if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() > 128 {
		t.Errorf("serial %x is not a positive 128-bit number", leaf.SerialNumber)
	}
	got, chains, err := x509svid.Verify(svid.Certificates, src)
	if err != nil {
		t.Fatalf("the SVID does not verify against the source's bundle: %v", err)
	}
	if got != id || len(chains) != 1 || !chains[0][1].Equal(src.ca.Certificate()) {
		t.Errorf("Verify = %s, %d chains; want %s chained to the CA", got, len(chains), id)
	}
	// x509svid.Parse applies go-spiffe's own SVID rules (key usage, no CA flag, key match).
	certPEM, keyPEM, err := svid.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := x509svid.Parse(certPEM, keyPEM); err != nil {
		t.Errorf("go-spiffe rejects the SVID: %v", err)
	}
}

func TestMintClippedToCAExpiry(t *testing.T) {
	ca := newTestCA(t)
	clock := &fakeClock{t: ca.Certificate().NotAfter.Add(-time.Hour)}
	src := NewCASource(ca, testTD, 24*time.Hour, nil)
	src.now = clock.Now
	id := mustID(t, testTD, "demo", "client")
	if err := src.Acquire(Workload{ID: id}); err != nil {
		t.Fatal(err)
	}
	svid, err := src.SVID(id)
	if err != nil {
		t.Fatal(err)
	}
	if got := svid.Certificates[0].NotAfter; !got.Equal(ca.Certificate().NotAfter) {
		t.Errorf("NotAfter %s, want the CA's %s", got, ca.Certificate().NotAfter)
	}
	// Renewal is due at half the clipped life, not half the TTL.
	if next, _ := src.rotateDue(); !next.Equal(clock.Now().Add(30 * time.Minute)) {
		t.Errorf("renewal at %s, want %s", next, clock.Now().Add(30*time.Minute))
	}

	clock.Advance(2 * time.Hour)
	err = src.Acquire(Workload{ID: mustID(t, testTD, "demo", "late")})
	if err == nil || !strings.Contains(err.Error(), "CA certificate expired") {
		t.Errorf("Acquire after the CA expired: err = %v", err)
	}
	if _, err := src.SVID(id); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("SVID after expiry: err = %v, want expired", err)
	}
}

func TestAcquireRelease(t *testing.T) {
	src := newTestSource(t)
	id := mustID(t, testTD, "demo", "shared")
	for range 2 {
		if err := src.Acquire(Workload{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	first, err := src.SVID(id)
	if err != nil {
		t.Fatal(err)
	}
	src.Release(id)
	if svid, err := src.SVID(id); err != nil || svid != first {
		t.Fatalf("after one of two Releases: SVID = %v, %v; want the same SVID", svid, err)
	}
	src.Release(id)
	if _, err := src.SVID(id); err == nil || !strings.Contains(err.Error(), "not acquired") {
		t.Fatalf("after the last Release: err = %v, want 'not acquired'", err)
	}
	src.Release(id) // one Release too many is harmless

	if err := src.Acquire(Workload{ID: id}); err != nil {
		t.Fatal(err)
	}
	if svid, _ := src.SVID(id); svid == first {
		t.Error("re-acquiring a dropped identity reused its old SVID")
	}

	foreign := mustID(t, spiffeid.RequireTrustDomainFromString("other.test"), "demo", "x")
	if err := src.Acquire(Workload{ID: foreign}); err == nil || !strings.Contains(err.Error(), "not in trust domain") {
		t.Errorf("Acquire of a foreign ID: err = %v", err)
	}
	if _, err := src.GetX509BundleForTrustDomain(foreign.TrustDomain()); err == nil {
		t.Error("a bundle for a foreign trust domain")
	}
	b, err := src.GetX509BundleForTrustDomain(testTD)
	if err != nil || len(b.X509Authorities()) != 1 || !b.X509Authorities()[0].Equal(src.ca.Certificate()) {
		t.Errorf("bundle = %v, %v; want the CA certificate", b, err)
	}
}

// TestRotateAtHalfLife drives rotateDue with the fake clock: nothing happens before half-life,
// a new SVID (new key, new serial) replaces the old one at half-life.
func TestRotateAtHalfLife(t *testing.T) {
	const ttl = 24 * time.Hour
	// Certificates hold whole seconds.
	clock := &fakeClock{t: time.Now().Truncate(time.Second)}
	src := NewCASource(newTestCA(t), testTD, ttl, nil)
	src.now = clock.Now
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	if err := src.Acquire(Workload{ID: a}); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Hour)
	if err := src.Acquire(Workload{ID: b}); err != nil {
		t.Fatal(err)
	}
	oldA, _ := src.SVID(a)
	oldB, _ := src.SVID(b)

	clock.Advance(ttl/2 - time.Hour - time.Second)
	next, ok := src.rotateDue()
	if cur, _ := src.SVID(a); cur != oldA {
		t.Fatal("rotated before half-life")
	}
	if want := oldA.Certificates[0].NotAfter.Add(-ttl / 2); !ok || !next.Equal(want) {
		t.Errorf("next renewal %s, %v; want %s", next, ok, want)
	}

	clock.Advance(time.Second)
	next, _ = src.rotateDue()
	newA, _ := src.SVID(a)
	if newA == oldA || newA.Certificates[0].SerialNumber.Cmp(oldA.Certificates[0].SerialNumber) == 0 {
		t.Fatal("not rotated at half-life")
	}
	if newA.PrivateKey.Public().(*ecdsa.PublicKey).Equal(oldA.PrivateKey.Public()) {
		t.Error("rotation kept the old key")
	}
	if want := clock.Now().Add(ttl); !newA.Certificates[0].NotAfter.Equal(want) {
		t.Errorf("new NotAfter %s, want %s", newA.Certificates[0].NotAfter, want)
	}
	if cur, _ := src.SVID(b); cur != oldB {
		t.Error("b rotated before its own half-life")
	}
	// b, minted an hour after a, is next.
	if want := oldB.Certificates[0].NotAfter.Add(-ttl / 2); !next.Equal(want) {
		t.Errorf("next renewal %s, want b's %s", next, want)
	}
}

// TestRunRotates checks the Run loop with the fake clock: woken after the clock moved past
// half-life, it re-mints and logs it.
func TestRunRotates(t *testing.T) {
	const ttl = 24 * time.Hour
	var logs logtest.Buffer
	clock := &fakeClock{t: time.Now()}
	src := NewCASource(newTestCA(t), testTD, ttl, jsonLogger(&logs))
	src.now = clock.Now
	id := mustID(t, testTD, "demo", "a")
	if err := src.Acquire(Workload{ID: id}); err != nil {
		t.Fatal(err)
	}
	old, _ := src.SVID(id)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- src.Run(ctx) }()
	clock.Advance(ttl / 2)
	src.nudge()
	waitRotated(t, src, id, old)
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run returned %v after its context ended", err)
	}

	var sawMint, sawRotate bool
	for line := range strings.SplitSeq(strings.TrimSpace(logs.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec["spiffe_id"] != id.String() || rec["expires"] == nil {
			t.Errorf("log line without spiffe_id/expires: %s", line)
		}
		sawMint = sawMint || rec["msg"] == "svid minted"
		sawRotate = sawRotate || rec["msg"] == "svid rotated"
	}
	if !sawMint || !sawRotate {
		t.Errorf("logs lack the mint or the rotation:\n%s", logs.String())
	}
}

// TestRunRealClock runs rotation on the real clock with a 2s TTL: the SVID is re-minted about a
// second later by the timer alone.
func TestRunRealClock(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for a real rotation")
	}
	src := NewCASource(newTestCA(t), testTD, 2*time.Second, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go src.Run(ctx)
	id := mustID(t, testTD, "demo", "a")
	if err := src.Acquire(Workload{ID: id}); err != nil {
		t.Fatal(err)
	}
	old, _ := src.SVID(id)
	waitRotated(t, src, id, old)
}

// waitRotated polls until id's SVID is no longer old; the deadline only guards against a hang.
func waitRotated(t *testing.T, src *CASource, id spiffeid.ID, old *x509svid.SVID) *x509svid.SVID {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if cur, err := src.SVID(id); err == nil && cur != old {
			return cur
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("SVID of %s not rotated", id)
	return nil
}

// TestRotationFailureRetries keeps the old SVID in use when re-minting fails and retries later.
func TestRotationFailureRetries(t *testing.T) {
	var logs logtest.Buffer
	ca := newTestCA(t)
	// Half-life falls after the CA's expiry, so the re-mint fails.
	clock := &fakeClock{t: ca.Certificate().NotAfter.Add(-2 * time.Hour)}
	src := NewCASource(ca, testTD, 24*time.Hour, jsonLogger(&logs))
	src.now = clock.Now
	id := mustID(t, testTD, "demo", "a")
	if err := src.Acquire(Workload{ID: id}); err != nil {
		t.Fatal(err)
	}
	old, _ := src.SVID(id)
	clock.Advance(2*time.Hour + time.Second)
	next, ok := src.rotateDue()
	src.mu.Lock()
	kept := src.held[id].svid == old
	src.mu.Unlock()
	if !kept {
		t.Error("SVID replaced although re-minting failed")
	}
	if want := clock.Now().Add(retryInterval); !ok || !next.Equal(want) {
		t.Errorf("retry at %s, %v; want %s", next, ok, want)
	}
	if !strings.Contains(logs.String(), `"msg":"svid rotation failed"`) || !strings.Contains(logs.String(), "CA certificate expired") {
		t.Errorf("failure not logged with its reason:\n%s", logs.String())
	}
}
