package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// readTar returns the regular files of a tar by name, and the names in order.
func readTar(t *testing.T, data []byte) (map[string][]byte, []string, map[string]*tar.Header) {
	t.Helper()
	files, hdrs := map[string][]byte{}, map[string]*tar.Header{}
	var names []string
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		hdrs[h.Name] = h
		if h.Typeflag == tar.TypeReg {
			files[h.Name] = b
		}
	}
	return files, names, hdrs
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func testSpec(t *testing.T) Spec {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, []byte("daemon binary"), 0o600)
	os.WriteFile(b, []byte("plugin binary"), 0o600)
	return Spec{Tag: "meshless/meshlessd:dev", Arch: "amd64", OS: "linux",
		Entrypoint: []string{"/usr/local/bin/meshlessd"},
		Files:      []File{{Src: a, Dst: "/usr/local/bin/meshlessd"}, {Src: b, Dst: "/usr/local/bin/meshless-cni"}}}
}

// The archive is a consistent docker-archive: manifest.json names the config by its digest and
// the layer, the config's diff_id is the layer's digest, and the layer holds the files.
func TestArchiveConsistent(t *testing.T) {
	var buf bytes.Buffer
	if err := Build(&buf, testSpec(t)); err != nil {
		t.Fatal(err)
	}
	files, _, _ := readTar(t, buf.Bytes())
	var manifest []Manifest
	dec := json.NewDecoder(bytes.NewReader(files["manifest.json"]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&manifest); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	if len(manifest) != 1 {
		t.Fatalf("manifest.json has %d images", len(manifest))
	}
	m := manifest[0]
	if !slices.Equal(m.RepoTags, []string{"meshless/meshlessd:dev"}) {
		t.Errorf("RepoTags %v", m.RepoTags)
	}
	cfgData, ok := files[m.Config]
	if !ok {
		t.Fatalf("config %s is not in the archive", m.Config)
	}
	if m.Config != sum(cfgData)+".json" {
		t.Errorf("config named %s, its digest is %s", m.Config, sum(cfgData))
	}
	var cfg Config
	dec = json.NewDecoder(bytes.NewReader(cfgData))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("config: %v", err)
	}
	if cfg.Architecture != "amd64" || cfg.OS != "linux" || cfg.RootFS.Type != "layers" {
		t.Errorf("config %+v", cfg)
	}
	if !slices.Equal(cfg.Config.Entrypoint, []string{"/usr/local/bin/meshlessd"}) {
		t.Errorf("entrypoint %v", cfg.Config.Entrypoint)
	}
	if len(m.Layers) != 1 || len(cfg.RootFS.DiffIDs) != 1 {
		t.Fatalf("layers %v, diff_ids %v: want one each", m.Layers, cfg.RootFS.DiffIDs)
	}
	layer, ok := files[m.Layers[0]]
	if !ok {
		t.Fatalf("layer %s is not in the archive", m.Layers[0])
	}
	if cfg.RootFS.DiffIDs[0] != "sha256:"+sum(layer) {
		t.Errorf("diff_id %s, the layer's digest is sha256:%s", cfg.RootFS.DiffIDs[0], sum(layer))
	}
	if len(cfg.History) != 1 {
		t.Errorf("history %v: want one entry per layer", cfg.History)
	}

	lfiles, names, hdrs := readTar(t, layer)
	wantNames := []string{"usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/meshless-cni", "usr/local/bin/meshlessd"}
	if !slices.Equal(names, wantNames) {
		t.Errorf("layer entries %v, want %v", names, wantNames)
	}
	if string(lfiles["usr/local/bin/meshlessd"]) != "daemon binary" || string(lfiles["usr/local/bin/meshless-cni"]) != "plugin binary" {
		t.Error("layer files do not hold their sources")
	}
	for name, h := range hdrs {
		if h.Mode != 0o755 || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("%s: mode %o owner %d:%d, want 0755 root", name, h.Mode, h.Uid, h.Gid)
		}
	}
}

// Two builds of the same files are the same bytes.
func TestReproducible(t *testing.T) {
	spec := testSpec(t)
	var a, b bytes.Buffer
	if err := Build(&a, spec); err != nil {
		t.Fatal(err)
	}
	slices.Reverse(spec.Files)
	if err := Build(&b, spec); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("two builds differ")
	}
}

func TestBadDestinations(t *testing.T) {
	src := filepath.Join(t.TempDir(), "f")
	os.WriteFile(src, nil, 0o600)
	for _, dsts := range [][]string{{"relative"}, {"/a/../b"}, {"/"}, {"/x", "/x"}} {
		var files []File
		for _, d := range dsts {
			files = append(files, File{Src: src, Dst: d})
		}
		if err := Build(io.Discard, Spec{Tag: "t", Files: files}); err == nil {
			t.Errorf("destinations %v: want an error", dsts)
		}
	}
}
