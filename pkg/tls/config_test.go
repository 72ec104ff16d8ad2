package meshtls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func TestMutualTLS(t *testing.T) {
	a, b := mustID(t, testTD, "demo", "client"), mustID(t, testTD, "demo", "server")
	configs := NewConfigs(newTestSource(t, a, b), tlsconfig.AuthorizeMemberOf(testTD))
	cli, srv := handshake(t, configs.Client(a), configs.Server(b))
	if cli.err != nil || srv.err != nil {
		t.Fatalf("handshake: client %v, server %v", cli.err, srv.err)
	}
	for side, want := range map[string]struct {
		state tls.ConnectionState
		peer  spiffeid.ID
	}{"client": {cli.state, b}, "server": {srv.state, a}} {
		if got, err := PeerID(want.state); err != nil || got != want.peer {
			t.Errorf("%s sees peer %s (%v), want %s", side, got, err, want.peer)
		}
		if want.state.NegotiatedProtocol != ALPN {
			t.Errorf("%s: ALPN %q, want %q", side, want.state.NegotiatedProtocol, ALPN)
		}
		if want.state.Version != tls.VersionTLS13 {
			t.Errorf("%s: version %x, want TLS 1.3", side, want.state.Version)
		}
	}
	// Go's default key exchange, post-quantum hybrid first, is kept.
	if cli.state.CurveID != tls.X25519MLKEM768 {
		t.Errorf("key exchange %v, want X25519MLKEM768", cli.state.CurveID)
	}
}

func TestConfigsCached(t *testing.T) {
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	configs := NewConfigs(newTestSource(t, a, b), nil)
	ca, sa := configs.Client(a), configs.Server(a)
	if configs.Client(a) != ca || configs.Server(a) != sa {
		t.Error("configs are rebuilt instead of cached")
	}
	if cb := configs.Client(b); cb == ca || cb.ClientSessionCache == ca.ClientSessionCache {
		t.Error("two identities share a client config or session cache")
	}
	for _, cfg := range []*tls.Config{ca, sa} {
		if cfg.MinVersion != tls.VersionTLS13 || len(cfg.NextProtos) != 1 || cfg.NextProtos[0] != ALPN || cfg.CurvePreferences != nil {
			t.Errorf("config: min version %x, ALPN %v, curves %v", cfg.MinVersion, cfg.NextProtos, cfg.CurvePreferences)
		}
	}
	configs.Forget(a)
	if configs.Client(a) == ca || configs.Server(a) == sa {
		t.Error("Forget kept the configs")
	}
}

// TestResumption shows that the cached configs resume sessions, and that a resumed session is
// still verified and authorized on both sides.
func TestResumption(t *testing.T) {
	a, b := mustID(t, testTD, "demo", "client"), mustID(t, testTD, "demo", "server")
	src := newTestSource(t, a, b)

	for _, side := range []string{"server", "client"} {
		t.Run("refused by "+side, func(t *testing.T) {
			var refuse atomic.Bool
			authorize := func(id spiffeid.ID, chains [][]*x509.Certificate) error {
				if refuse.Load() {
					return errors.New("policy changed")
				}
				return tlsconfig.AuthorizeMemberOf(testTD)(id, chains)
			}
			configs := NewConfigs(src, authorize)
			cfg := configs.Server(b)
			if side == "client" {
				cfg = configs.Client(a)
			}
			// Record which verifications ran on a resumed session.
			var resumedChecks atomic.Int32
			verify := cfg.VerifyConnection
			cfg.VerifyConnection = func(cs tls.ConnectionState) error {
				if cs.DidResume {
					resumedChecks.Add(1)
				}
				return verify(cs)
			}

			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			cli, srv := handshakeOn(t, ln, configs.Client(a), configs.Server(b))
			if cli.err != nil || srv.err != nil || cli.state.DidResume {
				t.Fatalf("first handshake: client %v, server %v, resumed %v", cli.err, srv.err, cli.state.DidResume)
			}
			cli, srv = handshakeOn(t, ln, configs.Client(a), configs.Server(b))
			if cli.err != nil || srv.err != nil {
				t.Fatalf("second handshake: client %v, server %v", cli.err, srv.err)
			}
			if !cli.state.DidResume || !srv.state.DidResume {
				t.Fatalf("second handshake did not resume (client %v, server %v)", cli.state.DidResume, srv.state.DidResume)
			}
			if peer, _ := PeerID(srv.state); peer != a {
				t.Errorf("server sees %s on the resumed session, want %s", peer, a)
			}
			if peer, _ := PeerID(cli.state); peer != b {
				t.Errorf("client sees %s on the resumed session, want %s", peer, b)
			}

			refuse.Store(true)
			cli, srv = handshakeOn(t, ln, configs.Client(a), configs.Server(b))
			refusal := srv.err
			if side == "client" {
				refusal = cli.err
			}
			if refusal == nil || !strings.Contains(refusal.Error(), "not authorized: policy changed") {
				t.Errorf("third handshake: %s error %v, want 'not authorized: policy changed'", side, refusal)
			}
			if resumedChecks.Load() != 2 {
				t.Errorf("%s verified %d resumed sessions, want 2", side, resumedChecks.Load())
			}
		})
	}
}

// TestSessionsBelongToIdentities shows that a session is never resumed across identities: another
// client identity has its own cache, another server identity its own ticket keys.
func TestSessionsBelongToIdentities(t *testing.T) {
	a, b, c := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b"), mustID(t, testTD, "demo", "c")
	configs := NewConfigs(newTestSource(t, a, b, c), nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if cli, srv := handshakeOn(t, ln, configs.Client(a), configs.Server(b)); cli.err != nil || srv.err != nil {
		t.Fatalf("handshake: client %v, server %v", cli.err, srv.err)
	}

	cli, srv := handshakeOn(t, ln, configs.Client(c), configs.Server(b))
	if cli.err != nil || srv.err != nil {
		t.Fatalf("handshake: client %v, server %v", cli.err, srv.err)
	}
	if peer, _ := PeerID(srv.state); srv.state.DidResume || peer != c {
		t.Errorf("client %s resumed (%v) or was seen as %s", c, srv.state.DidResume, peer)
	}

	// Same address, another server identity: a's ticket from b must not work there.
	cli, srv = handshakeOn(t, ln, configs.Client(a), configs.Server(c))
	if cli.err != nil || srv.err != nil {
		t.Fatalf("handshake: client %v, server %v", cli.err, srv.err)
	}
	if peer, _ := PeerID(cli.state); cli.state.DidResume || peer != c {
		t.Errorf("server %s resumed b's session (%v) or was seen as %s", c, cli.state.DidResume, peer)
	}
}

// TestRotationKeepsConnections rotates both SVIDs while a connection is open: the connection
// goes on, and new full handshakes present the new certificates.
func TestRotationKeepsConnections(t *testing.T) {
	const ttl = 2 * time.Hour
	// Start half a life in the past so that both SVIDs are valid for the real clock that
	// verification uses.
	clock := &fakeClock{t: time.Now().Add(-ttl / 2)}
	src := NewCASource(newTestCA(t), testTD, ttl, nil)
	src.now = clock.Now
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	for _, id := range []spiffeid.ID{a, b} {
		if err := src.Acquire(Workload{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	oldA, _ := src.SVID(a)
	oldB, _ := src.SVID(b)
	configs := NewConfigs(src, nil)
	p := connect(t, configs.Client(a), configs.Server(b))
	p.echo(t, "before rotation")

	clock.Advance(ttl / 2)
	src.rotateDue()
	newA, _ := src.SVID(a)
	newB, _ := src.SVID(b)
	if newA == oldA || newB == oldB {
		t.Fatal("SVIDs not rotated")
	}
	p.echo(t, "after rotation")

	// Fresh configs, so that the handshake is a full one and not resumed with the old certificates.
	fresh := NewConfigs(src, nil)
	cli, srv := handshake(t, fresh.Client(a), fresh.Server(b))
	if cli.err != nil || srv.err != nil {
		t.Fatalf("handshake after rotation: client %v, server %v", cli.err, srv.err)
	}
	if !cli.state.PeerCertificates[0].Equal(newB.Certificates[0]) || !srv.state.PeerCertificates[0].Equal(newA.Certificates[0]) {
		t.Error("a handshake after rotation presented an old certificate")
	}
}

func TestRefusals(t *testing.T) {
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	src := newTestSource(t, a, b)
	configs := NewConfigs(src, tlsconfig.AuthorizeMemberOf(testTD))
	goodA, err := src.SVID(a)
	if err != nil {
		t.Fatal(err)
	}

	otherTD := spiffeid.RequireTrustDomainFromString("other.test")
	foreignID := mustID(t, otherTD, "demo", "a")
	foreign, err := src.ca.mint(foreignID, time.Now(), time.Hour) // our CA, wrong trust domain
	if err != nil {
		t.Fatal(err)
	}
	strangerSrc := newTestSource(t, a, b) // same trust domain, another CA
	stranger, _ := strangerSrc.SVID(a)
	expired, err := src.ca.mint(a, time.Now().Add(-3*time.Hour), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// Valid from an hour from now (minus the minute of clock skew that minting allows).
	notYetValid, err := src.ca.mint(a, time.Now().Add(time.Hour), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	twoURIs := []*url.URL{a.URL(), b.URL()}

	// rawClient presents whatever it is given, without any checks of its own.
	rawClient := func(certs ...tls.Certificate) *tls.Config {
		return &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, InsecureSkipVerify: true, Certificates: certs}
	}
	noALPN := rawClient(tlsCert(goodA))
	noALPN.NextProtos = nil

	// A server whose source trusts other.test as well, so that only the authorizer stands in the
	// way of the foreign ID.
	bothTDs := &staticSource{
		svids:   map[spiffeid.ID]*x509svid.SVID{b: mustSVID(t, src, b)},
		bundles: x509bundle.NewSet(x509bundle.FromX509Authorities(testTD, src.ca.Authorities()), x509bundle.FromX509Authorities(otherTD, src.ca.Authorities())),
	}
	lenient := NewConfigs(bothTDs, tlsconfig.AuthorizeMemberOf(testTD))

	for _, tc := range []struct {
		name    string
		client  *tls.Config
		server  *tls.Config
		wantErr string
	}{
		{"foreign trust domain without bundle", rawClient(tlsCert(foreign)), configs.Server(b), `no trust bundle for trust domain "other.test"`},
		{"foreign trust domain not authorized", rawClient(tlsCert(foreign)), lenient.Server(b), "peer spiffe://other.test/ns/demo/sa/a not authorized"},
		{"no client certificate", rawClient(), configs.Server(b), "client didn't provide a certificate"},
		{"not chained to the bundle", rawClient(tlsCert(stranger)), configs.Server(b), "certificate signed by unknown authority"},
		// crypto/x509 says "certificate has expired or is not yet valid: current time T is after
		// (or before) NotAfter (NotBefore)"; the word between the times tells the two cases apart.
		{"expired", rawClient(tlsCert(expired)), configs.Server(b), "is after"},
		{"not yet valid", rawClient(tlsCert(notYetValid)), configs.Server(b), "is before"},
		{"no SPIFFE ID", rawClient(craftLeaf(t, src.ca, nil)), configs.Server(b), "certificate contains no URI SAN"},
		{"two SPIFFE IDs", rawClient(craftLeaf(t, src.ca, twoURIs)), configs.Server(b), "more than one URI SAN"},
		{"no ALPN", noALPN, configs.Server(b), `peer did not negotiate ALPN "meshless/1"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli, srv := handshake(t, tc.client, tc.server)
			if srv.err == nil || !strings.Contains(srv.err.Error(), tc.wantErr) {
				t.Errorf("server error %v, want %q", srv.err, tc.wantErr)
			}
			if cli.err == nil {
				t.Error("the client's connection survived the refusal")
			}
		})
	}

	// The client side refuses bad servers the same way.
	rawServer := func(cert tls.Certificate) *tls.Config {
		return &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, ClientAuth: tls.RequireAnyClientCert, Certificates: []tls.Certificate{cert}}
	}
	plainServer := rawServer(tlsCert(mustSVID(t, src, b)))
	plainServer.NextProtos = nil
	for _, tc := range []struct {
		name    string
		server  *tls.Config
		wantErr string
	}{
		{"server not chained to the bundle", rawServer(tlsCert(mustSVID(t, strangerSrc, b))), "certificate signed by unknown authority"},
		{"server of a foreign trust domain", rawServer(tlsCert(foreign)), `no trust bundle for trust domain "other.test"`},
		{"server without SPIFFE ID", rawServer(craftLeaf(t, src.ca, nil)), "certificate contains no URI SAN"},
		{"expired server", rawServer(tlsCert(expired)), "is after"},
		{"server not yet valid", rawServer(tlsCert(notYetValid)), "is before"},
		{"server without ALPN", plainServer, `peer did not negotiate ALPN "meshless/1" (got "")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli, _ := handshake(t, configs.Client(a), tc.server)
			if cli.err == nil || !strings.Contains(cli.err.Error(), tc.wantErr) {
				t.Errorf("client error %v, want %q", cli.err, tc.wantErr)
			}
		})
	}

	t.Run("identity not acquired", func(t *testing.T) {
		c := mustID(t, testTD, "demo", "unknown")
		cli, _ := handshake(t, configs.Client(c), configs.Server(b))
		if cli.err == nil || !strings.Contains(cli.err.Error(), "not acquired") {
			t.Errorf("client error %v, want 'not acquired'", cli.err)
		}
	})
}

func mustSVID(t *testing.T, src Source, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	svid, err := src.SVID(id)
	if err != nil {
		t.Fatal(err)
	}
	return svid
}

// TestResumedAtExpiry verifies a resumed session whose peer certificate expired while the
// handshake ran as of the certificate's last instant, as crypto/tls decided to resume it while
// it was valid; a full handshake, or a certificate expired longer ago, is refused.
func TestResumedAtExpiry(t *testing.T) {
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	src := newTestSource(t, a, b)
	verify := NewConfigs(src, nil).Server(b).VerifyConnection
	expiredAgo := func(d time.Duration) []*x509.Certificate {
		svid, err := src.ca.mint(a, time.Now().Add(-time.Hour-d), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return svid.Certificates
	}
	for _, tc := range []struct {
		name    string
		resumed bool
		ago     time.Duration
		ok      bool
	}{
		{"resumed, expired during the handshake", true, time.Second, true},
		{"full handshake, just expired", false, time.Second, false},
		{"resumed, expired long ago", true, time.Minute, false},
	} {
		err := verify(tls.ConnectionState{NegotiatedProtocol: ALPN, DidResume: tc.resumed, PeerCertificates: expiredAgo(tc.ago)})
		if tc.ok && err != nil {
			t.Errorf("%s: %v", tc.name, err)
		}
		if !tc.ok && (err == nil || !strings.Contains(err.Error(), "is after")) {
			t.Errorf("%s: error %v, want expired", tc.name, err)
		}
	}
}

// checkingConn is a connection that checks the ClientHello that a server config sees.
type checkingConn struct {
	net.Conn
	seen  []string
	check error
}

func (c *checkingConn) CheckClientHello(hello *tls.ClientHelloInfo) error {
	c.seen = hello.SupportedProtos
	return c.check
}

// A server connection that is a ClientHelloChecker sees the ClientHello, and its refusal ends the
// handshake; accepted, the handshake completes as usual.
func TestServerClientHelloChecker(t *testing.T) {
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	configs := NewConfigs(newTestSource(t, a, b), nil)
	for _, refuse := range []bool{false, true} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		checked := make(chan *checkingConn, 1)
		serverErr := make(chan error, 1)
		go func() {
			conn, err := ln.Accept()
			if err != nil {
				serverErr <- err
				return
			}
			defer conn.Close()
			cc := &checkingConn{Conn: conn}
			if refuse {
				cc.check = errors.New("refused by the connection")
			}
			err = tls.Server(cc, configs.Server(b)).Handshake()
			checked <- cc
			serverErr <- err
		}()
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		clientErr := tls.Client(conn, configs.Client(a)).Handshake()
		cc := <-checked
		if err := <-serverErr; (err != nil) != refuse {
			t.Errorf("refuse %v: server handshake: %v", refuse, err)
		}
		if (clientErr != nil) != refuse {
			t.Errorf("refuse %v: client handshake: %v", refuse, clientErr)
		}
		if !slices.Equal(cc.seen, []string{ALPN}) {
			t.Errorf("refuse %v: the connection saw ALPN %q, want [%s]", refuse, cc.seen, ALPN)
		}
	}
}
