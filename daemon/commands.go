package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/meshless/meshless/pkg/enroll"
	meshtls "github.com/meshless/meshless/pkg/tls"
)

// The Secret `meshlessd ca init --kubernetes-secret` prints: install/daemonset.yaml mounts it as
// the daemon's --ca-dir.
const (
	caSecretName      = "meshless-ca"
	caSecretNamespace = "meshless-system"
)

func caInitCmd(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("ca init", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory to write ca.crt and ca.key into (created 0700 if missing)")
	secret := fs.Bool("kubernetes-secret", false, "instead of writing files, print a v1 Secret "+
		caSecretName+" holding ca.crt and ca.key, with its Namespace "+caSecretNamespace+", for kubectl apply -f -")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *secret {
		if *dir != "" {
			return fmt.Errorf("--dir and --kubernetes-secret exclude each other")
		}
		certPEM, keyPEM, err := meshtls.NewCAPEM(time.Now())
		if err != nil {
			return err
		}
		_, err = io.WriteString(stdout, caSecretManifest(certPEM, keyPEM))
		return err
	}
	if *dir == "" {
		return fmt.Errorf("--dir or --kubernetes-secret is required")
	}
	if err := meshtls.InitCA(*dir, time.Now()); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s/ca.crt and %s/ca.key\n", *dir, *dir)
	return nil
}

// caSecretManifest is the YAML of the CA Secret, preceded by its Namespace (the one install/
// creates), so that it applies before or after `kubectl apply -k install/`. Base64 needs no YAML
// quoting, so the manifest is written directly.
func caSecretManifest(certPEM, keyPEM []byte) string {
	return "apiVersion: v1\n" +
		"kind: Namespace\n" +
		"metadata:\n" +
		"  name: " + caSecretNamespace + "\n" +
		"---\n" +
		"apiVersion: v1\n" +
		"kind: Secret\n" +
		"metadata:\n" +
		"  name: " + caSecretName + "\n" +
		"  namespace: " + caSecretNamespace + "\n" +
		"  labels:\n" +
		"    app.kubernetes.io/name: meshless\n" +
		"type: Opaque\n" +
		"data:\n" +
		"  " + meshtls.CACertFile + ": " + base64.StdEncoding.EncodeToString(certPEM) + "\n" +
		"  " + meshtls.CAKeyFile + ": " + base64.StdEncoding.EncodeToString(keyPEM) + "\n"
}

func statusCmd(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	socket := fs.String("socket", enroll.DefaultSocket, "the daemon's enrollment socket")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := enroll.NewClient(*socket).Status(ctx)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(st)
}
