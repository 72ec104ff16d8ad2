package main

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshless/meshless/pkg/enroll"
)

var cniVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

func TestParseConfigDefaults(t *testing.T) {
	conf, err := parseConfig([]byte(`{"cniVersion":"1.1.0","name":"n","type":"meshless-cni"}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.SocketPath != enroll.DefaultSocket || conf.level != slog.LevelInfo ||
		len(conf.inboundPorts)+len(conf.outboundPorts)+len(conf.outboundCIDRs) != 0 {
		t.Errorf("defaults: %+v", conf)
	}
}

func TestParseConfigKeys(t *testing.T) {
	conf, err := parseConfig([]byte(`{
		"cniVersion": "1.0.0", "name": "n", "type": "meshless-cni",
		"socketPath": "/run/ml/cni.sock",
		"excludeInboundPorts": [15020, 22, 22],
		"excludeOutboundPorts": [1, 65535],
		"excludeOutboundCIDRs": ["10.96.0.0/12", " 169.254.169.254/32 ", "10.1.2.3/8", "fd00::/8"],
		"logLevel": "DEBUG"
	}`))
	if err != nil {
		t.Fatal(err)
	}
	wantCIDRs := []netip.Prefix{
		netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("169.254.169.254/32"),
		netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8"),
	}
	if conf.SocketPath != "/run/ml/cni.sock" || conf.level != slog.LevelDebug ||
		!slices.Equal(conf.inboundPorts, []uint16{15020, 22}) || !slices.Equal(conf.outboundPorts, []uint16{1, 65535}) ||
		!slices.Equal(conf.outboundCIDRs, wantCIDRs) {
		t.Errorf("parsed: socket %s level %v in %v out %v cidrs %v", conf.SocketPath, conf.level, conf.inboundPorts, conf.outboundPorts, conf.outboundCIDRs)
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name, conf string
		code       uint
		want       string
	}{
		{"not json", `{"name":`, types.ErrDecodingFailure, "cannot parse"},
		{"port as string", `{"excludeInboundPorts":["80"]}`, types.ErrDecodingFailure, "excludeInboundPorts"},
		{"port 0", `{"excludeInboundPorts":[0]}`, types.ErrInvalidNetworkConfig, "excludeInboundPorts[0] is 0; ports are 1 to 65535"},
		{"port too big", `{"excludeOutboundPorts":[80,65536]}`, types.ErrInvalidNetworkConfig, "excludeOutboundPorts[1] is 65536"},
		{"negative port", `{"excludeOutboundPorts":[-1]}`, types.ErrInvalidNetworkConfig, "excludeOutboundPorts[0] is -1"},
		{"bad cidr", `{"excludeOutboundCIDRs":["10.0.0.0"]}`, types.ErrInvalidNetworkConfig, `excludeOutboundCIDRs[0] "10.0.0.0" is not a CIDR`},
		{"bad level", `{"logLevel":"loud"}`, types.ErrInvalidNetworkConfig, `logLevel "loud"`},
		{"relative socket", `{"socketPath":"run/cni.sock"}`, types.ErrInvalidNetworkConfig, "must be an absolute path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig([]byte(tc.conf))
			var e *types.Error
			if !errors.As(err, &e) || e.Code != tc.code || !strings.Contains(e.Msg, tc.want) {
				t.Errorf("parseConfig = %#v, want code %d containing %q", err, tc.code, tc.want)
			}
		})
	}
}

// TestPrevResultEveryVersion parses a dual-stack prevResult in each supported version and finds
// the pod's own addresses, not the bridge's.
func TestPrevResultEveryVersion(t *testing.T) {
	want := []netip.Addr{netip.MustParseAddr("10.99.0.5"), netip.MustParseAddr("fd00:99::5")}
	for _, v := range cniVersions {
		t.Run(v, func(t *testing.T) {
			conf, err := parseConfig(netconf(t, v, nil, podResult("/var/run/netns/p")))
			if err != nil {
				t.Fatal(err)
			}
			prev, err := conf.prevResult()
			if err != nil {
				t.Fatal(err)
			}
			got, err := podIPs(prev)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Errorf("podIPs = %v, want %v", got, want)
			}
			if conf.PrevResult.Version() != v {
				t.Errorf("prevResult version %s, want %s", conf.PrevResult.Version(), v)
			}
		})
	}
}

func TestPodIPs(t *testing.T) {
	t.Run("addresses without an interface are the pod's", func(t *testing.T) {
		r := podResult("/p")
		r.IPs[1].Interface = nil
		got, err := podIPs(r)
		if err != nil || len(got) != 2 {
			t.Errorf("podIPs = %v, %v", got, err)
		}
	})
	t.Run("interface index out of range", func(t *testing.T) {
		r := podResult("/p")
		seven := 7
		r.IPs[1].Interface = &seven
		if _, err := podIPs(r); err == nil || !strings.Contains(err.Error(), "refers to interface 7") {
			t.Errorf("podIPs = %v", err)
		}
	})
	t.Run("no address in the sandbox", func(t *testing.T) {
		r := podResult("/p")
		r.IPs = r.IPs[:1]
		var e *types.Error
		if _, err := podIPs(r); !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, "IPAM") {
			t.Errorf("podIPs = %v", err)
		}
	})
}

func TestNoPrevResult(t *testing.T) {
	conf, err := parseConfig(netconf(t, "1.0.0", nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	_, err = conf.prevResult()
	var e *types.Error
	if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, "must be chained after a primary CNI plugin") {
		t.Errorf("prevResult() = %v", err)
	}
}

// TestRealConflists chains meshless-cni after each real CNI configuration and parses the
// configuration libcni would hand it, in that network's version.
func TestRealConflists(t *testing.T) {
	files, err := filepath.Glob("../pkg/cniconf/testdata/conflists/*.conf*")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no test conflists in ../pkg/cniconf/testdata/conflists")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var list map[string]any
			if err := json.Unmarshal(raw, &list); err != nil {
				t.Fatal(err)
			}
			if _, ok := list["plugins"]; !ok { // a single-plugin .conf: make it a list
				single := list
				list = map[string]any{"cniVersion": single["cniVersion"], "name": single["name"], "plugins": []any{single}}
			}
			list["plugins"] = append(list["plugins"].([]any), map[string]any{
				"type": "meshless-cni", "excludeInboundPorts": []int{15020}, "excludeOutboundCIDRs": []string{"169.254.169.254/32"},
			})
			b, err := json.Marshal(list)
			if err != nil {
				t.Fatal(err)
			}
			ncl, err := libcni.NetworkConfFromBytes(b)
			if err != nil {
				t.Fatalf("libcni rejects the chained list: %v", err)
			}
			ours := ncl.Plugins[len(ncl.Plugins)-1]
			injected, err := libcni.InjectConf(ours, map[string]any{
				"name": ncl.Name, "cniVersion": ncl.CNIVersion, "prevResult": resultAs(t, podResult("/p"), ncl.CNIVersion),
			})
			if err != nil {
				t.Fatal(err)
			}
			conf, err := parseConfig(injected.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			prev, err := conf.prevResult()
			if err != nil {
				t.Fatal(err)
			}
			if ips, err := podIPs(prev); err != nil || len(ips) != 2 {
				t.Errorf("podIPs = %v, %v", ips, err)
			}
			if conf.CNIVersion != ncl.CNIVersion || !slices.Equal(conf.inboundPorts, []uint16{15020}) {
				t.Errorf("parsed %+v", conf)
			}
		})
	}
}

func TestIdentity(t *testing.T) {
	for _, tc := range []struct {
		name, args, containerID string
		want                    podIdentity
		err                     string
	}{
		{
			name:        "kubernetes",
			args:        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=8b8f7f0e-3c1a;K8S_POD_INFRA_CONTAINER_ID=abc123",
			containerID: "abc123",
			want:        podIdentity{Namespace: "shop", Name: "web-0", UID: "8b8f7f0e-3c1a", InfraContainerID: "abc123"},
		},
		{
			name:        "unknown keys without IgnoreUnknown",
			args:        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;SOMETHING_ELSE=x",
			containerID: "abc",
			want:        podIdentity{Namespace: "shop", Name: "web-0"},
		},
		{
			name:        "no kubernetes args",
			args:        "",
			containerID: "4F2A_9c.81D0e55b77aa",
			want:        podIdentity{Namespace: "default", Name: "4f2a-9c-81d0", Fallback: true},
		},
		{name: "only the name", args: "K8S_POD_NAME=web-0", containerID: "abc", err: "must pass both or neither"},
		{name: "malformed", args: "K8S_POD_NAME", containerID: "abc", err: "cannot parse CNI_ARGS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := identity(&skel.CmdArgs{ContainerID: tc.containerID, Args: tc.args})
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("identity = %+v, %v; want error %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("identity = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestFallbackName(t *testing.T) {
	for in, want := range map[string]string{
		"0123456789abcdef0123": "0123456789ab",
		"ABC":                  "abc",
		"_._._._._._._._._":    "pod",
		"a_b":                  "a-b",
		"abcdefghijk_xyz":      "abcdefghijk",
	} {
		if got := fallbackName(in); got != want {
			t.Errorf("fallbackName(%q) = %q, want %q", in, got, want)
		}
	}
}
