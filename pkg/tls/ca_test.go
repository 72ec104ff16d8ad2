package meshtls

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func TestInitCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "new", "ca")
	now := time.Now()
	if err := InitCA(dir, now); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]fs.FileMode{".": fs.ModeDir | 0o700, CACertFile: 0o644, CAKeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", name, fi.Mode(), want)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 {
		t.Errorf("CA dir holds %d entries, want ca.crt and ca.key only (temporary files left?)", len(entries))
	}

	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if block, _ := pem.Decode(keyPEM); block == nil || block.Type != "PRIVATE KEY" {
		t.Errorf("ca.key is not a PKCS#8 PEM block")
	} else if _, err := x509.ParsePKCS8PrivateKey(block.Bytes); err != nil {
		t.Errorf("ca.key: %v", err)
	}

	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	cert := ca.Certificate()
	if !cert.IsCA || !cert.BasicConstraintsValid {
		t.Error("not a CA certificate")
	}
	if cert.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("key usage %v, want CertSign|CRLSign", cert.KeyUsage)
	}
	if pub, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Errorf("public key %T, want ECDSA P-256", cert.PublicKey)
	}
	if got := cert.Subject.Organization; len(got) != 1 || got[0] != "meshless" {
		t.Errorf("subject O = %v, want meshless", got)
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		t.Errorf("not self-signed: %v", err)
	}
	if years := cert.NotAfter.Sub(now).Hours() / 24 / 365; years < 9.99 || years > 10.01 {
		t.Errorf("validity %.2f years, want 10", years)
	}
	if cert.SerialNumber.Sign() <= 0 || cert.SerialNumber.BitLen() > 128 {
		t.Errorf("serial %x is not a positive 128-bit number", cert.SerialNumber)
	}
	if len(ca.Authorities()) != 1 || !ca.Authorities()[0].Equal(cert) {
		t.Error("the trust bundle is not the CA certificate")
	}
}

func TestInitCARefusesOverwrite(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir, time.Now()); err != nil {
		t.Fatal(err)
	}
	before := readFiles(t, dir)
	err := InitCA(dir, time.Now())
	if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("second InitCA: err = %v, want a refusal", err)
	}
	if after := readFiles(t, dir); !bytes.Equal(before[CACertFile], after[CACertFile]) || !bytes.Equal(before[CAKeyFile], after[CAKeyFile]) {
		t.Error("second InitCA changed the CA")
	}

	// A lone key (a crash half-way through) is not overwritten either.
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, CAKeyFile), []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := InitCA(dir, time.Now()); !errors.Is(err, fs.ErrExist) {
		t.Errorf("InitCA over a lone ca.key: err = %v, want a refusal", err)
	}
}

func readFiles(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for _, name := range []string{CACertFile, CAKeyFile} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		files[name] = data
	}
	return files
}

func TestLoadCAErrors(t *testing.T) {
	good := t.TempDir()
	if err := InitCA(good, time.Now()); err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if err := InitCA(other, time.Now()); err != nil {
		t.Fatal(err)
	}
	goodFiles, otherFiles := readFiles(t, good), readFiles(t, other)

	// A leaf certificate and its key: a valid pair, but not a CA.
	leafSVID, err := newTestSource(t).ca.mint(mustID(t, testTD, "demo", "leaf"), time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leafCert, leafKey, err := leafSVID.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	truncated := append(bytes.Clone(goodFiles[CACertFile]), otherFiles[CACertFile][:100]...)

	for _, tc := range []struct {
		name      string
		cert, key []byte // nil: file absent
		wantErr   string
	}{
		{"missing certificate", nil, goodFiles[CAKeyFile], "ca.crt is missing (create one with `meshlessd ca init"},
		{"missing key", goodFiles[CACertFile], nil, "ca.key is missing"},
		{"malformed certificate", []byte("not a certificate"), goodFiles[CAKeyFile], "no PEM CERTIFICATE block found"},
		{"truncated second certificate", truncated, goodFiles[CAKeyFile], "unexpected data after certificate 1"},
		{"garbage DER", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")}), goodFiles[CAKeyFile], "certificate 1:"},
		{"key in certificate file", goodFiles[CAKeyFile], goodFiles[CAKeyFile], `unexpected PEM block "PRIVATE KEY", want CERTIFICATE`},
		{"malformed key", goodFiles[CACertFile], []byte("not a key"), "ca.key: no PEM block found"},
		{"certificate in key file", goodFiles[CACertFile], goodFiles[CACertFile], `unexpected PEM block "CERTIFICATE", want PRIVATE KEY`},
		{"mismatched key", goodFiles[CACertFile], otherFiles[CAKeyFile], "matches no certificate in"},
		{"not a CA", leafCert, leafKey, "is not a CA certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, data := range map[string][]byte{CACertFile: tc.cert, CAKeyFile: tc.key} {
				if data == nil {
					continue
				}
				if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_, err := LoadCA(dir)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("LoadCA: err = %v, want %q", err, tc.wantErr)
			}
		})
	}

	t.Run("missing directory", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "nope")
		_, err := LoadCA(dir)
		if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "does not exist (create one with `meshlessd ca init --dir "+dir) {
			t.Errorf("LoadCA: err = %v", err)
		}
	})
	t.Run("unreadable key", func(t *testing.T) {
		// A directory in place of the file: unreadable even for root, unlike chmod 0.
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, CACertFile), goodFiles[CACertFile], 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(filepath.Join(dir, CAKeyFile), 0o700); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadCA(dir); err == nil || !strings.Contains(err.Error(), "cannot read "+filepath.Join(dir, CAKeyFile)) {
			t.Errorf("LoadCA: err = %v, want 'cannot read'", err)
		}
	})
}

// TestLoadCARollOver checks a ca.crt holding the old and the new CA: the one matching ca.key
// signs, and SVIDs of both verify.
func TestLoadCARollOver(t *testing.T) {
	oldDir, newDir := t.TempDir(), t.TempDir()
	for _, dir := range []string{oldDir, newDir} {
		if err := InitCA(dir, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	oldFiles, newFiles := readFiles(t, oldDir), readFiles(t, newDir)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, CACertFile), append(oldFiles[CACertFile], newFiles[CACertFile]...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, CAKeyFile), newFiles[CAKeyFile], 0o600); err != nil {
		t.Fatal(err)
	}
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	oldCA, err := LoadCA(oldDir)
	if err != nil {
		t.Fatal(err)
	}
	newCA, err := LoadCA(newDir)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.Certificate().Equal(newCA.Certificate()) {
		t.Error("the signing CA is not the one matching ca.key")
	}
	if len(ca.Authorities()) != 2 {
		t.Fatalf("%d authorities, want 2", len(ca.Authorities()))
	}
	bundle := x509bundle.FromX509Authorities(testTD, ca.Authorities())
	id := mustID(t, testTD, "demo", "app")
	for name, signer := range map[string]*CA{"merged": ca, "old": oldCA} {
		svid, err := signer.mint(id, time.Now(), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
			t.Errorf("SVID of the %s CA does not verify against the merged bundle: %v", name, err)
		}
	}
}

// TestLoadCASEC1Key accepts the key format `openssl ecparam -genkey` writes.
func TestLoadCASEC1Key(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir, time.Now()); err != nil {
		t.Fatal(err)
	}
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(ca.key.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(dir, CAKeyFile)
	if err := os.Remove(keyPath); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCA(dir); err != nil {
		t.Errorf("LoadCA with a SEC 1 key: %v", err)
	}
}
