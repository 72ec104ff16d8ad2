package main

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestParseLdd(t *testing.T) {
	out := []byte("\tlinux-vdso.so.1 (0x00007ffd)\n" +
		"\tlibxtables.so.12 => /lib/x86_64-linux-gnu/libxtables.so.12 (0x00007fbe)\n" +
		"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fbe)\n" +
		"\t/lib64/ld-linux-x86-64.so.2 (0x00007fbe)\n")
	got, err := parseLdd(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/lib/x86_64-linux-gnu/libxtables.so.12", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if _, err := parseLdd([]byte("\tlibfoo.so.1 => not found\n")); err == nil {
		t.Fatal("a missing library: no error")
	}
}

// A host tree shaped like Debian's merged /usr: the links on the way to a file (a directory link,
// an alternatives link, a relative link) are reproduced, files keep their mode, directories are
// walked.
func TestHostFilesKeepsLinks(t *testing.T) {
	root := t.TempDir()
	mk := func(p, data string, mode os.FileMode) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
	}
	ln := func(target, p string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
	mk(root+"/usr/sbin/multi", "#!/bin/sh\n", 0o755)
	ln("multi", root+"/usr/sbin/tool-nft")
	ln(root+"/usr/sbin/tool-nft", root+"/etc/alternatives/tool")
	ln(root+"/etc/alternatives/tool", root+"/usr/sbin/tool")
	ln("usr/sbin", root+"/sbin")
	mk(root+"/usr/lib/ext/a.so", "a", 0o644)
	mk(root+"/usr/lib/ext/b.so", "b", 0o644)

	got, err := HostFiles([]string{root + "/sbin/tool", root + "/usr/lib/ext"})
	if err != nil {
		t.Fatal(err)
	}
	want := []File{
		{Dst: root + "/etc/alternatives/tool", Link: root + "/usr/sbin/tool-nft"},
		{Dst: root + "/sbin", Link: "usr/sbin"},
		{Src: root + "/usr/lib/ext/a.so", Dst: root + "/usr/lib/ext/a.so", Mode: 0o644},
		{Src: root + "/usr/lib/ext/b.so", Dst: root + "/usr/lib/ext/b.so", Mode: 0o644},
		{Src: root + "/usr/sbin/multi", Dst: root + "/usr/sbin/multi", Mode: 0o755},
		{Dst: root + "/usr/sbin/tool", Link: root + "/etc/alternatives/tool"},
		{Dst: root + "/usr/sbin/tool-nft", Link: "multi"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got\n%v\nwant\n%v", got, want)
	}
}

// Links and modes reach the layer; a link that is also some entry's parent directory is refused.
func TestLayerLinksAndModes(t *testing.T) {
	src := filepath.Join(t.TempDir(), "lib")
	os.WriteFile(src, []byte("lib"), 0o600)
	layer, err := Layer([]File{
		{Dst: "/lib", Link: "usr/lib"},
		{Src: src, Dst: "/usr/lib/libx.so", Mode: 0o644},
	})
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(bytes.NewReader(layer))
	seen := map[string]*tar.Header{}
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		seen[h.Name] = h
	}
	if h := seen["lib"]; h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "usr/lib" {
		t.Errorf("lib: %+v", h)
	}
	if h := seen["usr/lib/libx.so"]; h == nil || h.Mode != 0o644 {
		t.Errorf("usr/lib/libx.so: %+v", h)
	}
	if _, err := Layer([]File{{Dst: "/lib", Link: "usr/lib"}, {Src: src, Dst: "/lib/libx.so"}}); err == nil {
		t.Error("a link that is also a parent directory: no error")
	}
}
