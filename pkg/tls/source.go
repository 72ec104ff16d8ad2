package meshtls

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// DefaultSVIDTTL is the lifetime of a minted SVID when none is given.
const DefaultSVIDTTL = 24 * time.Hour

// retryInterval is how long Run waits before trying again a re-mint that failed; the old SVID
// stays in use meanwhile.
const retryInterval = 30 * time.Second

// Source hands out SVIDs and trust bundles; implemented by the built-in CA now, SPIRE later. A
// bundle that changes is replaced by a new *x509bundle.Bundle, never changed in place, and an SVID
// likewise: Configs remembers verified peer chains per bundle and certificates per SVID.
type Source interface {
	x509bundle.Source
	// SVID returns the current SVID of id.
	SVID(id spiffeid.ID) (*x509svid.SVID, error)
}

// CASource is the Source of the built-in CA. It mints an SVID per acquired identity, keeps it in
// memory only, and Run re-mints it at half its life. SetCA (or WatchCADir) replaces the CA while
// it runs.
type CASource struct {
	td  spiffeid.TrustDomain
	ttl time.Duration
	log *slog.Logger
	// now is the clock; tests move it forward to make rotation due without waiting.
	now func() time.Time
	// wake tells Run that the held SVIDs changed and its timer may be stale.
	wake chan struct{}

	// setMu orders SetCA calls, so that change listeners and the swap they precede stay paired.
	setMu sync.Mutex

	mu        sync.Mutex
	ca        *CA
	bundle    *x509bundle.Bundle
	held      map[spiffeid.ID]*heldSVID
	listeners []func(previous x509bundle.Source)
}

type heldSVID struct {
	refs int
	minted
}

// minted is an SVID with the CA certificate that signed it and the time to renew it.
type minted struct {
	svid    *x509svid.SVID
	issuer  *x509.Certificate
	renewAt time.Time
}

// NewCASource returns a CASource minting SVIDs of trust domain td valid for ttl (DefaultSVIDTTL
// when ttl is not positive). A nil log discards log lines.
func NewCASource(ca *CA, td spiffeid.TrustDomain, ttl time.Duration, log *slog.Logger) *CASource {
	if ttl <= 0 {
		ttl = DefaultSVIDTTL
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &CASource{
		ca:     ca,
		td:     td,
		ttl:    ttl,
		log:    log,
		bundle: x509bundle.FromX509Authorities(td, ca.Authorities()),
		now:    time.Now,
		wake:   make(chan struct{}, 1),
		held:   make(map[spiffeid.ID]*heldSVID),
	}
}

// Workload is a pod as identity sources see it: the SPIFFE ID it gets, and the Kubernetes
// attributes that a source such as SPIRE selects its SVID by.
type Workload struct {
	ID             spiffeid.ID
	Namespace      string
	ServiceAccount string
	PodName        string
	PodUID         string
}

// Acquire makes sure an SVID for w's ID is held, minting one if needed. Calls are counted: pods
// sharing a service account share the SVID, which is dropped after as many Release calls.
func (s *CASource) Acquire(w Workload) error {
	id := w.ID
	if !id.MemberOf(s.td) {
		return fmt.Errorf("acquire SVID for %s: not in trust domain %q of this CA", id, s.td.Name())
	}
	s.mu.Lock()
	if h, ok := s.held[id]; ok {
		h.refs++
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()

	// Minted without the lock so handshakes asking for other SVIDs never wait on key generation.
	m, err := s.mint(id)
	if err != nil {
		return fmt.Errorf("acquire SVID: %w", err)
	}
	s.mu.Lock()
	if h, ok := s.held[id]; ok {
		// A concurrent Acquire won the race; use its SVID.
		h.refs++
		s.mu.Unlock()
		return nil
	}
	s.held[id] = &heldSVID{refs: 1, minted: s.staleCheckLocked(m)}
	s.mu.Unlock()

	s.log.Info("svid minted", m.logAttrs(id)...)
	s.nudge()
	return nil
}

// Release undoes one Acquire; the SVID is forgotten when the last user is gone.
func (s *CASource) Release(id spiffeid.ID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h, ok := s.held[id]
	if !ok {
		return
	}
	h.refs--
	if h.refs <= 0 {
		delete(s.held, id)
		s.log.Debug("svid dropped", "spiffe_id", id.String())
	}
}

// SVID returns the current SVID of id, which must be held (see Acquire).
func (s *CASource) SVID(id spiffeid.ID) (*x509svid.SVID, error) {
	s.mu.Lock()
	var svid *x509svid.SVID
	if h, ok := s.held[id]; ok {
		svid = h.svid
	}
	s.mu.Unlock()
	if svid == nil {
		return nil, fmt.Errorf("no SVID for %s: identity not acquired on this node", id)
	}
	// Refusing locally gives a clearer reason than letting the peer reject an expired certificate.
	if exp := svid.Certificates[0].NotAfter; !s.now().Before(exp) {
		return nil, fmt.Errorf("SVID for %s expired at %s and could not be re-minted", id, exp.UTC().Format(time.RFC3339))
	}
	return svid, nil
}

// GetX509BundleForTrustDomain returns the CA certificates as the bundle of the source's trust
// domain; other trust domains have none. It implements x509bundle.Source.
func (s *CASource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != s.td {
		return nil, fmt.Errorf("no trust bundle for trust domain %q (this node trusts %q)", td.Name(), s.td.Name())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bundle, nil
}

// Run re-mints each held SVID at half its life until ctx is done; then it returns nil. A failed
// re-mint is logged and retried while the current SVID stays in use. One timer serves every
// identity. Call it once per CASource.
func (s *CASource) Run(ctx context.Context) error {
	// Created stopped; each turn arms it for the next renewal.
	timer := time.NewTimer(0)
	timer.Stop()
	defer timer.Stop()
	for {
		var due <-chan time.Time
		if next, ok := s.rotateDue(); ok {
			timer.Reset(next.Sub(s.now()))
			due = timer.C
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.wake:
		case <-due:
		}
	}
}

// rotateDue re-mints the SVIDs whose renewal time has come and returns the next renewal time, if
// any SVID is held.
func (s *CASource) rotateDue() (time.Time, bool) {
	now := s.now()
	s.mu.Lock()
	type dueSVID struct {
		id spiffeid.ID
		h  *heldSVID
	}
	var due []dueSVID
	for id, h := range s.held {
		if !h.renewAt.After(now) {
			due = append(due, dueSVID{id, h})
		}
	}
	s.mu.Unlock()

	for _, d := range due {
		m, err := s.mint(d.id)
		s.mu.Lock()
		// Skip identities released (or released and acquired again) while minting.
		current := s.held[d.id] == d.h
		oldExpires := d.h.svid.Certificates[0].NotAfter
		if current {
			if err == nil {
				d.h.minted = s.staleCheckLocked(m)
			} else {
				d.h.renewAt = now.Add(retryInterval)
			}
		}
		s.mu.Unlock()
		switch {
		case !current:
		case err != nil:
			s.log.Error("svid rotation failed", "spiffe_id", d.id.String(), "reason", err.Error(),
				"expires", oldExpires, "retry_in", retryInterval)
		default:
			s.log.Info("svid rotated", m.logAttrs(d.id)...)
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	var next time.Time
	for _, h := range s.held {
		if next.IsZero() || h.renewAt.Before(next) {
			next = h.renewAt
		}
	}
	return next, !next.IsZero()
}

// mint issues a new SVID for id with the current CA and says when to renew it: at half its
// actual lifetime, which the CA's expiry may have shortened.
func (s *CASource) mint(id spiffeid.ID) (minted, error) {
	now := s.now()
	s.mu.Lock()
	ca := s.ca
	s.mu.Unlock()
	svid, err := ca.mint(id, now, s.ttl)
	if err != nil {
		return minted{}, err
	}
	life := svid.Certificates[0].NotAfter.Sub(now)
	return minted{svid: svid, issuer: ca.cert, renewAt: now.Add(life / 2)}, nil
}

// staleCheckLocked makes m due at once if SetCA replaced the signing CA while m was minted, so
// that no SVID of a replaced CA is kept for half a life.
func (s *CASource) staleCheckLocked(m minted) minted {
	if !m.issuer.Equal(s.ca.cert) {
		m.renewAt = s.now()
		s.nudge()
	}
	return m
}

func (m minted) logAttrs(id spiffeid.ID) []any {
	return []any{"spiffe_id", id.String(), "serial", serialHex(m.svid), "ca_serial", m.issuer.SerialNumber.Text(16),
		"expires", m.svid.Certificates[0].NotAfter}
}

func (s *CASource) nudge() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func serialHex(svid *x509svid.SVID) string {
	return svid.Certificates[0].SerialNumber.Text(16)
}
