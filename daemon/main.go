// Command meshlessd is meshless's node daemon: it holds the workload
// identities of the node's pods and originates and terminates their mutual
// TLS inside each pod's network namespace.
//
//	meshlessd run      serve the node (enrollment socket, data path, health)
//	meshlessd ca init  create the built-in CA
//	meshlessd status   ask a running daemon how it is doing
//	meshlessd install-cni  install meshless-cni and chain it into the node's CNI conflist
package main

import (
	"fmt"
	"io"
	"os"
)

const usage = `usage: meshlessd <command> [flags]

commands:
  run      serve this node: enroll pods, carry their traffic over mTLS
  ca init  create a new CA (ca.crt, ca.key) for the built-in identity source
  status   print the status of the daemon serving a socket
  install-cni  copy meshless-cni into the CNI bin dir and chain it last in the primary
               conflist (--watch: keep it chained; --uninstall: take it out again)
`

func main() {
	os.Exit(dispatch(os.Args[1:], os.Stdout, os.Stderr))
}

func dispatch(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "run":
		err = runCmd(args[1:], stdout)
	case "ca":
		if len(args) < 2 || args[1] != "init" {
			fmt.Fprint(stderr, "usage: meshlessd ca init --dir DIR | --kubernetes-secret\n")
			return 2
		}
		err = caInitCmd(args[2:], stdout)
	case "status":
		err = statusCmd(args[1:], stdout)
	case "install-cni":
		err = installCNICmd(args[1:], stdout)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "meshlessd: unknown command %q\n%s", args[0], usage)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "meshlessd %s: %v\n", args[0], err)
		return 1
	}
	return 0
}
