package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshless/meshless/pkg/enroll"
)

// Config is the plugin's network configuration.
type Config struct {
	types.NetConf

	SocketPath           string   `json:"socketPath,omitempty"`
	ExcludeInboundPorts  []int    `json:"excludeInboundPorts,omitempty"`
	ExcludeOutboundPorts []int    `json:"excludeOutboundPorts,omitempty"`
	ExcludeOutboundCIDRs []string `json:"excludeOutboundCIDRs,omitempty"`
	LogLevel             string   `json:"logLevel,omitempty"`
	// RuntimeConfig holds what the runtime passes for the capabilities our conflist entry
	// declares (install-cni declares io.kubernetes.cri.pod-annotations).
	RuntimeConfig struct {
		// PodAnnotations is nil when the runtime did not pass them (then meshlessd reads them
		// from the Kubernetes API).
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations"`
	} `json:"runtimeConfig"`

	// Parsed from the fields above by parseConfig.
	inboundPorts  []uint16
	outboundPorts []uint16
	outboundCIDRs []netip.Prefix
	level         slog.Level
}

// parseConfig decodes and checks the configuration on stdin; errors are CNI errors that name
// the offending key. prevResult is left raw: only ADD and CHECK need it (see prevResult).
func parseConfig(stdin []byte) (*Config, error) {
	conf := &Config{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("cannot parse the meshless-cni network configuration: %v", err), "")
	}
	invalid := func(format string, a ...any) error {
		return types.NewError(types.ErrInvalidNetworkConfig, "meshless-cni network configuration: "+fmt.Sprintf(format, a...), "")
	}
	if conf.SocketPath == "" {
		conf.SocketPath = enroll.DefaultSocket
	}
	if !filepath.IsAbs(conf.SocketPath) {
		return nil, invalid("socketPath %q must be an absolute path", conf.SocketPath)
	}
	var err error
	if conf.inboundPorts, err = parsePorts("excludeInboundPorts", conf.ExcludeInboundPorts); err != nil {
		return nil, invalid("%v", err)
	}
	if conf.outboundPorts, err = parsePorts("excludeOutboundPorts", conf.ExcludeOutboundPorts); err != nil {
		return nil, invalid("%v", err)
	}
	for i, s := range conf.ExcludeOutboundCIDRs {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, invalid("excludeOutboundCIDRs[%d] %q is not a CIDR such as 10.96.0.0/12 or fd00::/8", i, s)
		}
		// iptables matches 10.1.2.3/8 as 10.0.0.0/8; normalising here keeps the rules (and CHECK) stable.
		conf.outboundCIDRs = append(conf.outboundCIDRs, p.Masked())
	}
	if conf.level, err = parseLevel(conf.LogLevel); err != nil {
		return nil, invalid("%v", err)
	}
	return conf, nil
}

func parsePorts(key string, ports []int) ([]uint16, error) {
	out := make([]uint16, 0, len(ports))
	for i, p := range ports {
		if p < 1 || p > 65535 {
			return nil, fmt.Errorf("%s[%d] is %d; ports are 1 to 65535", key, i, p)
		}
		if !slices.Contains(out, uint16(p)) {
			out = append(out, uint16(p))
		}
	}
	return out, nil
}

func parseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "", "info":
		return slog.LevelInfo, nil
	case "debug":
		return slog.LevelDebug, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("logLevel %q is not one of debug, info, warn, error", s)
}

// logger writes to stderr: stdout is reserved for the CNI result.
func (c *Config) logger(command string) *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: c.level})).
		With("plugin", "meshless-cni", "cmd", command)
}

// prevResult parses the result of the plugins before this one in the chain, or reports that
// there is none: meshless-cni has nothing to attach to on its own.
func (c *Config) prevResult() (*current.Result, error) {
	if err := version.ParsePrevResult(&c.NetConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("cannot parse prevResult: %v", err), "")
	}
	if c.PrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			"meshless-cni got no prevResult: it must be chained after a primary CNI plugin (bridge, Calico, Flannel, ...) in a conflist, not used on its own",
			"")
	}
	r, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("cannot convert prevResult: %v", err), "")
	}
	return r, nil
}

// podIPs returns the pod's own addresses from prevResult: those on an interface inside the
// sandbox, and those not tied to any interface. Addresses of host-side interfaces (a bridge,
// the host end of a veth) are not the pod's.
func podIPs(r *current.Result) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, ipc := range r.IPs {
		if ipc.Interface != nil {
			i := *ipc.Interface
			if i < 0 || i >= len(r.Interfaces) {
				return nil, types.NewError(types.ErrInvalidNetworkConfig,
					fmt.Sprintf("prevResult address %s refers to interface %d, but prevResult lists %d interfaces (is the primary CNI plugin broken?)", ipc.Address.String(), i, len(r.Interfaces)), "")
			}
			if r.Interfaces[i].Sandbox == "" {
				continue
			}
		}
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("prevResult holds an invalid address %q", ipc.Address.String()), "")
		}
		if a = a.Unmap(); !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			"prevResult gives the pod no IP address: meshless-cni must come after the plugin that assigns the pod's addresses (IPAM)", "")
	}
	return out, nil
}
