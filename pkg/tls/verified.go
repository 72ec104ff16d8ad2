package meshtls

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// maxVerifiedChains bounds the verified chains one generation of configs remembers; past it, the
// expired ones are dropped, and all of them if none has expired. A node's peers are a few
// identities whose SVIDs rotate every few hours, so the bound is rarely reached.
const maxVerifiedChains = 1024

// verifiedChains remembers the certificate chains that x509svid.Verify accepted, so that a peer
// presenting exactly the same certificates again (each resumed session does, and so does every new
// connection of the same client until its SVID rotates) costs a hash instead of the chain's
// signature checks. It stands for the chain check alone, a function of the certificates, the
// bundle and the time: crypto/tls still makes every peer prove that it holds the leaf's key (or
// the resumed session's secret), and the authorizer still runs at every handshake.
//
// An entry counts only with the very same bundle of the peer's trust domain (sources replace a
// bundle that changes, never change it in place) and at a time inside every certificate's
// validity in the verified chains.
type verifiedChains struct {
	mu sync.Mutex
	m  map[[sha256.Size]byte]*verifiedChain
}

type verifiedChain struct {
	bundle              *x509bundle.Bundle
	peer                spiffeid.ID
	chains              [][]*x509.Certificate
	notBefore, notAfter time.Time
}

// verify returns what x509svid.Verify(certs, bundles, at) returns, from memory when it can.
func (v *verifiedChains) verify(certs []*x509.Certificate, bundles x509bundle.Source, at time.Time) (spiffeid.ID, [][]*x509.Certificate, error) {
	bundle := peerBundle(certs, bundles)
	key := chainKey(certs)
	if bundle != nil {
		v.mu.Lock()
		e := v.m[key]
		v.mu.Unlock()
		if e != nil && e.bundle == bundle && !at.Before(e.notBefore) && !at.After(e.notAfter) {
			return e.peer, e.chains, nil
		}
	}
	peer, chains, err := x509svid.Verify(certs, bundles, x509svid.WithTime(at))
	if err != nil || bundle == nil {
		return peer, chains, err
	}
	e := &verifiedChain{bundle: bundle, peer: peer, chains: chains}
	for _, chain := range chains {
		for _, c := range chain {
			if e.notBefore.IsZero() || c.NotBefore.After(e.notBefore) {
				e.notBefore = c.NotBefore
			}
			if e.notAfter.IsZero() || c.NotAfter.Before(e.notAfter) {
				e.notAfter = c.NotAfter
			}
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.m == nil {
		v.m = make(map[[sha256.Size]byte]*verifiedChain)
	}
	if len(v.m) >= maxVerifiedChains {
		for k, old := range v.m {
			if at.After(old.notAfter) {
				delete(v.m, k)
			}
		}
		if len(v.m) >= maxVerifiedChains {
			clear(v.m)
		}
	}
	v.m[key] = e
	return peer, chains, nil
}

// peerBundle returns the bundle that the chain of certs would be verified against, or nil if the
// leaf names no trust domain that bundles has (the full verification then says why).
func peerBundle(certs []*x509.Certificate, bundles x509bundle.Source) *x509bundle.Bundle {
	if len(certs) == 0 {
		return nil
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		return nil
	}
	b, err := bundles.GetX509BundleForTrustDomain(id.TrustDomain())
	if err != nil {
		return nil
	}
	return b
}

// chainKey identifies a presented chain by the hash of its certificates, each preceded by its
// length so that no two different chains run together into the same bytes.
func chainKey(certs []*x509.Certificate) [sha256.Size]byte {
	h := sha256.New()
	var n [4]byte
	for _, c := range certs {
		binary.BigEndian.PutUint32(n[:], uint32(len(c.Raw)))
		h.Write(n[:])
		h.Write(c.Raw)
	}
	var key [sha256.Size]byte
	h.Sum(key[:0])
	return key
}
