package enroll

import (
	"os"
	"path/filepath"
	"testing"
)

func TestBackendHint(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "cni.sock")
	if got := BackendHint(socket); got != "" {
		t.Errorf("BackendHint before publishing = %q, want \"\"", got)
	}
	for _, b := range []string{"nft", "legacy"} {
		if err := PublishBackend(socket, b); err != nil {
			t.Fatal(err)
		}
		if got := BackendHint(socket); got != b {
			t.Errorf("BackendHint = %q, want %q", got, b)
		}
	}
	// Only the hint is left in the directory: no temporary file stays behind.
	entries, err := os.ReadDir(filepath.Dir(socket))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "cni.sock.backend" {
		t.Errorf("directory holds %v, want only cni.sock.backend", entries)
	}
	if err := PublishBackend(filepath.Join(t.TempDir(), "missing", "cni.sock"), "nft"); err == nil {
		t.Error("PublishBackend into a missing directory = nil, want an error")
	}
}
