package meshtls

import (
	"crypto/tls"
	"errors"
	"fmt"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Configs builds one long-lived tls.Config per identity and role; callbacks ask the Source at every
// handshake. Configs are cached and must be used as they are, never cloned per connection: server
// session ticket keys are made on first use, so per-connection clones would never resume.
type Configs struct {
	src       Source
	authorize tlsconfig.Authorizer

	mu      sync.Mutex
	clients map[spiffeid.ID]*tls.Config
	servers map[spiffeid.ID]*tls.Config
}

// NewConfigs returns Configs that present SVIDs of src, verify peers against src's bundles and
// then ask authorize, typically tlsconfig.AuthorizeMemberOf(trustDomain). A nil authorize
// admits the peers of the local identity's own trust domain.
func NewConfigs(src Source, authorize tlsconfig.Authorizer) *Configs {
	return &Configs{
		src:       src,
		authorize: authorize,
		clients:   make(map[spiffeid.ID]*tls.Config),
		servers:   make(map[spiffeid.ID]*tls.Config),
	}
}

// Client returns the config with which a pod of identity id connects to another: it presents id's
// current SVID, requires ALPN meshless/1 and a verified, authorized server. Its session cache
// belongs to id alone, so a pod can never resume another identity's session.
func (c *Configs) Client(id spiffeid.ID) *tls.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cfg, ok := c.clients[id]; ok {
		return cfg
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return c.certificate(id)
		},
		// The standard verification knows nothing of SPIFFE IDs; VerifyConnection replaces it and,
		// unlike VerifyPeerCertificate, also runs on resumed sessions.
		InsecureSkipVerify: true,
		VerifyConnection:   c.verifier(id),
		ClientSessionCache: tls.NewLRUClientSessionCache(0),
	}
	c.clients[id] = cfg
	return cfg
}

// Server returns the config with which a pod of identity id accepts connections: it presents id's
// current SVID, requires ALPN meshless/1 and a client certificate that verifies and is authorized.
// Each config is built from scratch so that it gets its own session ticket keys: a ticket issued
// for one identity cannot be resumed with another.
func (c *Configs) Server(id spiffeid.ID) *tls.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cfg, ok := c.servers[id]; ok {
		return cfg
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return c.certificate(id)
		},
		// Any certificate is asked for here; VerifyConnection checks it against the bundle, also
		// on resumed sessions.
		ClientAuth:       tls.RequireAnyClientCert,
		VerifyConnection: c.verifier(id),
	}
	c.servers[id] = cfg
	return cfg
}

// Forget drops the configs of id (its session cache and ticket keys with them), for when its
// last pod is gone. Connections already using them are not affected.
func (c *Configs) Forget(id spiffeid.ID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.clients, id)
	delete(c.servers, id)
}

// certificate returns id's current SVID in the form crypto/tls wants; asked at every handshake so
// that a rotated SVID is used without rebuilding the config.
func (c *Configs) certificate(id spiffeid.ID) (*tls.Certificate, error) {
	svid, err := c.src.SVID(id)
	if err != nil {
		return nil, fmt.Errorf("local certificate: %w", err)
	}
	cert := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, x := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	return cert, nil
}

// verifier returns the VerifyConnection callback for the configs of local identity id.
func (c *Configs) verifier(id spiffeid.ID) func(tls.ConnectionState) error {
	authorize := c.authorize
	if authorize == nil {
		authorize = tlsconfig.AuthorizeMemberOf(id.TrustDomain())
	}
	return func(cs tls.ConnectionState) error {
		if cs.NegotiatedProtocol != ALPN {
			return fmt.Errorf("peer did not negotiate ALPN %q (got %q)", ALPN, cs.NegotiatedProtocol)
		}
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		peer, chains, err := x509svid.Verify(cs.PeerCertificates, c.src)
		if err != nil {
			return fmt.Errorf("peer certificate rejected: %w", err)
		}
		if err := authorize(peer, chains); err != nil {
			return fmt.Errorf("peer %s not authorized: %w", peer, err)
		}
		return nil
	}
}
