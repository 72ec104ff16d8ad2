package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/meshless/meshless/internal/logtest"
)

type cniHost struct {
	bin, conf, plugin string
}

func newCNIHost(t *testing.T, sample string) cniHost {
	t.Helper()
	root := t.TempDir()
	h := cniHost{filepath.Join(root, "bin"), filepath.Join(root, "net.d"), filepath.Join(root, "src", "meshless-cni")}
	for _, d := range []string{h.bin, h.conf, filepath.Dir(h.plugin)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(h.plugin, []byte("#!/bin/sh\necho plugin\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if sample != "" {
		b, err := os.ReadFile(filepath.Join("../pkg/cniconf/testdata/conflists", sample))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(h.conf, sample), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

func (h cniHost) args(extra ...string) []string {
	return append([]string{"--cni-bin-dir", h.bin, "--cni-conf-dir", h.conf, "--plugin-binary", h.plugin}, extra...)
}

func lastPlugin(t *testing.T, path string) map[string]any {
	t.Helper()
	cl, err := libcni.ConfListFromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(cl.Plugins[len(cl.Plugins)-1].Bytes, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestInstallCNIOnceAndUninstall(t *testing.T) {
	h := newCNIHost(t, "10-flannel.conflist")
	conflist := filepath.Join(h.conf, "10-flannel.conflist")
	orig, _ := os.ReadFile(conflist)
	var out bytes.Buffer
	args := h.args("--socket", "/run/m.sock", "--exclude-inbound-ports", "15021, 9090", "--exclude-outbound-cidrs", "10.96.0.0/12", "--plugin-log-level", "debug")
	if err := installCNI(context.Background(), args, &out); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(h.bin, "meshless-cni"))
	if err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("plugin binary: %v %v", fi, err)
	}
	m := lastPlugin(t, conflist)
	want := `{"capabilities":{"io.kubernetes.cri.pod-annotations":true},"excludeInboundPorts":[15021,9090],"excludeOutboundCIDRs":["10.96.0.0/12"],"logLevel":"debug","socketPath":"/run/m.sock","type":"meshless-cni"}`
	if got, _ := json.Marshal(m); string(got) != want {
		t.Fatalf("our entry %s\nwant %s", got, want)
	}
	// Logs are slog JSON lines.
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if !json.Valid([]byte(line)) {
			t.Fatalf("log line is not JSON: %q", line)
		}
	}
	if !strings.Contains(out.String(), `"action":"appended"`) {
		t.Fatalf("log: %s", out.String())
	}

	// Idempotent.
	first, _ := os.ReadFile(conflist)
	out.Reset()
	if err := installCNI(context.Background(), args, &out); err != nil {
		t.Fatal(err)
	}
	if again, _ := os.ReadFile(conflist); !bytes.Equal(again, first) {
		t.Fatal("second run changed the conflist")
	}
	if !strings.Contains(out.String(), `"copied":false`) || !strings.Contains(out.String(), `"action":"unchanged"`) {
		t.Fatalf("log: %s", out.String())
	}

	// Uninstall: entry and binary gone, the original file back byte for byte.
	if err := installCNI(context.Background(), []string{"--cni-bin-dir", h.bin, "--cni-conf-dir", h.conf, "--uninstall"}, &out); err != nil {
		t.Fatal(err)
	}
	if back, _ := os.ReadFile(conflist); !bytes.Equal(back, orig) {
		t.Fatalf("uninstall left:\n%s", back)
	}
	if _, err := os.Stat(filepath.Join(h.bin, "meshless-cni")); !os.IsNotExist(err) {
		t.Fatalf("binary still there: %v", err)
	}
}

func TestInstallCNIWatch(t *testing.T) {
	h := newCNIHost(t, "") // the primary CNI arrives later
	ctx, cancel := context.WithCancel(context.Background())
	logs := &logtest.Buffer{}
	done := make(chan error, 1)
	go func() { done <- installCNI(ctx, h.args("--watch", "--interval", "10ms"), logs) }()

	conflist := filepath.Join(h.conf, "10-calico.conflist")
	orig, _ := os.ReadFile("../pkg/cniconf/testdata/conflists/10-calico.conflist")
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s; logs:\n%s", what, logs.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	isChained := func() bool {
		cl, err := libcni.ConfListFromFile(conflist)
		return err == nil && cl.Plugins[len(cl.Plugins)-1].Network.Type == "meshless-cni"
	}
	waitFor("the waiting log", func() bool { return strings.Contains(logs.String(), "waiting for the primary CNI") })
	if err := os.WriteFile(conflist, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor("chained", isChained)
	if err := os.WriteFile(conflist, orig, 0o644); err != nil { // Calico rewrites its file
		t.Fatal(err)
	}
	waitFor("re-chained", isChained)
	if err := os.WriteFile(conflist, []byte("{broken"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor("the error log", func() bool { return strings.Contains(logs.String(), `"level":"ERROR"`) })
	if b, _ := os.ReadFile(conflist); string(b) != "{broken" {
		t.Fatal("malformed file touched")
	}
	if err := os.WriteFile(conflist, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor("chained after the fix", isChained)

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("install-cni --watch returned %v", err)
	}
	if !strings.Contains(logs.String(), "stopped watching") {
		t.Fatalf("logs:\n%s", logs.String())
	}
}

func TestInstallCNIFlagErrors(t *testing.T) {
	h := newCNIHost(t, "10-calico.conflist")
	for _, extra := range [][]string{
		{"--exclude-inbound-ports", "0"},
		{"--exclude-outbound-ports", "http"},
		{"--exclude-outbound-cidrs", "10.0.0.0"},
		{"--socket", "relative.sock"},
		{"--plugin-log-level", "loud"},
		{"stray"},
	} {
		if err := installCNI(context.Background(), h.args(extra...), &bytes.Buffer{}); err == nil {
			t.Errorf("%v: no error", extra)
		}
	}
	// A missing plugin binary is an error before the conflist is touched.
	b, _ := os.ReadFile(filepath.Join(h.conf, "10-calico.conflist"))
	args := []string{"--cni-bin-dir", h.bin, "--cni-conf-dir", h.conf, "--plugin-binary", filepath.Join(h.bin, "nope")}
	if err := installCNI(context.Background(), args, &bytes.Buffer{}); err == nil {
		t.Fatal("missing plugin binary: no error")
	}
	if after, _ := os.ReadFile(filepath.Join(h.conf, "10-calico.conflist")); !bytes.Equal(after, b) {
		t.Fatal("conflist touched")
	}
	// Without --watch, an empty conf dir is an error.
	empty := newCNIHost(t, "")
	if err := installCNI(context.Background(), empty.args(), &bytes.Buffer{}); err == nil {
		t.Fatal("empty conf dir without --watch: no error")
	}
}

func TestDispatchInstallCNI(t *testing.T) {
	var out, errb bytes.Buffer
	if code := dispatch([]string{"install-cni", "--bogus"}, &out, &errb); code != 1 {
		t.Fatalf("exit %d", code)
	}
	if code := dispatch([]string{"help"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "install-cni") {
		t.Fatalf("usage: %s", out.String())
	}
}
