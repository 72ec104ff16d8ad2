package harness

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	meshtls "github.com/meshless/meshless/pkg/tls"
)

// Certs are the files of the reference proxies' credentials: the cluster's CA certificate, and
// for each side an ECDSA P-256 leaf signed by the cluster's CA, as separate certificate and key
// files (stunnel) and as one PEM holding both (haproxy).
type Certs struct {
	CA                               string
	ClientCert, ClientKey, ClientPEM string
	ServerCert, ServerKey, ServerPEM string
}

// MintCerts signs a client and a server leaf with the CA in caDir (as `meshlessd ca init` wrote
// it) and writes them to dir. The leaves carry SPIFFE IDs like meshless's SVIDs and both TLS
// usages, so the references authenticate the same way meshless does: one CA, ECDSA P-256.
func MintCerts(caDir, dir, trustDomain string) (Certs, error) {
	caPEM, err := os.ReadFile(filepath.Join(caDir, meshtls.CACertFile))
	if err != nil {
		return Certs{}, fmt.Errorf("reading the CA: %w", err)
	}
	caCert, err := parsePEM(caPEM, "CERTIFICATE", x509.ParseCertificate)
	if err != nil {
		return Certs{}, fmt.Errorf("CA certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(caDir, meshtls.CAKeyFile))
	if err != nil {
		return Certs{}, fmt.Errorf("reading the CA key: %w", err)
	}
	caKey, err := parsePEM(keyPEM, "PRIVATE KEY", x509.ParsePKCS8PrivateKey)
	if err != nil {
		return Certs{}, fmt.Errorf("CA key: %w", err)
	}
	signer, ok := caKey.(crypto.Signer)
	if !ok {
		return Certs{}, fmt.Errorf("CA key of type %T cannot sign", caKey)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Certs{}, err
	}
	c := Certs{CA: filepath.Join(caDir, meshtls.CACertFile)}
	for _, side := range []struct {
		name            string
		cert, key, both *string
	}{{"client", &c.ClientCert, &c.ClientKey, &c.ClientPEM}, {"server", &c.ServerCert, &c.ServerKey, &c.ServerPEM}} {
		id := fmt.Sprintf("spiffe://%s/ns/bench/sa/proxy-%s", trustDomain, side.name)
		certPEM, keyPEM, err := mintLeaf(caCert, signer, id)
		if err != nil {
			return Certs{}, err
		}
		*side.cert = filepath.Join(dir, side.name+".crt")
		*side.key = filepath.Join(dir, side.name+".key")
		*side.both = filepath.Join(dir, side.name+".pem")
		for path, data := range map[string][]byte{*side.cert: certPEM, *side.key: keyPEM, *side.both: append(append([]byte{}, certPEM...), keyPEM...)} {
			if err := os.WriteFile(path, data, 0o600); err != nil {
				return Certs{}, fmt.Errorf("writing %s: %w", path, err)
			}
		}
	}
	return c, nil
}

func parsePEM[T any](data []byte, typ string, parse func([]byte) (T, error)) (T, error) {
	var zero T
	block, _ := pem.Decode(data)
	if block == nil || block.Type != typ {
		return zero, errors.New("no " + typ + " PEM block")
	}
	return parse(block.Bytes)
}

func mintLeaf(ca *x509.Certificate, caKey crypto.Signer, id string) (certPEM, keyPEM []byte, err error) {
	u, err := url.Parse(id)
	if err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating a key for %s: %w", id, err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: u.Path},
		URIs:                  []*url.URL{u},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("signing %s: %w", id, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}
