package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	meshtls "github.com/meshless/meshless/pkg/tls"
)

// ca init --kubernetes-secret prints the Namespace and a Secret that decodes strictly into a v1
// Secret whose data is a CA LoadCA accepts, and writes no file.
func TestCAInitKubernetesSecret(t *testing.T) {
	var out bytes.Buffer
	if err := caInitCmd([]string{"--kubernetes-secret"}, &out); err != nil {
		t.Fatal(err)
	}
	docs := strings.Split(out.String(), "---\n")
	if len(docs) != 2 {
		t.Fatalf("want the Namespace and the Secret, got %d documents:\n%s", len(docs), out.String())
	}
	var ns corev1.Namespace
	if err := yaml.UnmarshalStrict([]byte(docs[0]), &ns); err != nil || ns.Kind != "Namespace" || ns.Name != "meshless-system" {
		t.Fatalf("first document: %+v, %v; want the Namespace meshless-system", ns, err)
	}
	var s corev1.Secret
	if err := yaml.UnmarshalStrict([]byte(docs[1]), &s); err != nil {
		t.Fatalf("decode Secret: %v\n%s", err, out.String())
	}
	if s.APIVersion != "v1" || s.Kind != "Secret" || s.Name != "meshless-ca" || s.Namespace != "meshless-system" ||
		s.Type != corev1.SecretTypeOpaque {
		t.Fatalf("unexpected Secret header: %+v", s.TypeMeta)
	}
	if len(s.Data) != 2 {
		t.Fatalf("data keys: got %d, want ca.crt and ca.key", len(s.Data))
	}
	dir := t.TempDir()
	for _, name := range []string{meshtls.CACertFile, meshtls.CAKeyFile} {
		if len(s.Data[name]) == 0 {
			t.Fatalf("data[%s] is empty", name)
		}
		if err := os.WriteFile(filepath.Join(dir, name), s.Data[name], 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ca, err := meshtls.LoadCA(dir)
	if err != nil {
		t.Fatalf("the Secret's CA does not load: %v", err)
	}
	if !ca.Certificate().IsCA {
		t.Fatal("ca.crt is not a CA certificate")
	}

	// Every run makes a new CA.
	var again bytes.Buffer
	if err := caInitCmd([]string{"--kubernetes-secret"}, &again); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(out.Bytes(), again.Bytes()) {
		t.Fatal("two runs printed the same CA")
	}
}

func TestCAInitFlags(t *testing.T) {
	var out bytes.Buffer
	if err := caInitCmd(nil, &out); err == nil {
		t.Fatal("no --dir and no --kubernetes-secret: want an error")
	}
	if err := caInitCmd([]string{"--kubernetes-secret", "--dir", t.TempDir()}, &out); err == nil {
		t.Fatal("--dir with --kubernetes-secret: want an error")
	}
	dir := filepath.Join(t.TempDir(), "ca")
	if err := caInitCmd([]string{"--dir", dir}, &out); err != nil {
		t.Fatal(err)
	}
	if _, err := meshtls.LoadCA(dir); err != nil {
		t.Fatal(err)
	}
}
