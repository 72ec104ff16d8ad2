package meshtls

import (
	"crypto/tls"
	"crypto/x509"
	"net/url"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestWorkloadID(t *testing.T) {
	id, err := WorkloadID(testTD, "demo", "client")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := id.String(), "spiffe://cluster.local/ns/demo/sa/client"; got != want {
		t.Errorf("WorkloadID = %s, want %s", got, want)
	}
	if !id.MemberOf(testTD) {
		t.Errorf("%s not a member of %s", id, testTD)
	}

	for _, tc := range []struct {
		name, ns, sa string
		td           spiffeid.TrustDomain
		wantErr      string
	}{
		{"empty namespace", "", "sa", testTD, `namespace "": path cannot contain empty segments`},
		{"slash in namespace", "a/b", "sa", testTD, `namespace "a/b": path segment characters`},
		{"dot namespace", "..", "sa", testTD, `namespace "..": path cannot contain dot segments`},
		{"empty service account", "demo", "", testTD, `service account "": path cannot contain empty segments`},
		{"space in service account", "demo", "my sa", testTD, `service account "my sa": path segment characters`},
		{"no trust domain", "demo", "sa", spiffeid.TrustDomain{}, "trust domain is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, err := WorkloadID(tc.td, tc.ns, tc.sa)
			if err == nil {
				t.Fatalf("WorkloadID(%q, %q, %q) = %s, want error", tc.td, tc.ns, tc.sa, id)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q does not contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestPeerID(t *testing.T) {
	if _, err := PeerID(tls.ConnectionState{}); err == nil || !strings.Contains(err.Error(), "no certificate") {
		t.Errorf("PeerID without certificate: err = %v, want 'no certificate'", err)
	}
	want := mustID(t, testTD, "demo", "server")
	cs := tls.ConnectionState{PeerCertificates: []*x509.Certificate{{URIs: []*url.URL{want.URL()}}}}
	got, err := PeerID(cs)
	if err != nil || got != want {
		t.Errorf("PeerID = %s, %v; want %s", got, err, want)
	}
	cs.PeerCertificates[0].URIs = nil
	if _, err := PeerID(cs); err == nil || !strings.Contains(err.Error(), "no URI SAN") {
		t.Errorf("PeerID without URI SAN: err = %v", err)
	}
}
