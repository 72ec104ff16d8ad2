package spire

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/protobuf/proto"
)

// These tests feed the source updates as the agent would send them, without an agent, for the
// cases a healthy SPIRE deployment does not produce on demand.

func bareSource() *Source {
	return &Source{
		log:       slog.New(slog.DiscardHandler),
		now:       time.Now,
		subs:      make(map[spiffeid.ID]*subscription),
		bundles:   make(map[spiffeid.TrustDomain]*x509bundle.Bundle),
		bundleRaw: make(map[spiffeid.TrustDomain][]byte),
		changed:   make(chan struct{}),
	}
}

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key}
}

// svid returns an X509SVIDWithKey for id as the agent sends it.
func (ca *testCA) svid(t *testing.T, id spiffeid.ID, serial int64) *delegatedidentityv1.X509SVIDWithKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(id.String())
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         []*url.URL{u},
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return &delegatedidentityv1.X509SVIDWithKey{
		X509Svid:    &types.X509SVID{Id: &types.SPIFFEID{TrustDomain: id.TrustDomain().Name(), Path: id.Path()}, CertChain: [][]byte{der}},
		X509SvidKey: pkcs8,
	}
}

// agentUpdate is the SVIDs of an update as the source reads it off the wire: encoded by the
// generated types, decoded by the source's own decoder.
func agentUpdate(t *testing.T, svids ...*delegatedidentityv1.X509SVIDWithKey) []x509SVIDWithKey {
	t.Helper()
	raw, err := proto.Marshal(&delegatedidentityv1.SubscribeToX509SVIDsResponse{X509Svids: svids})
	if err != nil {
		t.Fatal(err)
	}
	got, err := unmarshalSVIDsResponse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func TestUpdateSVIDFollowsOnlyItsID(t *testing.T) {
	s := bareSource()
	ca := newTestCA(t)
	sub := &subscription{refs: 1, w: buyer.workload("p1")}
	s.subs[buyer.id()] = sub

	s.updateSVID(sub, agentUpdate(t, ca.svid(t, seller.id(), 2)))
	if sub.svid != nil || sub.err == nil || !strings.Contains(sub.err.Error(), seller.id().String()) {
		t.Fatalf("an update with another ID only: svid %v, err %v", sub.svid, sub.err)
	}

	s.updateSVID(sub, agentUpdate(t, ca.svid(t, seller.id(), 3), ca.svid(t, buyer.id(), 4)))
	got, err := s.SVID(buyer.id())
	if err != nil || got.Certificates[0].SerialNumber.Int64() != 4 {
		t.Fatalf("SVID after an update carrying it: %v, %v", got, err)
	}

	// An update without the ID (the agent not synced yet) keeps the held SVID until it expires.
	s.updateSVID(sub, nil)
	if got, err := s.SVID(buyer.id()); err != nil || got.Certificates[0].SerialNumber.Int64() != 4 {
		t.Fatalf("held SVID dropped by an update without it: %v, %v", got, err)
	}

	// A certificate whose key does not match is refused; the held SVID stays.
	bad := ca.svid(t, buyer.id(), 5)
	bad.X509SvidKey = ca.svid(t, buyer.id(), 6).X509SvidKey
	s.updateSVID(sub, agentUpdate(t, bad))
	if got, _ := s.SVID(buyer.id()); got.Certificates[0].SerialNumber.Int64() != 4 {
		t.Fatal("an SVID with a mismatched key replaced the held one")
	}
	if sub.err == nil || !strings.Contains(sub.err.Error(), "unusable") {
		t.Errorf("mismatched key not reported: %v", sub.err)
	}

	s.updateSVID(sub, agentUpdate(t, ca.svid(t, buyer.id(), 7)))
	if got, _ := s.SVID(buyer.id()); got.Certificates[0].SerialNumber.Int64() != 7 {
		t.Fatal("a rotated SVID was not taken")
	}
}

func TestUpdateBundlesTellsListenersOfChanges(t *testing.T) {
	s := bareSource()
	ca1, ca2, ca3 := newTestCA(t), newTestCA(t), newTestCA(t)
	other := spiffeid.RequireTrustDomainFromString("other.org")
	var previous []x509bundle.Source
	s.OnBundleChange(func(p x509bundle.Source) { previous = append(previous, p) })

	s.updateBundles(map[string][]byte{"spiffe://cluster.local": ca1.cert.Raw})
	s.updateBundles(map[string][]byte{"spiffe://cluster.local": ca1.cert.Raw})
	if len(previous) != 0 {
		t.Fatalf("listeners called %d times for the first bundle and an unchanged one", len(previous))
	}

	// A SPIRE CA roll-over: the new authority joins the bundle.
	s.updateBundles(map[string][]byte{"spiffe://cluster.local": append(append([]byte{}, ca1.cert.Raw...), ca2.cert.Raw...)})
	if len(previous) != 1 {
		t.Fatalf("listeners called %d times for a changed bundle, want 1", len(previous))
	}
	old, err := previous[0].GetX509BundleForTrustDomain(testTD)
	if err != nil || len(old.X509Authorities()) != 1 || !old.HasX509Authority(ca1.cert) {
		t.Fatalf("listener got %v, %v; want the bundle before the change", old, err)
	}
	b, _ := s.GetX509BundleForTrustDomain(testTD)
	if len(b.X509Authorities()) != 2 {
		t.Fatalf("bundle has %d authorities after the roll-over, want 2", len(b.X509Authorities()))
	}

	// A trust domain whose certificates do not parse keeps its bundle; a federated one is added.
	s.updateBundles(map[string][]byte{"spiffe://cluster.local": []byte("garbage"), "spiffe://other.org": ca3.cert.Raw})
	if b, _ := s.GetX509BundleForTrustDomain(testTD); b == nil || len(b.X509Authorities()) != 2 {
		t.Fatal("an unparsable bundle replaced a good one")
	}
	if b, err := s.GetX509BundleForTrustDomain(other); err != nil || !b.HasX509Authority(ca3.cert) {
		t.Fatalf("federated bundle: %v, %v", b, err)
	}

	// Removing the federated trust domain drops its bundle.
	s.updateBundles(map[string][]byte{"spiffe://cluster.local": append(append([]byte{}, ca1.cert.Raw...), ca2.cert.Raw...)})
	if _, err := s.GetX509BundleForTrustDomain(other); err == nil {
		t.Fatal("a trust domain the agent no longer sends still has a bundle")
	}
}
