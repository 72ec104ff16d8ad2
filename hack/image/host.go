package main

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

type hostList []string

func (l *hostList) String() string { return strings.Join(*l, ",") }
func (l *hostList) Set(v string) error {
	if !filepath.IsAbs(v) {
		return fmt.Errorf("-host %q: want an absolute path", v)
	}
	*l = append(*l, v)
	return nil
}

// maxLinks bounds symbolic link chains, as the kernel's ELOOP does.
const maxLinks = 40

// hostCollector gathers host paths into image entries, each path once.
type hostCollector struct {
	entries map[string]File
	// ldd is how shared libraries are found; a variable for tests.
	ldd func(file string) ([]string, error)
}

// HostFiles returns the image entries that reproduce the given host paths: each path with the
// symbolic links met on the way to it (a link to a directory such as /lib -> usr/lib becomes a
// link in the image too), regular files with their host mode, directories walked, and for every
// ELF file the shared libraries ldd lists, collected the same way.
func HostFiles(paths []string) ([]File, error) {
	c := &hostCollector{entries: map[string]File{}, ldd: lddDeps}
	for _, p := range paths {
		if err := c.add(p, 0); err != nil {
			return nil, err
		}
	}
	dsts := make([]string, 0, len(c.entries))
	for d := range c.entries {
		dsts = append(dsts, d)
	}
	slices.Sort(dsts)
	out := make([]File, 0, len(dsts))
	for _, d := range dsts {
		out = append(out, c.entries[d])
	}
	return out, nil
}

// add collects p, resolving it one component at a time so that each link on the way is kept.
func (c *hostCollector) add(p string, links int) error {
	if links > maxLinks {
		return fmt.Errorf("%s: too many levels of symbolic links", p)
	}
	p = path.Clean(p)
	parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
	dir := "/"
	for i, part := range parts {
		cur := path.Join(dir, part)
		fi, err := os.Lstat(cur)
		if err != nil {
			return fmt.Errorf("host path %s: %w", p, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			target, err := os.Readlink(cur)
			if err != nil {
				return err
			}
			c.entries[cur] = File{Dst: cur, Link: target}
			if !path.IsAbs(target) {
				target = path.Join(dir, target)
			}
			return c.add(path.Join(append([]string{target}, parts[i+1:]...)...), links+1)
		}
		if i < len(parts)-1 {
			dir = cur
			continue
		}
		switch {
		case fi.IsDir():
			return c.addDir(cur, links)
		case fi.Mode().IsRegular():
			return c.addFile(cur, fi.Mode().Perm(), links)
		default:
			return fmt.Errorf("host path %s: not a regular file, directory or link (%s)", cur, fi.Mode())
		}
	}
	return nil
}

func (c *hostCollector) addDir(dir string, links int) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := c.add(path.Join(dir, e.Name()), links); err != nil {
			return err
		}
	}
	return nil
}

func (c *hostCollector) addFile(file string, mode fs.FileMode, links int) error {
	if _, seen := c.entries[file]; seen {
		return nil
	}
	c.entries[file] = File{Src: file, Dst: file, Mode: mode}
	if !isDynamicELF(file) {
		return nil
	}
	deps, err := c.ldd(file)
	if err != nil {
		return err
	}
	for _, d := range deps {
		if err := c.add(d, links); err != nil {
			return fmt.Errorf("library of %s: %w", file, err)
		}
	}
	return nil
}

// isDynamicELF reports whether file is an ELF object that names a dynamic loader or shared
// libraries: an executable, a shared library, or a plugin such as an xtables extension.
func isDynamicELF(file string) bool {
	f, err := elf.Open(file)
	if err != nil {
		return false
	}
	defer f.Close()
	libs, err := f.ImportedLibraries()
	if err != nil {
		return false
	}
	return len(libs) > 0 || f.Section(".interp") != nil
}

// lddDeps returns the absolute paths of the shared libraries and the loader that ldd lists for
// file ("libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2
// (0x...)"); the vDSO has no file and is skipped.
func lddDeps(file string) ([]string, error) {
	var stderr bytes.Buffer
	cmd := exec.Command("ldd", file)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w: %s", file, err, strings.TrimSpace(stderr.String()))
	}
	return parseLdd(out)
}

func parseLdd(out []byte) ([]string, error) {
	var deps []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if _, rest, ok := strings.Cut(line, "=>"); ok {
			line = strings.TrimSpace(rest)
		}
		field, _, _ := strings.Cut(line, " ")
		switch {
		case field == "" || strings.HasPrefix(field, "linux-vdso") || strings.HasPrefix(field, "linux-gate"):
		case field == "not":
			return nil, errors.New("ldd: " + sc.Text())
		case path.IsAbs(field):
			deps = append(deps, field)
		}
	}
	return deps, sc.Err()
}
