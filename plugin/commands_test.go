package main

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

const k8sArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=8b8f7f0e-3c1a-4e0b-9a57-3f0d2b8a1c11;K8S_POD_INFRA_CONTAINER_ID=c0ffee01"

func TestVersion(t *testing.T) {
	o := run(t, invocation{command: "VERSION"})
	o.ok(t)
	var v struct {
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(o.stdout, &v); err != nil || !slices.Equal(v.SupportedVersions, cniVersions) {
		t.Errorf("VERSION = %s (%v)", o.stdout, err)
	}
}

func TestAddWithoutPrevResult(t *testing.T) {
	for _, v := range cniVersions {
		t.Run(v, func(t *testing.T) {
			o := run(t, invocation{command: "ADD", containerID: "c0ffee01", netns: "/nonexistent", ifName: "eth0",
				args: k8sArgs, stdin: netconf(t, v, map[string]any{"socketPath": missingSocket(t)}, nil)})
			e := o.cniError(t)
			if e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, "must be chained after a primary CNI plugin") {
				t.Errorf("error = %+v", e)
			}
		})
	}
}

func TestAddBrokenConfig(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stdin string
		code  uint
		want  string
	}{
		{"not json", `{"cniVersion":"1.0.0","name":"mlnet",`, types.ErrDecodingFailure, "unmarshal"},
		{"bad port", `{"cniVersion":"1.0.0","name":"mlnet","type":"meshless-cni","excludeInboundPorts":[70000]}`, types.ErrInvalidNetworkConfig, "excludeInboundPorts[0] is 70000"},
		{"bad cidr", `{"cniVersion":"1.0.0","name":"mlnet","type":"meshless-cni","excludeOutboundCIDRs":["x"]}`, types.ErrInvalidNetworkConfig, "excludeOutboundCIDRs[0]"},
		{"unsupported version", `{"cniVersion":"0.2.0","name":"mlnet","type":"meshless-cni"}`, types.ErrIncompatibleCNIVersion, "incompatible"},
		{"bad prevResult", `{"cniVersion":"1.0.0","name":"mlnet","type":"meshless-cni","prevResult":{"ips":[{"address":"banana"}]}}`, types.ErrDecodingFailure, "prevResult"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := run(t, invocation{command: "ADD", containerID: "c0ffee01", netns: "/nonexistent", ifName: "eth0", stdin: []byte(tc.stdin)})
			e := o.cniError(t)
			if e.Code != tc.code || !strings.Contains(e.Error(), tc.want) {
				t.Errorf("error = %+v, want code %d containing %q", e, tc.code, tc.want)
			}
		})
	}
}

func TestDelWithoutDaemon(t *testing.T) {
	sock := missingSocket(t)
	o := run(t, invocation{command: "DEL", containerID: "c0ffee01", ifName: "eth0", args: k8sArgs,
		stdin: netconf(t, "1.0.0", map[string]any{"socketPath": sock}, nil)})
	o.ok(t)
	if len(o.stdout) != 0 {
		t.Errorf("DEL wrote to stdout: %s", o.stdout)
	}
	if !strings.Contains(string(o.stderr), "meshlessd unreachable") || !strings.Contains(string(o.stderr), sock) {
		t.Errorf("stderr does not explain the unreachable daemon: %s", o.stderr)
	}
}

func TestDelUnknownPod(t *testing.T) {
	d := startDaemon(t, "nft")
	for range 2 {
		o := run(t, invocation{command: "DEL", containerID: "c0ffee01", netns: "/var/run/netns/gone", ifName: "eth0",
			stdin: netconf(t, "0.3.1", map[string]any{"socketPath": d.socket}, nil)})
		o.ok(t)
	}
	if !slices.Equal(d.removes, []string{"c0ffee01", "c0ffee01"}) {
		t.Errorf("daemon removes = %q", d.removes)
	}
}

func TestGC(t *testing.T) {
	d := startDaemon(t, "nft")
	d.pods["stale"] = podFor("stale")
	d.pods["a"] = podFor("a")
	conf := netconf(t, "1.1.0", map[string]any{"socketPath": d.socket, "cni.dev/valid-attachments": []map[string]string{
		{"containerID": "a", "ifname": "eth0"}, {"containerID": "a", "ifname": "net1"}, {"containerID": "b", "ifname": "eth0"},
	}}, nil)
	run(t, invocation{command: "GC", stdin: conf}).ok(t)
	if len(d.keeps) != 1 || !slices.Equal(d.keeps[0], []string{"a", "b"}) {
		t.Errorf("daemon got keep lists %q, want [[a b]]", d.keeps)
	}
	if _, ok := d.pod("stale"); ok {
		t.Error("stale pod survived GC")
	}

	t.Run("empty list", func(t *testing.T) {
		conf := netconf(t, "1.1.0", map[string]any{"socketPath": d.socket, "cni.dev/valid-attachments": []any{}}, nil)
		run(t, invocation{command: "GC", stdin: conf}).ok(t)
		if got := d.keeps[len(d.keeps)-1]; got == nil || len(got) != 0 {
			t.Errorf("keep = %#v, want an empty list", got)
		}
	})
	t.Run("missing list", func(t *testing.T) {
		n := len(d.keeps)
		e := run(t, invocation{command: "GC", stdin: netconf(t, "1.1.0", map[string]any{"socketPath": d.socket}, nil)}).cniError(t)
		if e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, "cni.dev/valid-attachments") || len(d.keeps) != n {
			t.Errorf("error = %+v; daemon called %d times", e, len(d.keeps)-n)
		}
	})
	t.Run("daemon down", func(t *testing.T) {
		conf := netconf(t, "1.1.0", map[string]any{"socketPath": missingSocket(t), "cni.dev/valid-attachments": []any{}}, nil)
		if e := run(t, invocation{command: "GC", stdin: conf}).cniError(t); e.Code != types.ErrTryAgainLater {
			t.Errorf("error = %+v", e)
		}
	})
}

func TestStatus(t *testing.T) {
	t.Run("socket missing", func(t *testing.T) {
		sock := missingSocket(t)
		e := run(t, invocation{command: "STATUS", stdin: netconf(t, "1.1.0", map[string]any{"socketPath": sock}, nil)}).cniError(t)
		if e.Code != types.ErrPluginNotAvailable || !strings.Contains(e.Msg, sock) || !strings.Contains(e.Msg, "is the meshless DaemonSet running") {
			t.Errorf("error = %+v", e)
		}
	})
	d := startDaemon(t, "nft")
	conf := netconf(t, "1.1.0", map[string]any{"socketPath": d.socket}, nil)
	t.Run("ready", func(t *testing.T) {
		o := run(t, invocation{command: "STATUS", stdin: conf})
		o.ok(t)
		if len(o.stdout) != 0 {
			t.Errorf("STATUS wrote to stdout: %s", o.stdout)
		}
	})
	t.Run("not ready", func(t *testing.T) {
		d.mu.Lock()
		d.status.Ready = false
		d.mu.Unlock()
		e := run(t, invocation{command: "STATUS", stdin: conf}).cniError(t)
		if e.Code != types.ErrPluginNotAvailable || !strings.Contains(e.Msg, "not ready") {
			t.Errorf("error = %+v", e)
		}
	})
}
