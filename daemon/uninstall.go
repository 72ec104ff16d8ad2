package main

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"time"

	"k8s.io/client-go/rest"

	"github.com/meshless/meshless/pkg/kube"
)

// uninstallFlags make a stopping meshless pod tell its removal (`kubectl delete -k install/`)
// from a restart, and clean up only on removal: install-cni --watch then unchains the plugin, and
// meshlessd releases the pods it serves, so that the node goes on as it was before meshless.
type uninstallFlags struct {
	onDelete  bool
	namespace string
	daemonSet string
}

func (u *uninstallFlags) register(fs *flag.FlagSet, what string) {
	fs.BoolVar(&u.onDelete, "uninstall-on-delete", false,
		"when stopped while meshless's DaemonSet or namespace is being deleted, "+what+" (needs the Kubernetes API)")
	fs.StringVar(&u.namespace, "pod-namespace", envOr("POD_NAMESPACE", "meshless-system"), "namespace of meshless's DaemonSet (default $POD_NAMESPACE)")
	fs.StringVar(&u.daemonSet, "daemonset", "meshless", "name of meshless's DaemonSet")
}

func (u *uninstallFlags) validate() error {
	if u.onDelete && (u.namespace == "" || u.daemonSet == "") {
		return errors.New("--uninstall-on-delete needs --pod-namespace and --daemonset")
	}
	return nil
}

// removal asks the API whether meshless is being removed. When the API cannot say, the answer is
// no: keeping the chain and the pods' capture fails closed, while removing them by mistake during
// an upgrade would let pods talk in plaintext.
func (u *uninstallFlags) removal(client rest.Interface, log *slog.Logger) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	gone, err := kube.Uninstalling(ctx, client, u.namespace, u.daemonSet)
	if err != nil {
		log.Warn("cannot tell whether meshless is being removed; keeping everything in place", "reason", err)
		return false
	}
	return gone
}
