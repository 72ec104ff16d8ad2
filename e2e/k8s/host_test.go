package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// A dir that existed comes back by rename, contents and times untouched; one that did not is
// removed with the parents the run created.
func TestSaveRestoreDir(t *testing.T) {
	root := t.TempDir()
	existing := filepath.Join(root, "etc", "cni", "net.d")
	if err := os.MkdirAll(existing, 0o755); err != nil {
		t.Fatal(err)
	}
	orig := filepath.Join(existing, "10-calico.conflist")
	if err := os.WriteFile(orig, []byte(`{"name":"k8s-pod-network"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := os.Chtimes(orig, old, old); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(root, "opt", "cni", "bin")
	for _, d := range []string{filepath.Join(root, "etc", "cni"), root} {
		if err := os.Chtimes(d, old, old); err != nil {
			t.Fatal(err)
		}
	}

	var saved []savedDir
	for _, d := range []string{existing, missing} {
		s, err := saveDir(d)
		if err != nil {
			t.Fatal(err)
		}
		saved = append(saved, s)
		if entries, err := os.ReadDir(d); err != nil || len(entries) != 0 {
			t.Fatalf("%s during the run: %v entries, %v; want an empty dir", d, len(entries), err)
		}
		if err := os.WriteFile(filepath.Join(d, "run-file"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := saveDir(existing); err == nil {
		t.Fatal("saving a dir whose backup exists: no error")
	}
	for _, s := range saved {
		if err := restoreDir(s); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(orig)
	if err != nil || string(data) != `{"name":"k8s-pod-network"}` {
		t.Fatalf("restored file: %q %v", data, err)
	}
	if fi, _ := os.Stat(orig); fi.Mode().Perm() != 0o600 || !fi.ModTime().Equal(old) {
		t.Fatalf("restored file: mode %v time %v", fi.Mode(), fi.ModTime())
	}
	if entries, _ := os.ReadDir(existing); len(entries) != 1 {
		t.Fatalf("restored dir holds %d entries, want 1", len(entries))
	}
	if _, err := os.Stat(filepath.Join(root, "opt")); !os.IsNotExist(err) {
		t.Fatalf("created parents left behind: %v", err)
	}
	// The parents' times are back too (the run renamed and created entries in them).
	for _, d := range []string{filepath.Join(root, "etc", "cni"), root} {
		if fi, _ := os.Stat(d); !fi.ModTime().Equal(old) {
			t.Errorf("%s: mtime %v, want %v", d, fi.ModTime(), old)
		}
	}
}

func TestRemoveRuntimeTree(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "kubelet")
	if err := os.MkdirAll(filepath.Join(dir, "device-plugins"), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(dir, "device-plugins", "kubelet.sock"))
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if err := removeRuntimeTree(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("%s still there: %v", dir, err)
	}
	// A regular file is not the runtime's: kept and reported.
	if err := os.MkdirAll(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sub", "data"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := removeRuntimeTree(dir); err == nil || !strings.Contains(err.Error(), "data") {
		t.Fatalf("got %v, want an error naming the kept file", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "sub", "data")); err != nil {
		t.Fatal(err)
	}
	if err := removeRuntimeTree(filepath.Join(root, "absent")); err != nil {
		t.Fatal(err)
	}
}

func TestRemoveLinksInto(t *testing.T) {
	root := t.TempDir()
	logs := filepath.Join(root, "containers")
	os.Mkdir(logs, 0o755)
	os.Symlink("/tmp/mlk8s-run/kubelet/pod-logs/a/0.log", filepath.Join(logs, "ours.log"))
	os.Symlink("/var/log/pods/b/0.log", filepath.Join(logs, "theirs.log"))
	if err := removeLinksInto(logs, "/tmp/mlk8s-run"); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(logs)
	if len(entries) != 1 || entries[0].Name() != "theirs.log" {
		t.Fatalf("left %v", entries)
	}
}

func TestUnescapeMount(t *testing.T) {
	if got := unescapeMount(`/tmp/a\040b\011c`); got != "/tmp/a b\tc" {
		t.Fatalf("got %q", got)
	}
	if got := unescapeMount("/run/netns"); got != "/run/netns" {
		t.Fatalf("got %q", got)
	}
}

// The primary CNI's conflist is valid JSON with the bridge first, as install-cni expects.
func TestBridgeConflist(t *testing.T) {
	var cl struct {
		Name    string `json:"name"`
		Plugins []struct {
			Type string `json:"type"`
			IPAM struct {
				DataDir string `json:"dataDir"`
			} `json:"ipam"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(bridgeConflist("mlk8s-x", "/tmp/ipam"), &cl); err != nil {
		t.Fatal(err)
	}
	if cl.Name != "mlk8s-x" || len(cl.Plugins) != 2 || cl.Plugins[0].Type != "bridge" || cl.Plugins[0].IPAM.DataDir != "/tmp/ipam" {
		t.Fatalf("%+v", cl)
	}
}

// The workloads decode strictly: the Deployments use their own service accounts and the plain
// pods carry the opt-out annotation.
func TestWorkloadsManifest(t *testing.T) {
	sas := map[string]string{}
	var annotations map[string]string
	for _, doc := range bytes.Split(bytes.Join([][]byte{earlyManifest(), workloadsManifest(), afterManifest()}, []byte("\n---\n")), []byte("\n---\n")) {
		var head struct{ Kind string }
		if err := yaml.Unmarshal(doc, &head); err != nil {
			t.Fatal(err)
		}
		if head.Kind != "Deployment" {
			continue
		}
		var d appsv1.Deployment
		if err := yaml.UnmarshalStrict(doc, &d); err != nil {
			t.Fatalf("%v:\n%s", err, doc)
		}
		sas[d.Name] = d.Spec.Template.Spec.ServiceAccountName
		if d.Name == "plain" {
			annotations = d.Spec.Template.Annotations
		}
	}
	if sas["frontend"] != "frontend" || sas["backend"] != "backend" || sas["early"] != "early" || len(sas) != 5 {
		t.Fatalf("service accounts %v", sas)
	}
	if annotations["meshless.io/inject"] != "false" {
		t.Fatalf("plain annotations %v", annotations)
	}
}
