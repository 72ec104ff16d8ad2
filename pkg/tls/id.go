// Package meshtls holds meshless's workload identities: SPIFFE IDs for pods, the built-in CA that
// mints their X.509-SVIDs and rotates them, and the long-lived tls.Configs (TLS 1.3, mutual, ALPN
// meshless/1) with which the node daemon originates and terminates each pod's connections.
package meshtls

import (
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ALPN is the application protocol that marks a connection as meshless mTLS. The inbound side tells
// mesh traffic from plaintext by it, so both ends offer and require it.
const ALPN = "meshless/1"

// WorkloadID returns the SPIFFE ID spiffe://<td>/ns/<namespace>/sa/<serviceAccount>, the
// Istio/SPIRE convention for a Kubernetes service account.
func WorkloadID(td spiffeid.TrustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	if td.IsZero() {
		return spiffeid.ID{}, errors.New("workload ID: trust domain is empty")
	}
	// Checked one by one so that the error names the offending part, which spiffeid does not.
	if err := spiffeid.ValidatePathSegment(namespace); err != nil {
		return spiffeid.ID{}, fmt.Errorf("workload ID: namespace %q: %w", namespace, err)
	}
	if err := spiffeid.ValidatePathSegment(serviceAccount); err != nil {
		return spiffeid.ID{}, fmt.Errorf("workload ID: service account %q: %w", serviceAccount, err)
	}
	id, err := spiffeid.FromSegments(td, "ns", namespace, "sa", serviceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("workload ID for %s/%s in %s: %w", namespace, serviceAccount, td, err)
	}
	return id, nil
}

// PeerID returns the SPIFFE ID in the URI SAN of the peer's leaf certificate. It does not verify
// anything: call it on a connection whose handshake (and so VerifyConnection) succeeded.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer ID: peer sent no certificate")
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("peer ID: %w", err)
	}
	return id, nil
}
