// Command image builds a container image without Docker: a docker-archive tarball (what `docker
// save` writes and `ctr images import` / `docker load` read) of one layer holding the given files.
//
//	go run ./hack/image -out bin/meshless-image.tar -tag meshless/meshlessd:dev \
//	    -entrypoint /usr/local/bin/meshlessd \
//	    -file bin/meshlessd=/usr/local/bin/meshlessd -file bin/meshless-cni=/usr/local/bin/meshless-cni \
//	    -host /usr/sbin/xtables-nft-multi -host /usr/sbin/iptables-nft-save ...
//
// -host copies dynamically linked programs of the build host (the Makefile: iptables) together
// with what they need to run: the symbolic links that lead to them, their shared libraries and
// the dynamic loader, at the paths the host has them.
//
// The archive holds manifest.json ([{Config, RepoTags, Layers}]), the image config
// (<sha256>.json: architecture, os, config.Entrypoint, rootfs.diff_ids) and layer.tar. The output
// is reproducible: every entry has a fixed time and owner root:root, so the same files give the
// same bytes (and the same image ID).
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// epoch is the time of every entry and of the image: fixed, so that builds are reproducible.
var epoch = time.Unix(0, 0).UTC()

// File is one entry of the layer: the contents of Src at the absolute path Dst with mode Mode
// (0 means 0755), or, when Link is set, a symbolic link at Dst to Link (Src unused).
type File struct {
	Src, Dst string
	Mode     fs.FileMode
	Link     string
}

// Spec describes the image.
type Spec struct {
	Tag        string
	Arch, OS   string
	Entrypoint []string
	Env        []string
	Files      []File
}

// Manifest is one entry of a docker-archive's manifest.json.
type Manifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// Config is the part of the OCI/Docker image config that the archive carries.
type Config struct {
	Architecture string          `json:"architecture"`
	OS           string          `json:"os"`
	Created      time.Time       `json:"created"`
	Config       ContainerConfig `json:"config"`
	RootFS       RootFS          `json:"rootfs"`
	History      []History       `json:"history"`
}

type ContainerConfig struct {
	Entrypoint []string `json:"Entrypoint,omitempty"`
	Env        []string `json:"Env,omitempty"`
}

type RootFS struct {
	Type    string   `json:"type"`
	DiffIDs []string `json:"diff_ids"`
}

type History struct {
	Created   time.Time `json:"created"`
	CreatedBy string    `json:"created_by"`
}

// LayerName is the layer's path inside the archive.
const LayerName = "layer.tar"

// Layer returns the uncompressed layer tar: the parent directories of every entry (0755), then the
// files and links, all owned by root, in path order.
func Layer(files []File) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	var entries []File
	for _, f := range files {
		if !path.IsAbs(f.Dst) || path.Clean(f.Dst) != f.Dst || f.Dst == "/" {
			return nil, fmt.Errorf("destination %q: want a clean absolute file path", f.Dst)
		}
		for d := path.Dir(f.Dst); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
		entries = append(entries, f)
	}
	for _, f := range entries {
		// A link where another entry needs a directory (/lib -> usr/lib beside /lib/x.so) would
		// make the later entry land wherever the link points, or fail to extract.
		if dirs[f.Dst] {
			return nil, fmt.Errorf("destination %s is both an entry and the parent directory of another", f.Dst)
		}
	}
	sortedDirs := make([]string, 0, len(dirs))
	for d := range dirs {
		sortedDirs = append(sortedDirs, d)
	}
	slices.Sort(sortedDirs)
	for _, d := range sortedDirs {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/",
			Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	slices.SortFunc(entries, func(a, b File) int { return strings.Compare(a.Dst, b.Dst) })
	for i, f := range entries {
		if i > 0 && entries[i-1].Dst == f.Dst {
			return nil, fmt.Errorf("destination %s given twice", f.Dst)
		}
		name := strings.TrimPrefix(f.Dst, "/")
		if f.Link != "" {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: f.Link,
				Mode: 0o777, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
				return nil, err
			}
			continue
		}
		data, err := os.ReadFile(f.Src)
		if err != nil {
			return nil, err
		}
		mode := f.Mode.Perm()
		if mode == 0 {
			mode = 0o755
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name,
			Mode: int64(mode), Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Build writes the docker-archive of spec to w.
func Build(w io.Writer, spec Spec) error {
	if spec.Tag == "" {
		return fmt.Errorf("an image needs a tag")
	}
	layer, err := Layer(spec.Files)
	if err != nil {
		return err
	}
	var dsts []string
	for _, f := range spec.Files {
		dsts = append(dsts, f.Dst)
	}
	slices.Sort(dsts)
	cfg, err := json.Marshal(Config{
		Architecture: spec.Arch,
		OS:           spec.OS,
		Created:      epoch,
		Config:       ContainerConfig{Entrypoint: spec.Entrypoint, Env: spec.Env},
		RootFS:       RootFS{Type: "layers", DiffIDs: []string{"sha256:" + digest(layer)}},
		History:      []History{{Created: epoch, CreatedBy: "hack/image: " + strings.Join(dsts, " ")}},
	})
	if err != nil {
		return err
	}
	cfgName := digest(cfg) + ".json"
	manifest, err := json.Marshal([]Manifest{{Config: cfgName, RepoTags: []string{spec.Tag}, Layers: []string{LayerName}}})
	if err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	for _, e := range []struct {
		name string
		data []byte
	}{{LayerName, layer}, {cfgName, cfg}, {"manifest.json", manifest}} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: e.name, Mode: 0o644,
			Size: int64(len(e.data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		if _, err := tw.Write(e.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

type fileList []File

func (l *fileList) String() string { return fmt.Sprint(*l) }
func (l *fileList) Set(v string) error {
	src, dst, ok := strings.Cut(v, "=")
	if !ok || src == "" || dst == "" {
		return fmt.Errorf("want SRC=DST, got %q", v)
	}
	*l = append(*l, File{Src: src, Dst: dst})
	return nil
}

func main() {
	out := flag.String("out", "", "the docker-archive to write")
	tag := flag.String("tag", "meshless/meshlessd:dev", "the image's repository:tag (RepoTags)")
	arch := flag.String("arch", runtime.GOARCH, "the image's architecture (the binaries' GOARCH)")
	entrypoint := flag.String("entrypoint", "", "the image's entrypoint (one path)")
	var files fileList
	var host hostList
	flag.Var(&files, "file", "SRC=DST: put the file SRC at DST (absolute) in the image, mode 0755; repeatable")
	flag.Var(&host, "host", "PATH: copy this host's PATH to the same path in the image, with every symbolic link on the way, "+
		"everything under it if it is a directory, and the shared libraries (ldd) of every ELF file; repeatable")
	flag.Parse()
	if *out == "" || len(files) == 0 {
		fmt.Fprintln(os.Stderr, "usage: image -out FILE -file SRC=DST [-file ...] [-host PATH ...] [-tag T] [-entrypoint P]")
		os.Exit(2)
	}
	if len(host) > 0 {
		hf, err := HostFiles(host)
		if err != nil {
			fmt.Fprintln(os.Stderr, "image:", err)
			os.Exit(1)
		}
		files = append(files, hf...)
	}
	spec := Spec{Tag: *tag, Arch: *arch, OS: "linux", Files: files,
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}}
	if *entrypoint != "" {
		spec.Entrypoint = []string{*entrypoint}
	}
	if err := write(*out, spec); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s (%s)\n", *out, *tag)
}

// write builds the archive into a temporary file beside out and renames it into place.
func write(out string, spec Spec) error {
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := Build(f, spec); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(f.Name(), out)
}
