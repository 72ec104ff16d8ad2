package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshless/meshless/pkg/cniconf"
	"github.com/meshless/meshless/pkg/enroll"
	"github.com/meshless/meshless/pkg/kube"
)

// installCNICmd is `meshlessd install-cni`: the DaemonSet's install step (and, with --watch,
// its watcher). It stops on SIGINT/SIGTERM.
func installCNICmd(args []string, stdout io.Writer) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return installCNI(ctx, args, stdout)
}

type installCNIFlags struct {
	binDir, confDir, plugin string
	watch, uninstall        bool
	interval                time.Duration
	logLevel                string
	entry                   cniconf.Entry
	onStop                  uninstallFlags
}

func parseInstallCNIFlags(args []string) (*installCNIFlags, error) {
	fs := flag.NewFlagSet("install-cni", flag.ContinueOnError)
	f := &installCNIFlags{}
	fs.StringVar(&f.binDir, "cni-bin-dir", "/host/opt/cni/bin", "the host's CNI plugin dir (mounted)")
	fs.StringVar(&f.confDir, "cni-conf-dir", "/host/etc/cni/net.d", "the host's CNI network configuration dir (mounted)")
	fs.StringVar(&f.plugin, "plugin-binary", "", "the meshless-cni binary to install (default: meshless-cni next to this executable)")
	fs.BoolVar(&f.watch, "watch", false, "after installing, keep the chain in place (re-chain when the primary CNI rewrites its file) until SIGTERM")
	fs.BoolVar(&f.uninstall, "uninstall", false, "remove our conflist entry and our binary, then exit")
	fs.DurationVar(&f.interval, "interval", cniconf.DefaultInterval, "with --watch: how often to look at the conf dir")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	f.onStop.register(fs, "with --watch: remove our conflist entry and our binary on the way out")
	socket := fs.String("socket", enroll.DefaultSocket, "plugin config socketPath: the daemon's enrollment socket")
	inPorts := fs.String("exclude-inbound-ports", "", "plugin config excludeInboundPorts: comma-separated ports")
	outPorts := fs.String("exclude-outbound-ports", "", "plugin config excludeOutboundPorts: comma-separated ports")
	outCIDRs := fs.String("exclude-outbound-cidrs", "", "plugin config excludeOutboundCIDRs: comma-separated CIDRs")
	pluginLevel := fs.String("plugin-log-level", "", "plugin config logLevel (empty: the plugin's default)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := f.onStop.validate(); err != nil {
		return nil, err
	}
	if f.binDir == "" || f.confDir == "" {
		return nil, errors.New("--cni-bin-dir and --cni-conf-dir must not be empty")
	}
	if !filepath.IsAbs(*socket) {
		return nil, fmt.Errorf("--socket %q must be an absolute path", *socket)
	}
	f.entry = cniconf.Entry{
		"socketPath": *socket,
		// containerd and CRI-O then pass the pod's annotations in runtimeConfig, so that the
		// daemon can honour meshless.io/inject without waiting for the pod in the API.
		"capabilities": map[string]bool{"io.kubernetes.cri.pod-annotations": true},
	}
	for _, p := range []struct {
		flag, key, val string
	}{{"exclude-inbound-ports", "excludeInboundPorts", *inPorts}, {"exclude-outbound-ports", "excludeOutboundPorts", *outPorts}} {
		ports, err := parsePortList(p.val)
		if err != nil {
			return nil, fmt.Errorf("--%s: %w", p.flag, err)
		}
		if len(ports) > 0 {
			f.entry[p.key] = ports
		}
	}
	if cidrs := splitList(*outCIDRs); len(cidrs) > 0 {
		for _, c := range cidrs {
			if _, err := netip.ParsePrefix(c); err != nil {
				return nil, fmt.Errorf("--exclude-outbound-cidrs: %q is not a CIDR such as 10.96.0.0/12", c)
			}
		}
		f.entry["excludeOutboundCIDRs"] = cidrs
	}
	if *pluginLevel != "" {
		var l slog.Level
		if err := l.UnmarshalText([]byte(*pluginLevel)); err != nil {
			return nil, fmt.Errorf("--plugin-log-level %q: %w", *pluginLevel, err)
		}
		f.entry["logLevel"] = *pluginLevel
	}
	if f.plugin == "" && !f.uninstall {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("cannot find meshless-cni next to this executable (use --plugin-binary): %w", err)
		}
		f.plugin = filepath.Join(filepath.Dir(exe), cniconf.PluginType)
	}
	return f, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func parsePortList(s string) ([]int, error) {
	var out []int
	for _, p := range splitList(s) {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("%q is not a port (1 to 65535)", p)
		}
		out = append(out, n)
	}
	return out, nil
}

func installCNI(ctx context.Context, args []string, stdout io.Writer) error {
	f, err := parseInstallCNIFlags(args)
	if err != nil {
		return err
	}
	log, err := newLogger(stdout, f.logLevel)
	if err != nil {
		return err
	}
	if f.uninstall {
		return uninstallCNI(f, log)
	}

	dst, copied, err := installPluginBinary(f.plugin, f.binDir)
	if err != nil {
		return err
	}
	log.Info("cni plugin binary", "path", dst, "source", f.plugin, "copied", copied)

	if !f.watch {
		res, err := cniconf.Install(f.confDir, f.entry)
		if err != nil {
			return err
		}
		log.Info("cni conf", "action", res.Action, "file", res.File, "from", res.From)
		return nil
	}
	log.Info("watching the CNI conf dir", "dir", f.confDir, "interval", f.interval.String())
	err = cniconf.Watch(ctx, f.confDir, f.entry, f.interval, func(res cniconf.Result, err error) {
		switch {
		case errors.Is(err, cniconf.ErrNoConfig):
			log.Info("waiting for the primary CNI to write its configuration", "dir", f.confDir)
		case err != nil:
			log.Error("cannot chain meshless-cni; will retry", "err", err)
		default:
			log.Info("cni conf", "action", res.Action, "file", res.File, "from", res.From)
		}
	})
	if !errors.Is(err, context.Canceled) {
		return err
	}
	log.Info("stopped watching the CNI conf dir")
	if f.onStop.onDelete {
		client, err := kube.NewClient("")
		if err != nil {
			log.Warn("cannot tell whether meshless is being removed; leaving the chain in place", "reason", err)
			return nil
		}
		if f.onStop.removal(client, log) {
			log.Info("meshless is being removed: unchaining meshless-cni")
			return uninstallCNI(f, log)
		}
	}
	return nil
}

// uninstallCNI removes our conflist entry and our binary.
func uninstallCNI(f *installCNIFlags, log *slog.Logger) error {
	res, err := cniconf.Uninstall(f.confDir)
	if err != nil {
		return err
	}
	log.Info("cni conf", "action", res.Action, "file", res.File, "from", res.From)
	bin := filepath.Join(f.binDir, cniconf.PluginType)
	switch err := os.Remove(bin); {
	case err == nil:
		log.Info("cni plugin binary removed", "path", bin)
	case !errors.Is(err, os.ErrNotExist):
		return err
	}
	return nil
}

// installPluginBinary copies src into binDir as meshless-cni, atomically (temp + rename) and
// with mode 0755; it does nothing if the installed binary is already identical.
func installPluginBinary(src, binDir string) (dst string, copied bool, err error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return "", false, fmt.Errorf("read the plugin binary: %w", err)
	}
	dst = filepath.Join(binDir, cniconf.PluginType)
	if old, err := os.ReadFile(dst); err == nil && bytes.Equal(old, data) {
		if fi, err := os.Stat(dst); err == nil && fi.Mode().Perm() == 0o755 {
			return dst, false, nil
		}
	}
	if err := cniconf.WriteFileAtomic(dst, data, 0o755); err != nil {
		return "", false, err
	}
	return dst, true, nil
}
