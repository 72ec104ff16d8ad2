package adopt

import (
	"encoding/json"
	"net"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshless/meshless/pkg/kube"
)

func TestPluginInputIsWhatARuntimeSends(t *testing.T) {
	prev := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{{Name: "eth0", Sandbox: "/var/run/netns/cni-1"}},
		IPs:        []*current.IPConfig{{Interface: current.Int(0), Address: net.IPNet{IP: net.IPv4(10, 244, 1, 7), Mask: net.CIDRMask(24, 32)}}},
	}
	withCap := []byte(`{"type":"meshless-cni","socketPath":"/run/m.sock","capabilities":{"io.kubernetes.cri.pod-annotations":true}}`)
	without := []byte(`{"type":"meshless-cni","socketPath":"/run/m.sock"}`)
	for _, tc := range []struct {
		name        string
		entry       []byte
		version     string
		annotations map[string]string
		wantRuntime string // runtimeConfig as JSON, "" for none
	}{
		{"capability declared", withCap, "1.0.0", map[string]string{"meshless.io/inject": "false"}, `{"io.kubernetes.cri.pod-annotations":{"meshless.io/inject":"false"}}`},
		{"capability declared, no annotations", withCap, "1.1.0", nil, `{"io.kubernetes.cri.pod-annotations":{}}`},
		{"capability not declared", without, "0.4.0", map[string]string{"a": "b"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := pluginInput(tc.entry, "k8s-pod-network", tc.version, prev, tc.annotations)
			if err != nil {
				t.Fatal(err)
			}
			var got map[string]json.RawMessage
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatal(err)
			}
			if string(got["name"]) != `"k8s-pod-network"` || string(got["cniVersion"]) != `"`+tc.version+`"` || string(got["socketPath"]) != `"/run/m.sock"` {
				t.Errorf("stdin %s: want the list's name and version and our entry's keys", out)
			}
			var pr struct {
				CNIVersion string `json:"cniVersion"`
				IPs        []struct {
					Address string `json:"address"`
				} `json:"ips"`
			}
			if err := json.Unmarshal(got["prevResult"], &pr); err != nil || pr.CNIVersion != tc.version || len(pr.IPs) != 1 || pr.IPs[0].Address != "10.244.1.7/24" {
				t.Errorf("prevResult %s (%v): want the pod's address in CNI %s", got["prevResult"], err, tc.version)
			}
			if string(got["runtimeConfig"]) != tc.wantRuntime {
				t.Errorf("runtimeConfig %s, want %s", got["runtimeConfig"], tc.wantRuntime)
			}
		})
	}
	if _, err := pluginInput([]byte(`{"type":`), "n", "1.0.0", prev, nil); err == nil {
		t.Error("a broken entry was accepted")
	}
}

func TestAdoptable(t *testing.T) {
	running := func(mutate func(p *kube.Pod)) *kube.Pod {
		p := &kube.Pod{Status: kube.PodStatus{Phase: kube.PodRunning, PodIPs: []kube.PodIP{{IP: "10.244.1.7"}}}}
		mutate(p)
		return p
	}
	now := metav1.Now()
	for name, tc := range map[string]struct {
		pod  *kube.Pod
		want bool
	}{
		"running":      {running(func(*kube.Pod) {}), true},
		"host network": {running(func(p *kube.Pod) { p.Spec.HostNetwork = true }), false},
		"pending":      {running(func(p *kube.Pod) { p.Status.Phase = "Pending" }), false},
		"no IP yet":    {running(func(p *kube.Pod) { p.Status.PodIPs = nil }), false},
		"terminating":  {running(func(p *kube.Pod) { p.DeletionTimestamp = &now }), false},
	} {
		if got := adoptable(tc.pod); got != tc.want {
			t.Errorf("%s: adoptable = %v, want %v", name, got, tc.want)
		}
	}
}
