package meshtls

import (
	"crypto/fips140"
	"crypto/tls"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestPostQuantum negotiates between configs with and without post-quantum key exchange: the
// hybrid group when both offer it, a classical one as soon as one side turned it off, so that
// nodes of both settings interoperate.
func TestPostQuantum(t *testing.T) {
	a, b := mustID(t, testTD, "demo", "a"), mustID(t, testTD, "demo", "b")
	src := newTestSource(t, a, b)
	pq, classical := NewConfigs(src, nil), NewConfigs(src, nil, PostQuantum(false))
	// X25519 is not approved in FIPS 140-3 mode, which leaves P-256.
	wantClassical := tls.X25519
	if fips140.Enabled() {
		wantClassical = tls.CurveP256
	}
	if cfg := classical.Server(b); !slices.Equal(cfg.CurvePreferences, []tls.CurveID{tls.X25519, tls.CurveP256}) {
		t.Errorf("classical curve preferences %v", cfg.CurvePreferences)
	}
	for _, tc := range []struct {
		name           string
		client, server *Configs
		want           tls.CurveID
	}{
		{"both post-quantum", pq, pq, tls.X25519MLKEM768},
		{"classical client", classical, pq, wantClassical},
		{"classical server", pq, classical, wantClassical},
		{"both classical", classical, classical, wantClassical},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli, srv := handshake(t, tc.client.Client(a), tc.server.Server(b))
			if cli.err != nil || srv.err != nil {
				t.Fatalf("handshake: client %v, server %v", cli.err, srv.err)
			}
			if cli.state.CurveID != tc.want || srv.state.CurveID != tc.want {
				t.Errorf("key exchange: client %v, server %v; want %v", cli.state.CurveID, srv.state.CurveID, tc.want)
			}
		})
	}
}

// TestFIPS runs the handshake, refusal, rotation and key exchange tests again in a child
// process in Go's FIPS 140-3 mode, in its strict form (fips140=only, where non-approved
// algorithms fail), to show that everything meshless does with crypto is approved.
func TestFIPS(t *testing.T) {
	if fips140.Enabled() {
		t.Logf("FIPS 140-3 mode: enforced %v, module %s", fips140.Enforced(), fips140.Version())
		return
	}
	if testing.Short() {
		t.Skip("runs the package's tests again")
	}
	cmd := exec.Command(os.Args[0], "-test.count=1", "-test.v",
		"-test.run=^(TestFIPS|TestMutualTLS|TestPostQuantum|TestRefusals|TestRotationKeepsConnections|TestResetAfterRollOver|TestMint)$")
	cmd.Env = append(withoutEnv(os.Environ(), "GODEBUG"), "GODEBUG=fips140=only")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("tests in FIPS 140-3 mode: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "FIPS 140-3 mode: enforced true") {
		t.Errorf("the child did not run in enforced FIPS 140-3 mode:\n%s", out)
	}
	for _, name := range []string{"TestFIPS", "TestMutualTLS", "TestPostQuantum", "TestRefusals", "TestRotationKeepsConnections", "TestResetAfterRollOver", "TestMint"} {
		if !strings.Contains(string(out), "--- PASS: "+name+" ") {
			t.Errorf("%s did not pass in FIPS 140-3 mode:\n%s", name, out)
		}
	}
}

// withoutEnv returns env without the variable key.
func withoutEnv(env []string, key string) []string {
	return slices.DeleteFunc(slices.Clone(env), func(kv string) bool { return strings.HasPrefix(kv, key+"=") })
}
