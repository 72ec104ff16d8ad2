package meshtls

import (
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
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
	// curves is every config's CurvePreferences; nil keeps Go's default, post-quantum first.
	curves []tls.CurveID

	// certs holds each identity's SVID in the form crypto/tls wants (spiffeid.ID to *certEntry),
	// rebuilt only when the source hands out a new SVID.
	certs sync.Map

	mu      sync.Mutex
	gen     *generation
	clients map[spiffeid.ID]*tls.Config
	servers map[spiffeid.ID]*tls.Config
}

// certEntry is the tls.Certificate made of one SVID.
type certEntry struct {
	svid *x509svid.SVID
	cert *tls.Certificate
}

// generation is what the configs built between two Resets share.
type generation struct {
	// retired is set by Reset to the bundles that were in force when the generation's configs
	// were dropped; handshakes still running on them verify against it.
	retired atomic.Pointer[retiredBundles]
	// verified remembers the peer chains that verified, for the handshakes that present them
	// again.
	verified verifiedChains
}

type retiredBundles struct{ x509bundle.Source }

// classicalCurves are the key exchanges offered and accepted when post-quantum key exchange is
// off. In FIPS 140-3 mode Go leaves out X25519, which is not approved, so P-256 remains.
var classicalCurves = []tls.CurveID{tls.X25519, tls.CurveP256}

// Option tunes NewConfigs.
type Option func(*Configs)

// PostQuantum turns the hybrid post-quantum key exchange (X25519MLKEM768, offered first by
// default) on or off; off limits the key exchange, offered and accepted, to X25519 and P-256
// (P-256 alone in FIPS 140-3 mode).
func PostQuantum(enabled bool) Option {
	return func(c *Configs) {
		c.curves = nil
		if !enabled {
			c.curves = classicalCurves
		}
	}
}

// NewConfigs returns Configs that present SVIDs of src, verify peers against src's bundles and
// then ask authorize, typically tlsconfig.AuthorizeMemberOf(trustDomain). A nil authorize
// admits the peers of the local identity's own trust domain.
func NewConfigs(src Source, authorize tlsconfig.Authorizer, opts ...Option) *Configs {
	c := &Configs{
		src:       src,
		authorize: authorize,
		gen:       &generation{},
		clients:   make(map[spiffeid.ID]*tls.Config),
		servers:   make(map[spiffeid.ID]*tls.Config),
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

// ClientHelloChecker is implemented by a connection that must see the ClientHello before a server
// config of Configs answers it: the handshake goes on only if CheckClientHello returns nil. The
// data path tells meshless mTLS from other traffic on one port this way, with the one parse of the
// ClientHello that the handshake makes anyway.
type ClientHelloChecker interface {
	CheckClientHello(*tls.ClientHelloInfo) error
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
	cfg := c.common(id)
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return c.certificate(id)
	}
	// The standard verification knows nothing of SPIFFE IDs; VerifyConnection replaces it.
	cfg.InsecureSkipVerify = true
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(0)
	c.clients[id] = cfg
	return cfg
}

// Server returns the config with which a pod of identity id accepts connections: it presents id's
// current SVID, requires ALPN meshless/1 and a client certificate that verifies and is authorized.
// A connection that is a ClientHelloChecker is shown the ClientHello first.
// Each config is built from scratch so that it gets its own session ticket keys: a ticket issued
// for one identity cannot be resumed with another.
func (c *Configs) Server(id spiffeid.ID) *tls.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cfg, ok := c.servers[id]; ok {
		return cfg
	}
	cfg := c.common(id)
	cfg.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		return c.certificate(id)
	}
	// Any certificate is asked for here; VerifyConnection checks it against the bundle.
	cfg.ClientAuth = tls.RequireAnyClientCert
	// No other config is returned: the session ticket keys stay this config's.
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if c, ok := hello.Conn.(ClientHelloChecker); ok {
			return nil, c.CheckClientHello(hello)
		}
		return nil, nil
	}
	c.servers[id] = cfg
	return cfg
}

// common is what both roles of identity id share: TLS 1.3 with ALPN meshless/1, and the peer
// verified against the bundle and authorized in VerifyConnection, which, unlike
// VerifyPeerCertificate, also runs on resumed sessions.
func (c *Configs) common(id spiffeid.ID) *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		NextProtos:       []string{ALPN},
		CurvePreferences: c.curves,
		// The peer is another proxy that reads whole records: small first records (good for a
		// browser's first paint) would only cost more records, writes and wake-ups.
		DynamicRecordSizingDisabled: true,
		VerifyConnection:            c.verifier(id, c.gen),
	}
}

// Forget drops the configs of id (its session cache and ticket keys with them), for when its
// last pod is gone. Connections already using them are not affected.
func (c *Configs) Forget(id spiffeid.ID) {
	c.certs.Delete(id)
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.clients, id)
	delete(c.servers, id)
}

// Reset drops every config, with their session caches and ticket keys, for when the trust bundle
// changes: a resumed session whose peer certificate no longer verifies fails its handshake (TLS
// has no fallback to a full handshake then), so sessions made under the old bundle must not be
// offered or accepted any more. Connections already open are not affected. Handshakes already
// running on the dropped configs verify against previous, the bundles in force when they started
// (nil: the source's current ones); the source calls Reset before it switches bundles.
func (c *Configs) Reset(previous x509bundle.Source) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if previous != nil {
		c.gen.retired.Store(&retiredBundles{previous})
	}
	c.gen = &generation{}
	clear(c.clients)
	clear(c.servers)
}

// certificate returns id's current SVID in the form crypto/tls wants; asked at every handshake so
// that a rotated SVID is used without rebuilding the config. The source hands out the same
// *x509svid.SVID until it rotates it, so the tls.Certificate is made once per SVID; crypto/tls
// only reads it, and concurrent handshakes share it.
func (c *Configs) certificate(id spiffeid.ID) (*tls.Certificate, error) {
	svid, err := c.src.SVID(id)
	if err != nil {
		return nil, fmt.Errorf("local certificate: %w", err)
	}
	if e, ok := c.certs.Load(id); ok && e.(*certEntry).svid == svid {
		return e.(*certEntry).cert, nil
	}
	cert := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, x := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	c.certs.Store(id, &certEntry{svid: svid, cert: cert})
	return cert, nil
}

// resumeGrace bounds how long a resumed handshake may take, for verifyTime.
const resumeGrace = 10 * time.Second

// verifyTime returns the time at which to verify the peer's certificates: now, except for a
// resumed session whose peer certificate expired within resumeGrace. crypto/tls resumes a session
// only if its peer certificate has not expired when the handshake starts, and makes a full
// handshake otherwise; VerifyConnection runs a round trip later, so a session resumed in the last
// moments of the certificate's life would fail outright. Such a session is verified as of its
// certificate's last valid instant, when crypto/tls decided to resume it. Short-lived SVIDs make
// that case frequent: resumed sessions keep their peer certificate to its end.
func verifyTime(cs tls.ConnectionState, now time.Time) time.Time {
	if !cs.DidResume || len(cs.PeerCertificates) == 0 {
		return now
	}
	if expiry := cs.PeerCertificates[0].NotAfter; now.After(expiry) && now.Sub(expiry) <= resumeGrace {
		return expiry
	}
	return now
}

// verifier returns the VerifyConnection callback for the configs of local identity id, built in
// generation gen.
func (c *Configs) verifier(id spiffeid.ID, gen *generation) func(tls.ConnectionState) error {
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
		var bundles x509bundle.Source = c.src
		if r := gen.retired.Load(); r != nil {
			bundles = r.Source
		}
		peer, chains, err := gen.verified.verify(cs.PeerCertificates, bundles, verifyTime(cs, time.Now()))
		if err != nil {
			return fmt.Errorf("peer certificate rejected: %w", err)
		}
		if err := authorize(peer, chains); err != nil {
			return fmt.Errorf("peer %s not authorized: %w", peer, err)
		}
		return nil
	}
}
