package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	meshtls "github.com/meshless/meshless/pkg/tls"
)

func TestIdentitySourceFlags(t *testing.T) {
	base := []string{"--mesh-cidr", "10.0.0.0/8", "--node-name", "n1"}
	for _, tc := range []struct {
		args    []string
		wantErr string
	}{
		{args: nil},
		{args: []string{"--identity-source", "spire", "--spire-admin-socket", "/run/spire/admin.sock"}},
		{args: []string{"--identity-source", "spire"}, wantErr: "needs --spire-admin-socket"},
		{args: []string{"--spire-admin-socket", "/run/spire/admin.sock"}, wantErr: "only used with --identity-source spire"},
		{args: []string{"--identity-source", "vault"}, wantErr: `--identity-source "vault"`},
	} {
		_, err := parseRunFlags(append(base, tc.args...))
		if tc.wantErr == "" && err != nil {
			t.Errorf("%v: %v", tc.args, err)
		}
		if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("%v: error %v, want one containing %q", tc.args, err, tc.wantErr)
		}
	}
}

// With SPIRE no CA directory is read, and the agent need not be up when the daemon starts.
func TestSPIRESourceNeedsNoCADir(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	missing := filepath.Join(t.TempDir(), "no-ca")
	f, err := parseRunFlags([]string{"--mesh-cidr", "10.0.0.0/8", "--node-name", "n1", "--ca-dir", missing,
		"--identity-source", "spire", "--spire-admin-socket", filepath.Join(t.TempDir(), "admin.sock")})
	if err != nil {
		t.Fatal(err)
	}
	src, err := newIdentitySource(f, td, discard)
	if err != nil {
		t.Fatalf("spire source with no CA dir and no agent: %v", err)
	}
	if _, ok := src.(*meshtls.CASource); ok {
		t.Fatal("--identity-source spire built the CA source")
	}
	if err := src.(spireSource).Close(); err != nil {
		t.Fatal(err)
	}

	f.identity = identityFlags{source: identityBuiltin}
	if _, err := newIdentitySource(f, td, discard); err == nil {
		t.Fatal("the built-in source started without its CA directory")
	}
}
