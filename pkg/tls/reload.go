package meshtls

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
)

// DefaultCAReloadInterval is how often WatchCADir looks at the CA directory when none is given.
const DefaultCAReloadInterval = 5 * time.Second

// OnBundleChange registers f to be called whenever SetCA changes the trust bundle, before the new
// bundle is used, with the bundle that was in force until then (see Configs.Reset). Register
// listeners before the source is in use.
func (s *CASource) OnBundleChange(f func(previous x509bundle.Source)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listeners = append(s.listeners, f)
}

// SetCA replaces the source's CA: every certificate of ca becomes the trust bundle, and ca's key
// signs from now on. When the bundle changes, the listeners run first; when the signing CA
// changes, every held SVID is due for renewal at once, so that Run re-mints it promptly.
func (s *CASource) SetCA(ca *CA) {
	s.setMu.Lock()
	defer s.setMu.Unlock()

	s.mu.Lock()
	old, previous := s.ca, s.bundle
	listeners := slices.Clone(s.listeners)
	s.mu.Unlock()
	bundleChanged := !sameCertificates(old.roots, ca.roots)
	signerChanged := !old.cert.Equal(ca.cert)

	// The listeners see the change before the new bundle is used: a handshake that started with
	// the old bundle's cached sessions can then still be verified against the old bundle.
	if bundleChanged {
		for _, f := range listeners {
			f(previous)
		}
	}
	s.mu.Lock()
	s.ca = ca
	if bundleChanged {
		s.bundle = x509bundle.FromX509Authorities(s.td, ca.Authorities())
	}
	held := len(s.held)
	if signerChanged {
		now := s.now()
		for _, h := range s.held {
			h.renewAt = now
		}
	}
	s.mu.Unlock()

	if bundleChanged {
		serials, subjects := describe(ca.roots)
		s.log.Info("trust bundle reloaded", "trust_domain", s.td.Name(), "authorities", len(ca.roots),
			"ca_serials", serials, "ca_subjects", subjects)
	}
	if signerChanged {
		s.log.Info("signing CA changed", "old_serial", old.cert.SerialNumber.Text(16), "new_serial", ca.cert.SerialNumber.Text(16),
			"subject", ca.cert.Subject.String(), "svids_to_remint", held)
		s.nudge()
	}
	if !bundleChanged && !signerChanged {
		s.log.Debug("CA directory rewritten without a change of certificates or key")
	}
}

// WatchCADir looks at dir every interval (DefaultCAReloadInterval if not positive) until ctx
// ends, then returns nil. When the contents of ca.crt or ca.key change, it loads them and hands
// the CA to SetCA. A CA that cannot be read or is invalid (a half-written file, a key matching
// no certificate) is logged and ignored: the CA in use stays, and the directory is tried again
// when its contents change once more. Replace the files atomically (write, then rename) so that
// a half-written state is never seen; Kubernetes Secret volumes are updated that way.
func (s *CASource) WatchCADir(ctx context.Context, dir string, interval time.Duration) error {
	if interval <= 0 {
		interval = DefaultCAReloadInterval
	}
	s.mu.Lock()
	seen := s.ca.digest
	s.mu.Unlock()
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		}
		seen = s.reloadCADir(dir, seen)
	}
}

// reloadCADir loads dir if its contents differ from seen, the digest of what was last looked at,
// and returns the digest of what it found. A failure is logged once per distinct state of the
// directory, not at every poll.
func (s *CASource) reloadCADir(dir string, seen [sha256.Size]byte) [sha256.Size]byte {
	certPEM, keyPEM, err := readCADir(dir)
	if err != nil {
		digest := sha256.Sum256([]byte("error: " + err.Error()))
		if digest != seen {
			s.log.Error("CA reload failed; keeping the CA in use", "ca_dir", dir, "reason", err.Error())
		}
		return digest
	}
	digest := caDigest(certPEM, keyPEM)
	if digest == seen {
		return seen
	}
	ca, err := parseCA(dir, certPEM, keyPEM)
	if err != nil {
		s.log.Error("CA reload failed; keeping the CA in use", "ca_dir", dir, "reason", err.Error())
		return digest
	}
	s.SetCA(ca)
	return digest
}

func sameCertificates(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

func describe(certs []*x509.Certificate) (serials, subjects []string) {
	for _, c := range certs {
		serials = append(serials, c.SerialNumber.Text(16))
		subjects = append(subjects, c.Subject.String())
	}
	return serials, subjects
}
