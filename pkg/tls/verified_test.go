package meshtls

import (
	"crypto/x509"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// countingBundles is a bundle source that counts how often it is asked.
type countingBundles struct {
	x509bundle.Source
	asked atomic.Int32
}

func (c *countingBundles) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	c.asked.Add(1)
	return c.Source.GetX509BundleForTrustDomain(td)
}

func mintFor(t *testing.T, ca *CA, id spiffeid.ID, now time.Time) []*x509.Certificate {
	t.Helper()
	svid, err := ca.mint(id, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return svid.Certificates
}

// A chain seen again is accepted from memory, and only exactly that chain: another peer, the same
// SPIFFE ID from a CA outside the bundle, a replaced bundle, or a time outside the certificates'
// validity all get the full verification and its verdict.
func TestVerifiedChains(t *testing.T) {
	now := time.Now()
	ca, foreign := newTestCA(t), newTestCA(t)
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	bundles := &countingBundles{Source: x509bundle.FromX509Authorities(testTD, ca.Authorities())}
	var v verifiedChains

	certsA := mintFor(t, ca, a, now)
	if peer, _, err := v.verify(certsA, bundles, now); err != nil || peer != a {
		t.Fatalf("first verification: %s, %v", peer, err)
	}
	before := bundles.asked.Load()
	if peer, chains, err := v.verify(certsA, bundles, now.Add(time.Minute)); err != nil || peer != a || len(chains) == 0 {
		t.Fatalf("second verification: %s, %v", peer, err)
	}
	// The full verification asks for the bundle a second time; from memory, only the lookup
	// that identifies the bundle remains.
	if asked := bundles.asked.Load() - before; asked != 1 {
		t.Errorf("second verification asked the bundle source %d times, want 1 (remembered)", asked)
	}

	if peer, _, err := v.verify(mintFor(t, ca, b, now), bundles, now); err != nil || peer != b {
		t.Errorf("another peer of the same CA: %s, %v; want %s", peer, err, b)
	}
	if _, _, err := v.verify(mintFor(t, foreign, a, now), bundles, now); err == nil {
		t.Error("the same SPIFFE ID signed by a CA outside the bundle was accepted")
	}
	if _, _, err := v.verify(certsA, bundles, certsA[0].NotAfter.Add(time.Second)); err == nil {
		t.Error("a remembered chain was accepted after its leaf expired")
	}
	if _, _, err := v.verify(certsA, bundles, certsA[0].NotBefore.Add(-time.Second)); err == nil {
		t.Error("a remembered chain was accepted before its leaf was valid")
	}
	replaced := x509bundle.FromX509Authorities(testTD, foreign.Authorities())
	if _, _, err := v.verify(certsA, replaced, now); err == nil {
		t.Error("a remembered chain was accepted after the bundle was replaced by one without its CA")
	}
}

// The memory stays bounded however many chains verify.
func TestVerifiedChainsBounded(t *testing.T) {
	now := time.Now()
	ca := newTestCA(t)
	bundles := x509bundle.FromX509Authorities(testTD, ca.Authorities())
	id := mustID(t, testTD, "demo", "a")
	var v verifiedChains
	for range maxVerifiedChains + 10 {
		if _, _, err := v.verify(mintFor(t, ca, id, now), bundles, now); err != nil {
			t.Fatal(err)
		}
		if n := len(v.m); n > maxVerifiedChains {
			t.Fatalf("%d chains remembered, bound is %d", n, maxVerifiedChains)
		}
	}
}

// swapSource hands out whichever SVID it holds.
type swapSource struct {
	x509bundle.Source
	svid atomic.Pointer[x509svid.SVID]
}

func (s *swapSource) SVID(spiffeid.ID) (*x509svid.SVID, error) { return s.svid.Load(), nil }

// The tls.Certificate of an SVID is made once, and made again when the source rotates the SVID.
func TestCertificatePerSVID(t *testing.T) {
	now := time.Now()
	ca := newTestCA(t)
	id := mustID(t, testTD, "demo", "a")
	src := &swapSource{Source: x509bundle.FromX509Authorities(testTD, ca.Authorities())}
	first, err := ca.mint(id, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	src.svid.Store(first)
	c := NewConfigs(src, nil)
	c1, _ := c.certificate(id)
	c2, _ := c.certificate(id)
	if c1 != c2 {
		t.Error("the same SVID gave two tls.Certificates")
	}
	rotated, err := ca.mint(id, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	src.svid.Store(rotated)
	c3, _ := c.certificate(id)
	if c3 == c1 || c3.Leaf != rotated.Certificates[0] || c3.PrivateKey != rotated.PrivateKey {
		t.Error("a rotated SVID did not replace the certificate")
	}
}
