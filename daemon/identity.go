package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshless/meshless/pkg/agent"
	"github.com/meshless/meshless/pkg/spire"
	meshtls "github.com/meshless/meshless/pkg/tls"
)

// identityFlags are the `meshlessd run` flags choosing where the pods' SVIDs come from.
type identityFlags struct {
	source           string
	spireAdminSocket string
}

const (
	identityBuiltin = "builtin"
	identitySPIRE   = "spire"
)

func (f *identityFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.source, "identity-source", identityBuiltin,
		"where SVIDs come from: builtin (the CA in --ca-dir) or spire (a SPIRE agent's Delegated Identity API; no --ca-dir)")
	fs.StringVar(&f.spireAdminSocket, "spire-admin-socket", "",
		"the SPIRE agent's admin socket (its admin_socket_path), for --identity-source spire")
}

func (f *identityFlags) validate() error {
	switch f.source {
	case identityBuiltin:
		if f.spireAdminSocket != "" {
			return errors.New("--spire-admin-socket is only used with --identity-source spire")
		}
	case identitySPIRE:
		if f.spireAdminSocket == "" {
			return errors.New("--identity-source spire needs --spire-admin-socket")
		}
	default:
		return fmt.Errorf("--identity-source %q: want builtin or spire", f.source)
	}
	return nil
}

// identitySource is what the daemon needs of where its SVIDs come from.
type identitySource interface {
	meshtls.Source
	agent.IdentitySource
	OnBundleChange(f func(previous x509bundle.Source))
	// Run keeps the SVIDs and bundles current until ctx ends.
	Run(ctx context.Context) error
}

// newIdentitySource builds the source the flags name: the built-in CA loaded from --ca-dir, or the
// SPIRE agent, which is not waited for (pods enrolled while it is away fail with the reason).
func newIdentitySource(f *runFlags, td spiffeid.TrustDomain, log *slog.Logger) (identitySource, error) {
	if f.identity.source == identitySPIRE {
		src, err := spire.New(spire.Config{AdminSocket: f.identity.spireAdminSocket, Log: log})
		if err != nil {
			return nil, err
		}
		log.Info("identity source", "identity_source", identitySPIRE, "spire_admin_socket", f.identity.spireAdminSocket)
		return spireSource{src}, nil
	}
	ca, err := meshtls.LoadCA(f.caDir)
	if err != nil {
		return nil, err
	}
	log.Info("identity source", "identity_source", identityBuiltin, "ca_dir", f.caDir)
	return meshtls.NewCASource(ca, td, f.svidTTL, log), nil
}

// spireSource runs a spire.Source, which follows SPIRE from the moment it is made, until the
// daemon stops.
type spireSource struct{ *spire.Source }

func (s spireSource) Run(ctx context.Context) error {
	<-ctx.Done()
	return s.Close()
}
