// Package tunnel is meshless's data path: for each enrolled pod it listens on the
// capture ports inside the pod's network namespace and carries every redirected
// TCP connection to its original destination, over mutual TLS between the two
// pods' SPIFFE identities when the destination is in the mesh.
//
// Outbound (15001): accept the app's connection, read its original destination,
// dial that same address from the pod's netns, handshake as the source pod, copy.
// Inbound (15006): accept, peek at the first bytes; a ClientHello offering
// meshless/1 is terminated as the destination pod, the client's SVID verified,
// and the bytes go to the app on the original port from the client's own IP.
package tunnel

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	meshtls "github.com/meshless/meshless/pkg/tls"
)

// Mode says what the inbound side does with plaintext from outside the mesh.
type Mode string

const (
	// Strict refuses (resets) inbound connections that are not meshless mTLS.
	Strict Mode = "strict"
	// Permissive forwards plaintext inbound connections to the app and counts them.
	Permissive Mode = "permissive"
)

// ParseMode returns the Mode named by s.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case Strict, Permissive:
		return Mode(s), nil
	}
	return "", fmt.Errorf("mode %q: want %q or %q", s, Strict, Permissive)
}

// Config is what the data path needs; it is shared by every pod of the node.
type Config struct {
	// TLS holds one long-lived tls.Config per identity and role.
	TLS *meshtls.Configs
	// Mesh lists the destinations that answer meshless/1 (pod and service CIDRs).
	Mesh []netip.Prefix
	// Mode is the inbound policy for plaintext.
	Mode Mode
	// StrictEgress refuses outbound connections to destinations outside Mesh
	// instead of passing them through in plaintext.
	StrictEgress bool
	// PeekTimeout bounds the wait for an inbound client's first bytes.
	PeekTimeout time.Duration
	// HandshakeTimeout bounds each TLS handshake.
	HandshakeTimeout time.Duration
	// DialTimeout bounds each upstream connect.
	DialTimeout time.Duration
	// Log receives one line per connection and the listeners' errors.
	Log *slog.Logger
}

// Timeouts used when Config leaves them zero.
const (
	DefaultPeekTimeout      = 5 * time.Second
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 10 * time.Second
)

func (c *Config) setDefaults() error {
	if c.TLS == nil {
		return errors.New("tunnel config: no TLS configs")
	}
	if c.Mode == "" {
		c.Mode = Strict
	}
	if _, err := ParseMode(string(c.Mode)); err != nil {
		return fmt.Errorf("tunnel config: %w", err)
	}
	if c.PeekTimeout <= 0 {
		c.PeekTimeout = DefaultPeekTimeout
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	return nil
}

func (c *Config) inMesh(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range c.Mesh {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
