package cniconf

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
)

// testdata holds the configurations real primary CNIs write (see its README.md).
const testdata = "testdata/conflists"

var testEntry = Entry{
	"socketPath":          "/var/run/meshless/cni.sock",
	"excludeInboundPorts": []int{15021},
	"logLevel":            "info",
}

func samples(t *testing.T) []string {
	t.Helper()
	files, err := sampleFiles(testdata)
	if err != nil || len(files) == 0 {
		t.Fatalf("no sample conflists in %s: %v", testdata, err)
	}
	return files
}

// sampleFiles lists the sample files (test helper).
func sampleFiles(dir string) ([]string, error) { return confFiles(dir) }

// copySample puts one sample file, with its mode, into a fresh dir.
func copySample(t *testing.T, src string) (dir, path string, orig []byte, mode os.FileMode) {
	t.Helper()
	orig, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(src)
	if err != nil {
		t.Fatal(err)
	}
	dir = t.TempDir()
	path = filepath.Join(dir, filepath.Base(src))
	if err := os.WriteFile(path, orig, fi.Mode().Perm()); err != nil {
		t.Fatal(err)
	}
	return dir, path, orig, fi.Mode().Perm()
}

func decode(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("decode: %v\n%s", err, b)
	}
	return m
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestInstallEverySample(t *testing.T) {
	for _, src := range samples(t) {
		t.Run(filepath.Base(src), func(t *testing.T) {
			dir, path, orig, mode := copySample(t, src)
			single := filepath.Ext(path) == ".conf"

			res, err := Install(dir, testEntry)
			if err != nil {
				t.Fatal(err)
			}
			want := path
			if single {
				want = strings.TrimSuffix(path, ".conf") + ".conflist"
				if res.Action != Converted || res.From != path {
					t.Fatalf("result %+v, want converted from %s", res, path)
				}
				if _, err := os.Stat(path); !os.IsNotExist(err) {
					t.Fatalf("the .conf is still there: %v", err)
				}
			} else if res.Action != Appended {
				t.Fatalf("result %+v, want appended", res)
			}
			if res.File != want {
				t.Fatalf("wrote %s, want %s", res.File, want)
			}
			if p, _ := FindPrimary(dir); p != want {
				t.Fatalf("primary is now %s, want %s", p, want)
			}
			fi, err := os.Stat(want)
			if err != nil || fi.Mode().Perm() != mode {
				t.Fatalf("mode of %s: %v %v, want %v", want, fi.Mode().Perm(), err, mode)
			}
			out, err := os.ReadFile(want)
			if err != nil {
				t.Fatal(err)
			}

			// libcni (what the runtime uses) loads it, and we are the last plugin.
			cl, err := libcni.ConfListFromFile(want)
			if err != nil {
				t.Fatalf("libcni cannot load the result: %v\n%s", err, out)
			}
			lastPlugin := cl.Plugins[len(cl.Plugins)-1]
			if lastPlugin.Network.Type != PluginType {
				t.Fatalf("last plugin is %q\n%s", lastPlugin.Network.Type, out)
			}
			ours := decode(t, lastPlugin.Bytes)
			for k, v := range testEntry {
				got, _ := json.Marshal(ours[k])
				exp, _ := json.Marshal(v)
				if !bytes.Equal(got, exp) {
					t.Errorf("our entry %s = %s, want %s", k, got, exp)
				}
			}

			// Decoded: everything but our entry equals the original (or, for a .conf, what
			// libcni's ConfListFromConf makes of it).
			got := decode(t, out)
			plugins := got["plugins"].([]any)
			got["plugins"] = plugins[:len(plugins)-1]
			var expect map[string]any
			if single {
				expect = decode(t, orig)
				expect = map[string]any{"cniVersion": expect["cniVersion"], "name": expect["name"], "plugins": []any{expect}}
			} else {
				expect = decode(t, orig)
			}
			if !reflect.DeepEqual(got, expect) {
				t.Fatalf("fields we do not own changed:\n got %v\nwant %v", got, expect)
			}

			// Byte level: every original plugin entry appears unchanged, and for a conflist
			// the whole original file is a prefix/suffix split around our insertion only.
			if single {
				if !bytes.Contains(out, bytes.TrimSpace(orig)) {
					t.Fatalf("the original object is not embedded verbatim:\n%s", out)
				}
			} else {
				l, err := parseList(orig)
				if err != nil {
					t.Fatal(err)
				}
				for i, s := range l.elems {
					if !bytes.Contains(out, orig[s.start:s.end]) {
						t.Errorf("plugins[%d] bytes changed", i)
					}
				}
				cut := l.elems[len(l.elems)-1].end
				if !bytes.HasPrefix(out, orig[:cut]) || !bytes.HasSuffix(out, orig[cut:]) {
					t.Fatalf("bytes outside our insertion changed:\n%s", out)
				}
			}

			// Idempotent: a second install writes nothing.
			res2, err := Install(dir, testEntry)
			if err != nil || res2.Action != Unchanged {
				t.Fatalf("second install: %+v %v", res2, err)
			}
			again, _ := os.ReadFile(want)
			if !bytes.Equal(again, out) {
				t.Fatal("second install changed the file")
			}

			// Uninstall removes only our entry: the original bytes come back.
			ures, err := Uninstall(dir)
			if err != nil {
				t.Fatal(err)
			}
			back, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, orig) {
				t.Fatalf("uninstall (%+v) did not restore the original:\n%s", ures, back)
			}
			if names := dirNames(t, dir); !reflect.DeepEqual(names, []string{filepath.Base(path)}) {
				t.Fatalf("files left after uninstall: %v", names)
			}
			if ures, err := Uninstall(dir); err != nil || ures.Action != Unchanged {
				t.Fatalf("second uninstall: %+v %v", ures, err)
			}
		})
	}
}

func TestSpecificSamples(t *testing.T) {
	install := func(name string) []byte {
		dir, _, _, _ := copySample(t, filepath.Join(testdata, name))
		res, err := Install(dir, testEntry)
		if err != nil {
			t.Fatal(err)
		}
		out, _ := os.ReadFile(res.File)
		return out
	}
	t.Run("istio-cni stays, we come after it", func(t *testing.T) {
		out := install("10-calico-with-istio-cni.conflist")
		cl, err := libcni.ConfListFromBytes(out)
		if err != nil {
			t.Fatal(err)
		}
		var types []string
		for _, p := range cl.Plugins {
			types = append(types, p.Network.Type)
		}
		if !reflect.DeepEqual(types, []string{"calico", "portmap", "istio-cni", PluginType}) {
			t.Fatalf("chain %v", types)
		}
	})
	t.Run("aws string mtu kept as a string", func(t *testing.T) {
		out := install("10-aws.conflist")
		if c := bytes.Count(out, []byte(`"mtu": "9001"`)); c != 2 {
			t.Fatalf(`"mtu": "9001" appears %d times:\n%s`, c, out)
		}
		if !bytes.Contains(out, []byte(`"disableCheck": true`)) {
			t.Fatal("disableCheck lost")
		}
	})
	t.Run("kindnet tab indentation followed", func(t *testing.T) {
		out := install("10-kindnet.conflist")
		if !bytes.Contains(out, []byte("\t},\n\t{\n\t\t\"type\": \"meshless-cni\",\n")) {
			t.Fatalf("our entry is not tab-indented like its neighbours:\n%s", out)
		}
	})
	t.Run("cilium single-plugin conflist", func(t *testing.T) {
		out := install("05-cilium.conflist")
		if !bytes.Contains(out, []byte("    },\n    {\n      \"type\": \"meshless-cni\",\n")) {
			t.Fatalf("unexpected layout:\n%s", out)
		}
	})
}

func TestFindPrimaryLexicalOrder(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"10-calico.conflist", "05-cilium.conflist", "00-notes.txt", ".00-x.conflist.tmp-1", "99-loopback.conf"} {
		os.WriteFile(filepath.Join(dir, n), []byte("{}"), 0o644)
	}
	os.Mkdir(filepath.Join(dir, "01-dir.conflist"), 0o755)
	p, err := FindPrimary(dir)
	if err != nil || filepath.Base(p) != "05-cilium.conflist" {
		t.Fatalf("primary %q %v", p, err)
	}
	if _, err := FindPrimary(t.TempDir()); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("empty dir: %v", err)
	}
	if _, err := FindPrimary(filepath.Join(dir, "missing")); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("missing dir: %v", err)
	}
}

func TestUpdateReplacesOnlyOurEntry(t *testing.T) {
	dir, path, orig, _ := copySample(t, filepath.Join(testdata, "10-flannel.conflist"))
	if _, err := Install(dir, testEntry); err != nil {
		t.Fatal(err)
	}
	res, err := Install(dir, Entry{"socketPath": "/run/other.sock"})
	if err != nil || res.Action != Updated {
		t.Fatalf("%+v %v", res, err)
	}
	out, _ := os.ReadFile(path)
	if bytes.Contains(out, []byte("15021")) || !bytes.Contains(out, []byte("/run/other.sock")) {
		t.Fatalf("entry not replaced:\n%s", out)
	}
	l, _ := parseList(orig)
	cut := l.elems[len(l.elems)-1].end
	if !bytes.HasPrefix(out, orig[:cut]) || !bytes.HasSuffix(out, orig[cut:]) {
		t.Fatalf("bytes outside our entry changed:\n%s", out)
	}
	if _, err := libcni.ConfListFromBytes(out); err != nil {
		t.Fatal(err)
	}
}

func TestPresentButNotLastIsLeftInPlace(t *testing.T) {
	// Another chainer put itself after us: we do not move (no fight over the last place).
	dir := t.TempDir()
	path := filepath.Join(dir, "10-x.conflist")
	doc := `{"cniVersion":"0.3.1","name":"x","plugins":[{"type":"bridge"},{"type":"meshless-cni"},{"type":"other"}]}`
	os.WriteFile(path, []byte(doc), 0o644)
	if res, err := Install(dir, Entry{}); err != nil || res.Action != Unchanged {
		t.Fatalf("%+v %v", res, err)
	}
	if res, err := Uninstall(dir); err != nil || res.Action != Removed {
		t.Fatalf("%+v %v", res, err)
	}
	out, _ := os.ReadFile(path)
	if string(out) != `{"cniVersion":"0.3.1","name":"x","plugins":[{"type":"bridge"},{"type":"other"}]}` {
		t.Fatalf("got %s", out)
	}
}

func TestJSONFiles(t *testing.T) {
	dir := t.TempDir()
	single := `{"cniVersion":"0.4.0","name":"n","type":"bridge"}`
	os.WriteFile(filepath.Join(dir, "10-n.json"), []byte(single), 0o644)
	res, err := Install(dir, Entry{})
	if err != nil || res.Action != Converted || filepath.Base(res.File) != "10-n.conflist" {
		t.Fatalf("%+v %v", res, err)
	}
	if _, err := libcni.ConfListFromFile(res.File); err != nil {
		t.Fatal(err)
	}
	if _, err := Uninstall(dir); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "10-n.json")); string(b) != single {
		t.Fatalf("not restored: %s (%v)", b, dirNames(t, dir))
	}

	dir = t.TempDir()
	list := `{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"bridge"}]}`
	p := filepath.Join(dir, "10-n.json")
	os.WriteFile(p, []byte(list), 0o644)
	if res, err := Install(dir, Entry{}); err != nil || res.Action != Appended || res.File != p {
		t.Fatalf("%+v %v", res, err)
	}
}

func TestConversionRefusedWhenAnotherFileWouldWin(t *testing.T) {
	dir, path, orig, _ := copySample(t, filepath.Join(testdata, "10-bridge.conf"))
	os.WriteFile(filepath.Join(dir, "10-bridge.conf-other.conflist"), []byte(`{"name":"o","plugins":[{"type":"x"}]}`), 0o644)
	if _, err := Install(dir, Entry{}); err == nil || !strings.Contains(err.Error(), "sorts between") {
		t.Fatalf("err %v", err)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, orig) {
		t.Fatal("file touched")
	}
}

func TestMalformedLeftUntouched(t *testing.T) {
	cases := map[string]string{
		"10-a.conflist": `{"name": "a", "plugins": [{"type": "bridge"},]}`,
		"10-b.conflist": `{"name": "b"}`,
		"10-c.conflist": `{"name": "c", "plugins": []}`,
		"10-d.conflist": `{"name": "d", "plugins": [{"notype": 1}]}`,
		"10-e.conflist": `[1, 2]`,
		"10-f.conf":     `{"name": "f"}`,
		"10-g.conf":     `{"name": "g", "type": "bridge"`,
		"10-h.conflist": ``,
	}
	for name, content := range cases {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, name)
			os.WriteFile(p, []byte(content), 0o644)
			_, err := Install(dir, testEntry)
			if err == nil || !strings.Contains(err.Error(), p) {
				t.Fatalf("want an error naming %s, got %v", p, err)
			}
			if b, _ := os.ReadFile(p); string(b) != content {
				t.Fatal("malformed file was modified")
			}
			if names := dirNames(t, dir); len(names) != 1 {
				t.Fatalf("files: %v", names)
			}
		})
	}
}

// recorder collects Watch reports.
type recorder struct {
	mu      sync.Mutex
	results []Result
	errs    []error
}

func (r *recorder) report(res Result, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.errs = append(r.errs, err)
	} else {
		r.results = append(r.results, res)
	}
}

func (r *recorder) counts() (int, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.results), len(r.errs)
}

func startWatch(t *testing.T, dir string) *recorder {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &recorder{}
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, dir, testEntry, 10*time.Millisecond, r.report) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Watch returned %v", err)
		}
	})
	return r
}

func chained(path string) bool {
	cl, err := libcni.ConfListFromFile(path)
	return err == nil && cl.Plugins[len(cl.Plugins)-1].Network.Type == PluginType
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWatchEmptyDirThenPrimaryArrives(t *testing.T) {
	dir := t.TempDir()
	r := startWatch(t, dir)
	eventually(t, "the empty dir to be reported", func() bool { _, e := r.counts(); return e >= 1 })
	time.Sleep(50 * time.Millisecond)
	if _, e := r.counts(); e != 1 {
		t.Fatalf("an empty dir was reported %d times, want once", e)
	}
	if !errors.Is(r.errs[0], ErrNoConfig) {
		t.Fatalf("err %v", r.errs[0])
	}
	orig, _ := os.ReadFile(filepath.Join(testdata, "10-calico.conflist"))
	path := filepath.Join(dir, "10-calico.conflist")
	if err := WriteFileAtomic(path, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the primary to be chained", func() bool { return chained(path) })
}

func TestWatchRechainsWithoutLoops(t *testing.T) {
	dir, path, orig, _ := copySample(t, filepath.Join(testdata, "10-calico.conflist"))
	r := startWatch(t, dir)
	eventually(t, "first chain", func() bool { return chained(path) })
	for i := 1; i <= 3; i++ {
		// The primary CNI rewrites its file (both as a rename and as an in-place write).
		if i%2 == 1 {
			if err := WriteFileAtomic(path, orig, 0o644); err != nil {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(path, orig, 0o644); err != nil {
			t.Fatal(err)
		}
		eventually(t, "re-chain", func() bool { return chained(path) })
	}
	// Settled: our own writes trigger nothing more.
	time.Sleep(30 * time.Millisecond)
	n, _ := r.counts()
	before, _ := os.ReadFile(path)
	time.Sleep(150 * time.Millisecond)
	m, e := r.counts()
	after, _ := os.ReadFile(path)
	if m != n || !bytes.Equal(before, after) {
		t.Fatalf("watcher keeps writing: %d -> %d reports", n, m)
	}
	if m < 2 || m > 4 || e != 0 {
		t.Fatalf("%d writes and %d errors for 1 install + 3 rewrites", m, e)
	}
	if bytes.Count(after, []byte(PluginType)) != 1 {
		t.Fatalf("our entry appears more than once:\n%s", after)
	}
}

func TestWatchMalformedThenFixed(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "10-calico.conflist")
	bad := []byte(`{"name": "k8s-pod-network", "plugins": [`)
	os.WriteFile(path, bad, 0o644)
	r := startWatch(t, dir)
	eventually(t, "the malformed file to be reported", func() bool { _, e := r.counts(); return e >= 1 })
	time.Sleep(50 * time.Millisecond)
	if _, e := r.counts(); e != 1 {
		t.Fatalf("reported %d times, want once", e)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, bad) {
		t.Fatal("malformed file touched")
	}
	orig, _ := os.ReadFile(filepath.Join(testdata, "10-calico.conflist"))
	os.WriteFile(path, orig, 0o644)
	eventually(t, "chain after the fix", func() bool { return chained(path) })
}
