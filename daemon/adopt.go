package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/meshless/meshless/pkg/adopt"
	"github.com/meshless/meshless/pkg/agent"
	"github.com/meshless/meshless/pkg/kube"
)

// adoptFlags are the `meshlessd run` flags about pods that run without meshless-cni having seen
// them (started before meshless was installed, or before the chain came back after a reboot).
// The CNI directories also serve to run meshless-cni again for pods it has seen, to repair their
// capture (agent.RefuseIPv6).
type adoptFlags struct {
	interval        time.Duration
	confDir, binDir string
	netnsDir        string
}

func (a *adoptFlags) register(fs *flag.FlagSet) {
	fs.DurationVar(&a.interval, "adopt-interval", 30*time.Second,
		"how often to look for running pods that meshless-cni has not seen, and enroll them (0: never; needs the Kubernetes API)")
	fs.StringVar(&a.confDir, "cni-conf-dir", "/etc/cni/net.d", "the host's CNI configuration dir, where meshless-cni is chained")
	fs.StringVar(&a.binDir, "cni-bin-dir", "/opt/cni/bin", "the host's CNI plugin dir, where meshless-cni is installed")
	fs.StringVar(&a.netnsDir, "netns-dir", "/var/run/netns", "where the container runtime pins pods' network namespaces")
}

func (a *adoptFlags) validate() error {
	if a.interval < 0 {
		return fmt.Errorf("--adopt-interval %s: must not be negative", a.interval)
	}
	if a.interval > 0 && (a.confDir == "" || a.binDir == "" || a.netnsDir == "") {
		return errors.New("--cni-conf-dir, --cni-bin-dir and --netns-dir must not be empty")
	}
	return nil
}

// adoptRunning enrolls, once the node's pod list has arrived and then every --adopt-interval,
// the running pods that meshless-cni has not seen.
func adoptRunning(ctx context.Context, f *runFlags, ag *agent.Agent, pods *kube.Pods, log *slog.Logger) {
	for !pods.Synced() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	ad := adopt.New(adopt.Config{
		Pods:       pods.List,
		Known:      ag.Known,
		NetnsDir:   f.adopt.netnsDir,
		CNIConfDir: f.adopt.confDir,
		CNIBinDir:  f.adopt.binDir,
		Log:        log,
	})
	ad.Run(ctx, f.adopt.interval)
}
