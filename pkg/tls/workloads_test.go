package meshtls

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadWorkloads(t *testing.T) {
	path := writeWorkloads(t, `{"demo/client": "client-sa", "demo/server": "server", "prod/db-0": "db"}`)
	w, err := LoadWorkloads(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ ns, name, want string }{
		{"demo", "client", "client-sa"},
		{"demo", "server", "server"},
		{"prod", "db-0", "db"},
		{"demo", "other", "default"},
		{"prod", "client", "default"},
	} {
		if got := w.ServiceAccount(tc.ns, tc.name); got != tc.want {
			t.Errorf("ServiceAccount(%s, %s) = %s, want %s", tc.ns, tc.name, got, tc.want)
		}
	}

	var none Workloads
	if got := none.ServiceAccount("demo", "client"); got != "default" {
		t.Errorf("nil Workloads: ServiceAccount = %s, want default", got)
	}
	if w, err := LoadWorkloads(""); err != nil || w.ServiceAccount("demo", "x") != "default" {
		t.Errorf("no file: %v, %v", w, err)
	}
	for _, content := range []string{`{}`, `null`} {
		w, err := LoadWorkloads(writeWorkloads(t, content))
		if err != nil || w.ServiceAccount("demo", "x") != "default" {
			t.Errorf("%s: %v, %v", content, w, err)
		}
	}
}

func TestLoadWorkloadsErrors(t *testing.T) {
	for _, tc := range []struct{ name, content, wantErr string }{
		{"not JSON", `demo/client: client`, "want a JSON object"},
		{"empty file", ``, "want a JSON object"},
		{"array", `["demo/client"]`, "want a JSON object"},
		{"number value", `{"demo/client": 1}`, "want a JSON object"},
		{"trailing data", `{"demo/client": "a"} {}`, "want a JSON object"},
		{"no slash", `{"client": "a"}`, `key "client": want namespace/name`},
		{"two slashes", `{"demo/client/x": "a"}`, `key "demo/client/x": want namespace/name`},
		{"empty namespace", `{"/client": "a"}`, `key "/client": want namespace/name`},
		{"empty name", `{"demo/": "a"}`, `key "demo/": want namespace/name`},
		{"bad namespace", `{"de mo/client": "a"}`, `key "de mo/client": namespace: path segment characters`},
		{"empty service account", `{"demo/client": ""}`, `service account "": path cannot contain empty segments`},
		{"bad service account", `{"demo/client": "a/b"}`, `service account "a/b": path segment characters`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeWorkloads(t, tc.content)
			_, err := LoadWorkloads(path)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), path) {
				t.Errorf("err = %v, want %q naming %s", err, tc.wantErr, path)
			}
		})
	}
	missing := filepath.Join(t.TempDir(), "nope.json")
	if _, err := LoadWorkloads(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing file: err = %v", err)
	}
}

func writeWorkloads(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "workloads.json")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}
