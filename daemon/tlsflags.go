package main

import (
	"crypto/fips140"
	"errors"
	"flag"
	"fmt"
	"time"

	meshtls "github.com/meshless/meshless/pkg/tls"
)

// tlsFlags are the `meshlessd run` flags about the crypto of the data path and the CA's
// lifecycle: FIPS 140-3, post-quantum key exchange, and how often the CA directory is re-read.
type tlsFlags struct {
	fips             bool
	pq               bool
	caReloadInterval time.Duration
}

func (f *tlsFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.fips, "fips", false, "refuse to start unless Go's FIPS 140-3 mode is active (GODEBUG=fips140=on, or a binary built with GOFIPS140)")
	fs.BoolVar(&f.pq, "pq", true, "offer and accept the post-quantum hybrid key exchange X25519MLKEM768 (first); false: X25519 and P-256 only")
	fs.DurationVar(&f.caReloadInterval, "ca-reload-interval", meshtls.DefaultCAReloadInterval,
		"how often --ca-dir is checked for a changed ca.crt or ca.key (CA roll-over); 0: never")
}

func (f *tlsFlags) validate() error {
	if f.caReloadInterval < 0 {
		return fmt.Errorf("--ca-reload-interval %s: must not be negative", f.caReloadInterval)
	}
	return nil
}

// checkFIPS refuses to go on when --fips is given and the crypto does not run in Go's FIPS 140-3
// mode. The daemon does not re-execute itself with GODEBUG=fips140=on: the operator states the
// mode in the environment or the build, where audits look for it, and --fips checks that it did.
func (f *tlsFlags) checkFIPS() error {
	if f.fips && !fips140.Enabled() {
		return errors.New("--fips: Go's FIPS 140-3 mode is not active: run meshlessd with GODEBUG=fips140=on " +
			"(or fips140=only), or use a binary built with GOFIPS140=v1.0.0")
	}
	return nil
}

// logAttrs describe the crypto settings for the daemon's start-up log line.
func (f *tlsFlags) logAttrs() []any {
	return []any{"fips140", fips140.Enabled(), "fips140_enforced", fips140.Enforced(), "fips140_module", fips140.Version(),
		"post_quantum", f.pq, "ca_reload_interval", f.caReloadInterval.String()}
}
