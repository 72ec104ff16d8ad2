// Package spire is an identity source backed by a SPIRE agent. Through the agent's Delegated
// Identity API (its admin socket) it subscribes to the X.509-SVIDs of each enrolled pod's
// identity and to the X.509 bundles of every trust domain the agent knows, follows SPIRE's
// rotations, and reconnects with backoff when the agent goes away, using the SVIDs it holds until
// they expire.
//
// Pods are selected as SPIRE's Kubernetes workload attestor would select them: k8s:ns:<namespace>,
// k8s:sa:<service account> and, when the CNI args carry it, k8s:pod-uid:<uid>. SPIRE matches an
// entry when all of its selectors are among those given, so entries selecting by k8s:ns and
// k8s:sa (the usual form, and the one meshless's ID ns/<ns>/sa/<sa> follows) match every pod of
// the service account. Entries that also need selectors meshless cannot know (container name,
// image, labels, node name) do not match. A subscription is shared by the pods of one identity and
// keeps the selectors of the pod that opened it.
package spire

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	meshtls "github.com/meshless/meshless/pkg/tls"
)

const (
	// DefaultAcquireTimeout bounds the wait for a new identity's first SVID. It is below the CNI
	// plugin's 10s request timeout so that a pod's ADD fails with this source's reason.
	DefaultAcquireTimeout = 5 * time.Second
	// DefaultMaxBackoff caps the wait between reconnections to the agent.
	DefaultMaxBackoff = 5 * time.Second
	// minBackoff is the first wait after a stream is lost; it doubles up to the cap.
	minBackoff = 200 * time.Millisecond
)

// Config is what a Source is built from.
type Config struct {
	// AdminSocket is the path of the SPIRE agent's admin socket (its admin_socket_path). The
	// agent authorizes the caller by the SPIFFE ID its workload attestors give this process,
	// which must be listed in the agent's authorized_delegates.
	AdminSocket string
	// AcquireTimeout bounds how long Acquire waits for a new identity's first SVID
	// (DefaultAcquireTimeout when not positive).
	AcquireTimeout time.Duration
	// MaxBackoff caps the wait between reconnection attempts (DefaultMaxBackoff when not positive).
	MaxBackoff time.Duration
	// Log receives the source's log lines; nil discards them.
	Log *slog.Logger
}

// Source holds SPIRE-issued SVIDs for the identities of enrolled pods and the trust bundles SPIRE
// distributes. It implements meshtls.Source and agent.IdentitySource.
type Source struct {
	cfg    Config
	log    *slog.Logger
	client *agentClient

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu sync.Mutex
	// now is the clock SVID expiry is judged by; read under mu, so that tests can move it.
	now       func() time.Time
	subs      map[spiffeid.ID]*subscription
	bundles   map[spiffeid.TrustDomain]*x509bundle.Bundle
	bundleRaw map[spiffeid.TrustDomain][]byte
	// bundleErr is why there are no bundles yet or the bundle stream is down.
	bundleErr error
	// agentAway is set while the bundle stream, which runs as long as the source, fails: the
	// agent is unreachable or refuses this delegate.
	agentAway bool
	listeners []func(previous x509bundle.Source)
	// changed is closed and replaced whenever an SVID, a bundle or an error changes, waking
	// the Acquire calls that wait.
	changed chan struct{}
}

// subscription is the SVID stream of one identity, shared by the pods that use it.
type subscription struct {
	refs   int
	w      meshtls.Workload
	cancel context.CancelFunc
	svid   *x509svid.SVID
	// err is why the subscription has no usable SVID or its stream is down.
	err error
}

// New returns a Source talking to the agent at cfg.AdminSocket and starts following the trust
// bundles. It does not wait for the agent: the connection is made, and remade, in the background.
// Call Close to stop.
func New(cfg Config) (*Source, error) {
	if cfg.AdminSocket == "" {
		return nil, errors.New("spire: the agent's admin socket path is required")
	}
	path, err := filepath.Abs(cfg.AdminSocket)
	if err != nil {
		return nil, fmt.Errorf("spire: admin socket %q: %w", cfg.AdminSocket, err)
	}
	cfg.AdminSocket = path
	if cfg.AcquireTimeout <= 0 {
		cfg.AcquireTimeout = DefaultAcquireTimeout
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	// The admin socket is local and the agent authorizes the caller by its process, so there is
	// no transport security to add.
	s := &Source{
		cfg:       cfg,
		log:       log.With("socket", path),
		client:    newAgentClient(path),
		now:       time.Now,
		ctx:       ctx,
		cancel:    cancel,
		subs:      make(map[spiffeid.ID]*subscription),
		bundles:   make(map[spiffeid.TrustDomain]*x509bundle.Bundle),
		bundleRaw: make(map[spiffeid.TrustDomain][]byte),
		bundleErr: errors.New("no bundle received from the SPIRE agent yet"),
		changed:   make(chan struct{}),
	}
	s.wg.Add(1)
	go s.follow(ctx, "bundles", "", s.streamBundles, s.setBundleErr)
	return s, nil
}

// Close ends every subscription and the connection to the agent.
func (s *Source) Close() error {
	s.cancel()
	s.wg.Wait()
	s.client.close()
	return nil
}

// Acquire makes sure an SVID for w's ID is held, subscribing to it (or joining the subscription
// of another pod of the same identity, whose SVID is used as long as it is valid). It waits at
// most the configured AcquireTimeout for SPIRE to deliver an SVID with exactly that ID and the
// bundle of its trust domain, and fails with the reason otherwise: no registration entry matching
// the pod's selectors, or, at once, the agent unreachable or refusing this delegate.
func (s *Source) Acquire(w meshtls.Workload) error {
	if w.Namespace == "" || w.ServiceAccount == "" {
		return fmt.Errorf("acquire SVID for %s from SPIRE: the pod's namespace and service account are needed to select it", w.ID)
	}
	s.mu.Lock()
	sub, ok := s.subs[w.ID]
	if ok {
		sub.refs++
	} else {
		ctx, cancel := context.WithCancel(s.ctx)
		sub = &subscription{refs: 1, w: w, cancel: cancel, err: errors.New("no answer from the SPIRE agent yet")}
		s.subs[w.ID] = sub
		s.wg.Add(1)
		go s.follow(ctx, "svids", w.ID.String(),
			func(ctx context.Context, delivered func()) error { return s.streamSVIDs(ctx, sub, delivered) },
			func(err error) { s.setSubErr(sub, err) })
	}
	s.mu.Unlock()

	if err := s.waitUsable(sub); err != nil {
		s.Release(w.ID)
		return fmt.Errorf("acquire SVID for %s from the SPIRE agent at %s (selectors %s): %w",
			w.ID, s.cfg.AdminSocket, selectorString(selectors(sub.w)), err)
	}
	return nil
}

// waitUsable waits until sub holds an unexpired SVID and its trust domain's bundle is known. It
// gives up at once while the agent is known to be away (its bundle stream is failing): the
// agent's enrollment lock is held during Acquire, and every pod enrolled or re-attached then
// would otherwise wait out the whole bound.
func (s *Source) waitUsable(sub *subscription) error {
	timer := time.NewTimer(s.cfg.AcquireTimeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		reason := s.unusableLocked(sub)
		held := sub.svid != nil
		agentAway := s.agentAway
		bundleErr := s.bundleErr
		changed := s.changed
		s.mu.Unlock()
		switch {
		case reason == nil:
			return nil
		case agentAway && !held:
			return fmt.Errorf("SPIRE agent unavailable: %w", bundleErr)
		case agentAway:
			return fmt.Errorf("%w; SPIRE agent unavailable: %w", reason, bundleErr)
		}
		select {
		case <-changed:
		case <-timer.C:
			return fmt.Errorf("no usable SVID within %s: %w", s.cfg.AcquireTimeout, reason)
		case <-s.ctx.Done():
			return errors.New("identity source closed")
		}
	}
}

// unusableLocked says why sub cannot serve handshakes yet, or nil when it can.
func (s *Source) unusableLocked(sub *subscription) error {
	switch {
	case sub.svid == nil:
		return sub.err
	case !s.now().Before(sub.svid.Certificates[0].NotAfter):
		return fmt.Errorf("held SVID expired at %s and SPIRE has not renewed it: %w",
			sub.svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339), orUnknown(sub.err))
	case s.bundles[sub.w.ID.TrustDomain()] == nil:
		return fmt.Errorf("no X.509 bundle for trust domain %q: %w", sub.w.ID.TrustDomain().Name(), orUnknown(s.bundleErr))
	}
	return nil
}

// Release undoes one Acquire; the subscription ends when the identity's last pod is gone.
func (s *Source) Release(id spiffeid.ID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sub, ok := s.subs[id]
	if !ok {
		return
	}
	sub.refs--
	if sub.refs <= 0 {
		sub.cancel()
		delete(s.subs, id)
		s.log.Debug("spire subscription ended", "spiffe_id", id.String())
	}
}

// SVID returns the current SVID of id, which must be held (see Acquire). An SVID that expired
// while SPIRE could not renew it is refused here, with the reason, rather than by the peer.
func (s *Source) SVID(id spiffeid.ID) (*x509svid.SVID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sub, ok := s.subs[id]
	if !ok {
		return nil, fmt.Errorf("no SVID for %s: identity not acquired on this node", id)
	}
	if sub.svid == nil {
		return nil, fmt.Errorf("no SVID for %s from SPIRE: %w", id, orUnknown(sub.err))
	}
	if exp := sub.svid.Certificates[0].NotAfter; !s.now().Before(exp) {
		return nil, fmt.Errorf("SVID for %s expired at %s and SPIRE has not renewed it: %w",
			id, exp.UTC().Format(time.RFC3339), orUnknown(sub.err))
	}
	return sub.svid, nil
}

// GetX509BundleForTrustDomain returns the X.509 authorities SPIRE distributes for td: the
// agent's own trust domain and those it federates with. It implements x509bundle.Source.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.bundles[td]; ok {
		return b, nil
	}
	return nil, fmt.Errorf("no trust bundle for trust domain %q from SPIRE", td.Name())
}

// follow runs stream until ctx ends, starting it again with exponential backoff whenever it
// ends; a stream that delivered something resets the backoff. setErr records why it ended. The
// first failure in a row is a warning and the next ones, while the agent stays away, are debug
// lines; the first delivery after failures says the stream is back.
func (s *Source) follow(ctx context.Context, stream, id string, run func(ctx context.Context, delivered func()) error, setErr func(error)) {
	defer s.wg.Done()
	attrs := []any{"stream", stream}
	if id != "" {
		attrs = append(attrs, "spiffe_id", id)
	}
	// Clipped so that the appends below never share a backing array.
	attrs = slices.Clip(attrs)
	wait := minBackoff
	failures := 0
	var lostAt time.Time
	delivered := func() {
		if failures > 0 {
			s.log.Info("spire stream restored", append(attrs, "failures", failures, "down_for", time.Since(lostAt).Round(time.Millisecond).String())...)
		}
		failures = 0
		wait = minBackoff
	}
	for {
		err := run(ctx, delivered)
		if ctx.Err() != nil {
			return
		}
		setErr(err)
		failures++
		// Jitter keeps the streams of many identities from reconnecting in lockstep.
		d := wait - time.Duration(rand.Int64N(int64(wait)/5+1))
		level := slog.LevelDebug
		if failures == 1 {
			level, lostAt = slog.LevelWarn, time.Now()
		}
		s.log.Log(ctx, level, "spire stream lost", append(attrs, "reason", err.Error(), "retry_in", d.String())...)
		select {
		case <-ctx.Done():
			return
		case <-time.After(d):
		}
		wait = min(2*wait, s.cfg.MaxBackoff)
	}
}

// streamSVIDs subscribes to the SVIDs SPIRE issues for sub's selectors and records each update
// until the stream ends, calling delivered at each.
func (s *Source) streamSVIDs(ctx context.Context, sub *subscription, delivered func()) error {
	stream, err := s.client.subscribe(ctx, methodSubscribeToX509SVIDs, marshalSVIDsRequest(selectors(sub.w)))
	if err != nil {
		return fmt.Errorf("subscribe to X.509-SVIDs: %w", err)
	}
	defer stream.close()
	for {
		msg, err := stream.recv()
		if err != nil {
			return streamEnd("X.509-SVID", err)
		}
		svids, err := unmarshalSVIDsResponse(msg)
		if err != nil {
			return err
		}
		delivered()
		s.updateSVID(sub, svids)
	}
}

// updateSVID takes the SVID with sub's ID from an update. The other SVIDs of the update (entries
// with other IDs whose selectors also match) are ignored. An update without sub's ID (no
// matching entry, or one removed) keeps the held SVID until it expires: the SPIRE agent may
// answer so while it has not synced its entries from the server yet.
func (s *Source) updateSVID(sub *subscription, got []x509SVIDWithKey) {
	id := sub.w.ID
	var found *x509SVIDWithKey
	var offered []string
	for i, x := range got {
		offered = append(offered, x.id)
		if x.id == id.String() {
			found = &got[i]
		}
	}
	if found == nil {
		err := fmt.Errorf("SPIRE has no registration entry with this ID whose selectors match (IDs offered: %s)", listOrNone(offered))
		s.setSubErr(sub, err)
		s.log.Warn("spire svid not issued", "spiffe_id", id.String(), "reason", err.Error())
		return
	}
	svid, err := x509svid.ParseRaw(bytes.Join(found.certChain, nil), found.key)
	if err == nil && svid.ID != id {
		err = fmt.Errorf("certificate names %s", svid.ID)
	}
	if err != nil {
		err = fmt.Errorf("SVID from SPIRE is unusable: %w", err)
		s.setSubErr(sub, err)
		s.log.Error("spire svid rejected", "spiffe_id", id.String(), "reason", err.Error())
		return
	}

	s.mu.Lock()
	old := sub.svid
	same := old != nil && bytes.Equal(old.Certificates[0].Raw, svid.Certificates[0].Raw)
	if !same {
		sub.svid = svid
	}
	sub.err = nil
	s.broadcastLocked()
	s.mu.Unlock()

	leaf := svid.Certificates[0]
	switch {
	case same:
		// A reconnected stream sends the SVID already held.
		s.log.Debug("spire svid unchanged", "spiffe_id", id.String(), "serial", leaf.SerialNumber.Text(16))
	case old == nil:
		s.log.Info("svid received", "spiffe_id", id.String(), "serial", leaf.SerialNumber.Text(16), "expires", leaf.NotAfter)
	default:
		s.log.Info("svid rotated", "spiffe_id", id.String(), "serial", leaf.SerialNumber.Text(16), "expires", leaf.NotAfter,
			"previous_serial", old.Certificates[0].SerialNumber.Text(16))
	}
}

// streamBundles subscribes to the X.509 bundles of all trust domains the agent knows and records
// each update until the stream ends, calling delivered at each.
func (s *Source) streamBundles(ctx context.Context, delivered func()) error {
	// SubscribeToX509BundlesRequest has no fields.
	stream, err := s.client.subscribe(ctx, methodSubscribeToX509Bundles, nil)
	if err != nil {
		return fmt.Errorf("subscribe to X.509 bundles: %w", err)
	}
	defer stream.close()
	for {
		msg, err := stream.recv()
		if err != nil {
			return streamEnd("X.509 bundle", err)
		}
		bundles, err := unmarshalBundlesResponse(msg)
		if err != nil {
			return err
		}
		delivered()
		s.updateBundles(bundles)
	}
}

// updateBundles replaces the bundles with those of an update, which holds the full set. A trust
// domain whose certificates do not parse keeps its previous bundle. When the set changes, the
// OnBundleChange listeners run first.
func (s *Source) updateBundles(raw map[string][]byte) {
	// The maps are replaced, never changed in place, so they can be read after unlocking; this
	// goroutine is their only writer.
	s.mu.Lock()
	prev, prevRaw := s.bundles, s.bundleRaw
	s.mu.Unlock()

	bundles := make(map[spiffeid.TrustDomain]*x509bundle.Bundle, len(raw))
	raws := make(map[spiffeid.TrustDomain][]byte, len(raw))
	for key, der := range raw {
		// Keys are trust domain IDs ("spiffe://example.org"), which TrustDomainFromString takes.
		td, err := spiffeid.TrustDomainFromString(key)
		if err == nil {
			var certs []*x509.Certificate
			if certs, err = x509.ParseCertificates(der); err == nil && len(certs) == 0 {
				err = errors.New("no certificates")
			}
			if err == nil {
				bundles[td] = x509bundle.FromX509Authorities(td, certs)
				raws[td] = der
				continue
			}
			if b, ok := prev[td]; ok {
				bundles[td], raws[td] = b, prevRaw[td]
			}
		}
		s.log.Error("spire bundle rejected", "trust_domain", key, "reason", err.Error())
	}
	changed := len(raws) != len(prevRaw)
	for td, der := range raws {
		if !bytes.Equal(der, prevRaw[td]) {
			changed = true
		}
	}
	if changed && len(prev) > 0 {
		previous := x509bundle.NewSet(slices.Collect(maps.Values(prev))...)
		for _, f := range s.bundleListeners() {
			f(previous)
		}
	}

	s.mu.Lock()
	s.bundles, s.bundleRaw, s.bundleErr, s.agentAway = bundles, raws, nil, false
	s.broadcastLocked()
	s.mu.Unlock()

	if changed {
		tds := make([]string, 0, len(bundles))
		authorities := 0
		for td, b := range bundles {
			tds = append(tds, td.Name())
			authorities += len(b.X509Authorities())
		}
		slices.Sort(tds)
		s.log.Info("spire bundles updated", "trust_domains", tds, "authorities", authorities)
	}
}

// OnBundleChange registers f to be called whenever SPIRE changes the trust bundles, before the new
// ones are used, with the bundles in force until then (see meshtls.Configs.Reset).
func (s *Source) OnBundleChange(f func(previous x509bundle.Source)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listeners = append(s.listeners, f)
}

func (s *Source) bundleListeners() []func(x509bundle.Source) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.listeners)
}

func (s *Source) setSubErr(sub *subscription, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sub.err = err
	s.broadcastLocked()
}

func (s *Source) setBundleErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bundleErr, s.agentAway = err, true
	s.broadcastLocked()
}

func (s *Source) broadcastLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// selectors are the SPIRE selectors of a pod, named as SPIRE's k8s workload attestor names them.
func selectors(w meshtls.Workload) []selector {
	sel := []selector{
		{typ: "k8s", value: "ns:" + w.Namespace},
		{typ: "k8s", value: "sa:" + w.ServiceAccount},
	}
	if w.PodUID != "" {
		sel = append(sel, selector{typ: "k8s", value: "pod-uid:" + w.PodUID})
	}
	return sel
}

func selectorString(sel []selector) string {
	parts := make([]string, len(sel))
	for i, x := range sel {
		parts[i] = x.typ + ":" + x.value
	}
	return strings.Join(parts, ",")
}

// streamEnd words why a stream ended; a clean end means the agent closed it (it is stopping).
func streamEnd(what string, err error) error {
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("%s stream closed by the SPIRE agent", what)
	}
	return fmt.Errorf("%s stream: %w", what, err)
}

func orUnknown(err error) error {
	if err == nil {
		return errors.New("reason unknown")
	}
	return err
}

func listOrNone(ids []string) string {
	if len(ids) == 0 {
		return "none"
	}
	return strings.Join(ids, ", ")
}
