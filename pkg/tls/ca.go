package meshtls

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// File names inside a CA directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

const (
	caValidity = 10 * 365 * 24 * time.Hour
	// clockSkew backdates every certificate so that a node whose clock is a little behind the
	// minting node's still accepts it.
	clockSkew = time.Minute
)

// CA is the built-in certificate authority: the key pair that signs SVIDs, and every CA
// certificate of its directory, which together form the trust bundle.
type CA struct {
	cert  *x509.Certificate
	key   crypto.Signer
	roots []*x509.Certificate
	// digest identifies the files the CA was read from (see caDigest).
	digest [sha256.Size]byte
}

// Certificate returns the CA certificate that signs new SVIDs.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// Authorities returns every CA certificate of ca.crt; peers chaining to any of them are trusted.
func (ca *CA) Authorities() []*x509.Certificate {
	return append([]*x509.Certificate(nil), ca.roots...)
}

// InitCA creates a new self-signed ECDSA P-256 CA in dir: ca.crt (mode 0644) and ca.key (mode 0600,
// PKCS#8 PEM). It creates dir (mode 0700) if needed and refuses to replace an existing CA, since
// every SVID minted by the old one would stop being trusted.
func InitCA(dir string, now time.Time) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("init CA: %w", err)
	}
	for _, name := range []string{CAKeyFile, CACertFile} {
		if _, err := os.Lstat(filepath.Join(dir, name)); err == nil {
			return fmt.Errorf("init CA: %s already exists: refusing to overwrite an existing CA: %w",
				filepath.Join(dir, name), fs.ErrExist)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("init CA: %w", err)
		}
	}

	certPEM, keyPEM, err := NewCAPEM(now)
	if err != nil {
		return err
	}

	// The key goes first: a crash in between leaves a key without a certificate, which LoadCA
	// reports, never a certificate whose key is lost.
	keyPath := filepath.Join(dir, CAKeyFile)
	if err := writeNewFile(keyPath, keyPEM, 0o600); err != nil {
		return fmt.Errorf("init CA: %w", err)
	}
	if err := writeNewFile(filepath.Join(dir, CACertFile), certPEM, 0o644); err != nil {
		// Only reached when our own key file was just put in place, so removing it is safe.
		os.Remove(keyPath)
		return fmt.Errorf("init CA: %w", err)
	}
	return syncDir(dir)
}

// NewCAPEM creates a new self-signed ECDSA P-256 CA in memory and returns its certificate and its
// key (PKCS#8) as PEM, the contents InitCA writes to ca.crt and ca.key.
func NewCAPEM(now time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("init CA: generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, fmt.Errorf("init CA: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"meshless"}, CommonName: "meshless CA"},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("init CA: create certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("init CA: encode key: %w", err)
	}

	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// writeNewFile writes data to path atomically and without replacing an existing file: a temporary
// file is filled and synced, then hard-linked into place (unlike rename, link fails when the
// target exists, so two concurrent InitCA calls cannot overwrite each other).
func writeNewFile(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	// Chmod rather than relying on the umask so the modes are exactly the documented ones.
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s already exists: refusing to overwrite an existing CA: %w", path, fs.ErrExist)
		}
		return err
	}
	return nil
}

// syncDir makes the new directory entries durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("init CA: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("init CA: sync %s: %w", dir, err)
	}
	return nil
}

// LoadCA reads the CA of dir, written by InitCA or by an operator. ca.crt may hold several CA
// certificates (a CA roll-over): the one matching ca.key signs, all of them are trusted.
func LoadCA(dir string) (*CA, error) {
	certPEM, keyPEM, err := readCADir(dir)
	if err != nil {
		return nil, err
	}
	return parseCA(dir, certPEM, keyPEM)
}

// readCADir returns the contents of dir's ca.crt and ca.key.
func readCADir(dir string) (certPEM, keyPEM []byte, err error) {
	hint := fmt.Sprintf("(create one with `meshlessd ca init --dir %s`)", dir)
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, nil, fmt.Errorf("load CA: directory %s does not exist %s: %w", dir, hint, err)
	case err != nil:
		return nil, nil, fmt.Errorf("load CA: %w", err)
	case !fi.IsDir():
		return nil, nil, fmt.Errorf("load CA: %s is not a directory", dir)
	}
	if certPEM, err = readCAFile(filepath.Join(dir, CACertFile), hint); err != nil {
		return nil, nil, err
	}
	if keyPEM, err = readCAFile(filepath.Join(dir, CAKeyFile), hint); err != nil {
		return nil, nil, err
	}
	return certPEM, keyPEM, nil
}

// parseCA builds the CA of dir from the contents of its two files.
func parseCA(dir string, certPEM, keyPEM []byte) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	roots, err := parseCACerts(certPath, certPEM)
	if err != nil {
		return nil, err
	}
	key, err := parseCAKey(keyPath, keyPEM)
	if err != nil {
		return nil, err
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return nil, fmt.Errorf("load CA: %s: unsupported key type %T", keyPath, key)
	}
	for _, cert := range roots {
		if pub.Equal(cert.PublicKey) {
			return &CA{cert: cert, key: key, roots: roots, digest: caDigest(certPEM, keyPEM)}, nil
		}
	}
	return nil, fmt.Errorf("load CA: the key in %s matches no certificate in %s", keyPath, certPath)
}

// caDigest identifies the contents of a CA directory, so that a watcher can tell when they change.
func caDigest(certPEM, keyPEM []byte) [sha256.Size]byte {
	h := sha256.New()
	h.Write(certPEM)
	// A separator, so that bytes moved from one file to the other still count as a change.
	h.Write([]byte{0})
	h.Write(keyPEM)
	return [sha256.Size]byte(h.Sum(nil))
}

func readCAFile(path, hint string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("load CA: %s is missing %s: %w", path, hint, err)
	}
	if err != nil {
		return nil, fmt.Errorf("load CA: cannot read %s: %w", path, err)
	}
	return data, nil
}

func parseCACerts(path string, data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			if len(bytes.TrimSpace(rest)) > 0 && len(certs) > 0 {
				return nil, fmt.Errorf("load CA: %s: unexpected data after certificate %d", path, len(certs))
			}
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("load CA: %s: unexpected PEM block %q, want CERTIFICATE", path, block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("load CA: %s: certificate %d: %w", path, len(certs)+1, err)
		}
		if !cert.BasicConstraintsValid || !cert.IsCA {
			return nil, fmt.Errorf("load CA: %s: certificate %d (%s) is not a CA certificate", path, len(certs)+1, cert.Subject)
		}
		if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
			return nil, fmt.Errorf("load CA: %s: certificate %d (%s) may not sign certificates (no keyCertSign usage)", path, len(certs)+1, cert.Subject)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("load CA: %s: no PEM CERTIFICATE block found", path)
	}
	return certs, nil
}

func parseCAKey(path string, data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("load CA: %s: no PEM block found", path)
	}
	var key any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY": // what `openssl ecparam -genkey` writes
		key, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("load CA: %s: unexpected PEM block %q, want PRIVATE KEY (PKCS#8)", path, block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", path, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("load CA: %s: key type %T cannot sign", path, key)
	}
	return signer, nil
}

// mint issues an X.509-SVID for id, valid from now (backdated by clockSkew) for ttl, but never
// beyond the CA's own expiry.
func (ca *CA) mint(id spiffeid.ID, now time.Time, ttl time.Duration) (*x509svid.SVID, error) {
	if !now.Before(ca.cert.NotAfter) {
		return nil, fmt.Errorf("mint SVID for %s: CA certificate expired at %s", id, ca.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(ttl)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("mint SVID for %s: generate key: %w", id, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("mint SVID for %s: %w", id, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		URIs:                  []*url.URL{id.URL()},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return nil, fmt.Errorf("mint SVID for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("mint SVID for %s: %w", id, err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key}, nil
}

// randomSerial returns a random positive 128-bit serial number.
func randomSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("serial number: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}
