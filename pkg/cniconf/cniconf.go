// Package cniconf chains meshless-cni into the node's primary CNI network
// configuration and takes it out again.
//
// # Which file
//
// The runtime (containerd and CRI-O, through libcni) lists the files of the conf
// dir whose extension is .conf, .conflist or .json (libcni.ConfFiles), sorts the
// names lexically and uses the first one. FindPrimary does exactly that.
//
// # How the file is edited
//
// The file is never decoded into a map and re-encoded: that would lose key order,
// number formatting (1500 vs 1.5e3), indentation and anything else the primary CNI
// wrote. Instead the document is scanned with encoding/json's Decoder to find the
// byte span of every top-level member and of every element of the "plugins" array,
// and the edit is a byte splice:
//
//   - install appends our entry after the last element, reusing the separator and
//     indentation found between the existing elements; every other byte of the file
//     stays as it was;
//   - if an entry of type "meshless-cni" is present anywhere in the list and equals
//     the desired one (as decoded JSON), nothing is written (idempotent; this is also
//     what keeps the watcher from reacting to its own writes); if it differs, only
//     its bytes are replaced, in place. An entry that is present is never moved:
//     another chainer (istio-cni, for example) that also wants to be last would
//     otherwise fight us forever;
//   - uninstall cuts our element and the separator in front of it.
//
// A single-plugin file (.conf, or .json with a top-level "type") is converted the way
// libcni's ConfListFromConf does it: a conflist with the original cniVersion and name
// and the original object, byte for byte, as its first plugin. It is written under the
// same base name with the .conflist extension, then the old file is removed so the
// runtime does not see two networks. The original bytes are kept in a sidecar
// "<old name>.meshless-orig" (an extension libcni ignores); uninstall restores the
// original file from it when the conflist is still exactly what the conversion made.
//
// Every write goes to a temporary file in the same directory (named so that libcni
// ignores it) which is synced and renamed over the target, keeping the target's mode.
//
// A file that is not valid JSON, or not a network configuration libcni would accept
// in its basic shape, is left untouched and reported as an error.
package cniconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

// PluginType is the "type" of our entry in the conflist (and the plugin binary's name).
const PluginType = "meshless-cni"

// Extensions are the file extensions the runtime considers, as libcni.ConfFiles is called
// by containerd and CRI-O.
var Extensions = []string{".conf", ".conflist", ".json"}

// SidecarSuffix names the copy of a single-plugin file that we converted into a conflist.
const SidecarSuffix = ".meshless-orig"

// ErrNoConfig means the conf dir holds no network configuration (yet).
var ErrNoConfig = errors.New("no CNI network configuration (.conf, .conflist, .json) in the conf dir yet")

// Entry holds our plugin's configuration keys (socketPath, excludeInboundPorts, ...);
// "type" is always set to PluginType.
type Entry map[string]any

// Action says what Install or Uninstall did.
type Action string

const (
	Unchanged Action = "unchanged" // already as desired; nothing written
	Appended  Action = "appended"  // our entry was added as the last plugin
	Updated   Action = "updated"   // our entry was present but different; replaced in place
	Converted Action = "converted" // a single-plugin file became a conflist with our entry
	Removed   Action = "removed"   // uninstall: our entry was cut out
	Restored  Action = "restored"  // uninstall: the original single-plugin file was put back
)

// Result describes one Install or Uninstall.
type Result struct {
	Action Action
	File   string // the file written (or checked)
	From   string // for Converted: the single-plugin file that was replaced; for Restored: the conflist removed
}

// FindPrimary returns the path of the network configuration the runtime uses: the
// lexically first file in dir with a .conf, .conflist or .json extension.
func FindPrimary(dir string) (string, error) {
	files, err := confFiles(dir)
	if err != nil {
		return "", err
	}
	if len(files) == 0 {
		return "", ErrNoConfig
	}
	return files[0], nil
}

func confFiles(dir string) ([]string, error) {
	files, err := libcni.ConfFiles(dir, Extensions)
	if err != nil {
		return nil, fmt.Errorf("list CNI conf dir %s: %w", dir, err)
	}
	sort.Strings(files)
	return files, nil
}

// Install chains our entry into the primary network configuration of dir.
func Install(dir string, entry Entry) (Result, error) {
	want, err := entryJSON(entry)
	if err != nil {
		return Result{}, err
	}
	path, err := FindPrimary(dir)
	if err != nil {
		return Result{}, err
	}
	raw, mode, err := readFile(path)
	if err != nil {
		return Result{}, err
	}
	if isSingle(path, raw) {
		return convert(dir, path, raw, mode, want)
	}
	out, action, err := addToList(raw, want)
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w (left untouched)", path, err)
	}
	if action == Unchanged {
		return Result{Action: Unchanged, File: path}, nil
	}
	// Narrow the window in which a concurrent rewrite by the primary CNI would be lost:
	// if the file changed while we worked, leave it and let the next call see the new one.
	if now, err := os.ReadFile(path); err != nil || !bytes.Equal(now, raw) {
		return Result{}, fmt.Errorf("%s changed while being patched; retry", path)
	}
	if err := WriteFileAtomic(path, out, mode); err != nil {
		return Result{}, err
	}
	return Result{Action: action, File: path}, nil
}

// Uninstall removes our entry from the primary network configuration of dir (and puts back
// a single-plugin file that Install converted, if the conflist is still what it made).
// A dir without configuration, or a configuration without our entry, is Unchanged.
func Uninstall(dir string) (Result, error) {
	path, err := FindPrimary(dir)
	if errors.Is(err, ErrNoConfig) {
		return Result{Action: Unchanged}, nil
	}
	if err != nil {
		return Result{}, err
	}
	raw, mode, err := readFile(path)
	if err != nil {
		return Result{}, err
	}
	if isSingle(path, raw) {
		return Result{Action: Unchanged, File: path}, nil
	}
	out, found, err := removeFromList(raw)
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w (left untouched)", path, err)
	}
	if !found {
		return Result{Action: Unchanged, File: path}, nil
	}
	base := strings.TrimSuffix(path, filepath.Ext(path))
	for _, ext := range []string{".conf", ".json"} {
		orig := base + ext
		side := orig + SidecarSuffix
		saved, err := os.ReadFile(side)
		if err != nil {
			continue
		}
		if conv, cerr := convertBytes(saved); cerr == nil && bytes.Equal(conv, out) {
			if err := WriteFileAtomic(orig, saved, mode); err != nil {
				return Result{}, err
			}
			if err := os.Remove(path); err != nil {
				return Result{}, err
			}
			_ = os.Remove(side)
			return Result{Action: Restored, File: orig, From: path}, nil
		}
		_ = os.Remove(side) // stale: the conflist changed since we converted
	}
	if err := WriteFileAtomic(path, out, mode); err != nil {
		return Result{}, err
	}
	return Result{Action: Removed, File: path}, nil
}

func readFile(path string) ([]byte, os.FileMode, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, 0, err
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	return raw, fi.Mode().Perm(), nil
}

// isSingle reports whether path holds a single-plugin configuration: a .conf file, or a
// .json file with a top-level "type". (libcni loads .conf and .json as single plugins; a
// .json conflist is edited in place.)
func isSingle(path string, raw []byte) bool {
	switch filepath.Ext(path) {
	case ".conf":
		return true
	case ".json":
		var probe struct {
			Type *json.RawMessage `json:"type"`
		}
		return json.Unmarshal(raw, &probe) == nil && probe.Type != nil
	}
	return false
}

// convert turns the single-plugin file path into a conflist with our entry.
func convert(dir, path string, raw []byte, mode os.FileMode, want []byte) (Result, error) {
	list, err := convertBytes(raw)
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w (left untouched)", path, err)
	}
	out, _, err := addToList(list, want)
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w (left untouched)", path, err)
	}
	target := strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	// The conflist must become the runtime's choice once the old file is gone: no other
	// configuration may sort between the two names.
	files, err := confFiles(dir)
	if err != nil {
		return Result{}, err
	}
	for _, f := range files {
		if f != path && f != target && ((f > path && f < target) || (f < path && f > target)) {
			return Result{}, fmt.Errorf("%s: cannot convert to %s: %s sorts between them and would become the primary configuration (left untouched)", path, filepath.Base(target), filepath.Base(f))
		}
	}
	if err := WriteFileAtomic(path+SidecarSuffix, raw, mode); err != nil {
		return Result{}, err
	}
	if err := WriteFileAtomic(target, out, mode); err != nil {
		return Result{}, err
	}
	if err := os.Remove(path); err != nil {
		return Result{}, err
	}
	return Result{Action: Converted, File: target, From: path}, nil
}

// convertBytes is libcni's ConfListFromConf on bytes: {"cniVersion", "name", "plugins": [original]}
// with the original object embedded byte for byte.
func convertBytes(raw []byte) ([]byte, error) {
	d, err := parseObject(raw)
	if err != nil {
		return nil, err
	}
	var t string
	if s, ok := d.members["type"]; !ok || json.Unmarshal(raw[s.start:s.end], &t) != nil || t == "" {
		return nil, errors.New(`single-plugin configuration has no "type" string`)
	}
	var b bytes.Buffer
	b.WriteString("{\n")
	for _, k := range []string{"cniVersion", "name"} {
		if s, ok := d.members[k]; ok {
			fmt.Fprintf(&b, "  %q: %s,\n", k, raw[s.start:s.end])
		}
	}
	b.WriteString("  \"plugins\": [\n")
	b.Write(bytes.TrimSpace(raw))
	b.WriteString("\n  ]\n}\n")
	return b.Bytes(), nil
}

// entryJSON renders our entry compactly: "type" first, then the caller's keys sorted.
func entryJSON(entry Entry) ([]byte, error) {
	keys := make([]string, 0, len(entry))
	for k := range entry {
		if k != "type" {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var b bytes.Buffer
	fmt.Fprintf(&b, `{"type":%q`, PluginType)
	for _, k := range keys {
		kb, _ := json.Marshal(k)
		vb, err := json.Marshal(entry[k])
		if err != nil {
			return nil, fmt.Errorf("meshless-cni entry key %q: %w", k, err)
		}
		b.WriteByte(',')
		b.Write(kb)
		b.WriteByte(':')
		b.Write(vb)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// WriteFileAtomic writes data to a temporary file in path's directory (its name ends in
// ".tmp-<random>", which libcni ignores), syncs it, sets mode and renames it over path.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir, base := filepath.Split(path)
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	fail := func(err error) error {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Chmod(mode); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// sameJSON compares two JSON values as decoded data (numbers as written).
func sameJSON(a, b []byte) bool {
	var x, y any
	da := json.NewDecoder(bytes.NewReader(a))
	da.UseNumber()
	db := json.NewDecoder(bytes.NewReader(b))
	db.UseNumber()
	if da.Decode(&x) != nil || db.Decode(&y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}

// ErrNotChained means the runtime's network configuration has no meshless-cni entry (yet).
var ErrNotChained = errors.New("meshless-cni is not chained in the CNI network configuration")

// Chained returns the network configuration list the runtime uses from dir, and our entry in it.
func Chained(dir string) (*libcni.NetworkConfigList, *libcni.NetworkConfig, error) {
	path, err := FindPrimary(dir)
	if err != nil {
		return nil, nil, err
	}
	raw, _, err := readFile(path)
	if err != nil {
		return nil, nil, err
	}
	if isSingle(path, raw) {
		return nil, nil, fmt.Errorf("%s: %w", path, ErrNotChained)
	}
	list, err := libcni.ConfListFromBytes(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	for _, p := range list.Plugins {
		if p.Network.Type == PluginType {
			return list, p, nil
		}
	}
	return nil, nil, fmt.Errorf("%s: %w", path, ErrNotChained)
}
