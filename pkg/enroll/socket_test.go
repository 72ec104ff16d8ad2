package enroll

import (
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestListen(t *testing.T) {
	t.Run("creates a private directory and a 0600 socket", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "a", "b")
		path := filepath.Join(dir, "cni.sock")
		l, err := Listen(path)
		if err != nil {
			t.Fatalf("Listen: %v", err)
		}
		defer l.Close()
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
			t.Errorf("socket mode = %v, want socket 0600", fi.Mode())
		}
		di, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if di.Mode().Perm() != 0o700 {
			t.Errorf("directory mode = %v, want 0700", di.Mode().Perm())
		}
	})
	t.Run("replaces a stale socket", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "cni.sock")
		old, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		old.(*net.UnixListener).SetUnlinkOnClose(false)
		old.Close()
		l, err := Listen(path)
		if err != nil {
			t.Fatalf("Listen over a stale socket: %v", err)
		}
		l.Close()
	})
	t.Run("refuses a socket in use", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "cni.sock")
		l, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if l2, err := Listen(path); err == nil || !strings.Contains(err.Error(), "in use") {
			if l2 != nil {
				l2.Close()
			}
			t.Errorf("second Listen = %v, want an in-use error", err)
		}
	})
	t.Run("refuses a path that is not a socket", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "cni.sock")
		if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
			t.Fatal(err)
		}
		if l, err := Listen(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
			if l != nil {
				l.Close()
			}
			t.Errorf("Listen over a file = %v, want a not-a-socket error", err)
		}
		if b, _ := os.ReadFile(path); string(b) != "keep me" {
			t.Error("Listen clobbered a regular file")
		}
	})
}
