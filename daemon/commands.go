package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/meshless/meshless/pkg/enroll"
	meshtls "github.com/meshless/meshless/pkg/tls"
)

func caInitCmd(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("ca init", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory to write ca.crt and ca.key into (created 0700 if missing)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("--dir is required")
	}
	if err := meshtls.InitCA(*dir, time.Now()); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s/ca.crt and %s/ca.key\n", *dir, *dir)
	return nil
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
