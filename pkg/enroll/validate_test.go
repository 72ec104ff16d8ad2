package enroll

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// selfNetns is a network namespace path that exists for every process, root or not.
const selfNetns = "/proc/self/ns/net"

func validPod() Pod {
	return Pod{
		ContainerID: "0123456789abcdef",
		IfName:      "eth0",
		Netns:       selfNetns,
		Namespace:   "default",
		Name:        "web-7d4b9c6f5-x2x9q",
		UID:         "8b8f7f0e-3c1a-4e0b-9a57-3f0d2b8a1c11",
		IPs:         []netip.Addr{netip.MustParseAddr("10.244.1.7"), netip.MustParseAddr("fd00:10:244::7")},
	}
}

func TestValidateAcceptsValidPods(t *testing.T) {
	cases := map[string]func(p *Pod){
		"as is":             func(*Pod) {},
		"no uid":            func(p *Pod) { p.UID = "" },
		"dotted name":       func(p *Pod) { p.Name = "a.b.c" },
		"one ipv4":          func(p *Pod) { p.IPs = p.IPs[:1] },
		"id with _ . -":     func(p *Pod) { p.ContainerID = "A1_b.c-d" },
		"256-char id":       func(p *Pod) { p.ContainerID = strings.Repeat("a", 256) },
		"15-char ifname":    func(p *Pod) { p.IfName = "net1234567890ab" },
		"63-char namespace": func(p *Pod) { p.Namespace = strings.Repeat("n", 63) },
		"annotations":       func(p *Pod) { p.Annotations = map[string]string{"meshless.io/inject": "false"} },
		"no annotations":    func(p *Pod) { p.Annotations = map[string]string{} },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			p := validPod()
			mutate(&p)
			if err := p.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
		})
	}
}

func TestValidateRejectsBadFields(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "file")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		mutate func(p *Pod)
		want   string // a fragment of the message that tells the user what is wrong
	}{
		{"empty id", func(p *Pod) { p.ContainerID = "" }, "containerID is empty"},
		{"id starts with -", func(p *Pod) { p.ContainerID = "-abc" }, "containerID"},
		{"id with slash", func(p *Pod) { p.ContainerID = "abc/def" }, "containerID"},
		{"id too long", func(p *Pod) { p.ContainerID = strings.Repeat("a", 257) }, "at most 256"},
		{"empty ifname", func(p *Pod) { p.IfName = "" }, "ifName is empty"},
		{"long ifname", func(p *Pod) { p.IfName = "eth0123456789abc" }, "longer than 15"},
		{"ifname with slash", func(p *Pod) { p.IfName = "eth/0" }, "ifName"},
		{"ifname dot", func(p *Pod) { p.IfName = ".." }, "ifName"},
		{"empty netns", func(p *Pod) { p.Netns = "" }, "netns is empty"},
		{"relative netns", func(p *Pod) { p.Netns = "proc/self/ns/net" }, "absolute"},
		{"unclean netns", func(p *Pod) { p.Netns = "/proc/self/ns/../ns/net" }, "clean absolute"},
		{"missing netns", func(p *Pod) { p.Netns = filepath.Join(dir, "gone") }, "does not exist"},
		{"netns is a directory", func(p *Pod) { p.Netns = dir }, "directory"},
		{"netns is a regular file", func(p *Pod) { p.Netns = regular }, "not a network namespace"},
		{"empty namespace", func(p *Pod) { p.Namespace = "" }, "namespace is empty"},
		{"upper-case namespace", func(p *Pod) { p.Namespace = "Default" }, "DNS-1123 label"},
		{"dotted namespace", func(p *Pod) { p.Namespace = "a.b" }, "DNS-1123 label"},
		{"long namespace", func(p *Pod) { p.Namespace = strings.Repeat("n", 64) }, "longer than 63"},
		{"empty name", func(p *Pod) { p.Name = "" }, "name is empty"},
		{"name with underscore", func(p *Pod) { p.Name = "web_1" }, "DNS-1123 subdomain"},
		{"name ends with -", func(p *Pod) { p.Name = "web-" }, "DNS-1123 subdomain"},
		{"name with empty label", func(p *Pod) { p.Name = "a..b" }, "DNS-1123 subdomain"},
		{"long name", func(p *Pod) { p.Name = strings.Repeat("a", 254) }, "longer than 253"},
		{"bad uid", func(p *Pod) { p.UID = "a b" }, "uid"},
		{"no ips", func(p *Pod) { p.IPs = nil }, "ips is empty"},
		{"zero ip", func(p *Pod) { p.IPs = []netip.Addr{{}} }, "empty address"},
		{"unspecified ip", func(p *Pod) { p.IPs = []netip.Addr{netip.IPv4Unspecified()} }, "cannot be a pod address"},
		{"loopback ip", func(p *Pod) { p.IPs = []netip.Addr{netip.MustParseAddr("::1")} }, "cannot be a pod address"},
		{"multicast ip", func(p *Pod) { p.IPs = []netip.Addr{netip.MustParseAddr("224.0.0.1")} }, "cannot be a pod address"},
		{"mapped ip", func(p *Pod) { p.IPs = []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.1")} }, "send 10.0.0.1"},
		{"zoned ip", func(p *Pod) { p.IPs = []netip.Addr{netip.MustParseAddr("fe80::1%eth0")} }, "zone"},
		{"duplicate ip", func(p *Pod) { p.IPs = append(p.IPs, p.IPs[0]) }, "listed twice"},
		{"empty annotation key", func(p *Pod) { p.Annotations = map[string]string{"": "x"} }, "empty key"},
		{"huge annotations", func(p *Pod) { p.Annotations = map[string]string{"k": strings.Repeat("v", 256<<10)} }, "at most 262144"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := validPod()
			tc.mutate(&p)
			err := p.Validate()
			if err == nil {
				t.Fatal("Validate accepted the pod")
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %q does not wrap ErrInvalid", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

func TestValidateNamesEveryProblem(t *testing.T) {
	err := Pod{ContainerID: "c1", Netns: selfNetns}.Validate()
	if err == nil {
		t.Fatal("Validate accepted an incomplete pod")
	}
	for _, want := range []string{"ifName is empty", "namespace is empty", "name is empty", "ips is empty"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

func TestValidateContainerID(t *testing.T) {
	if err := ValidateContainerID("abc-123"); err != nil {
		t.Errorf("ValidateContainerID(abc-123): %v", err)
	}
	if err := ValidateContainerID("../x"); !errors.Is(err, ErrInvalid) {
		t.Errorf("ValidateContainerID(../x) = %v, want ErrInvalid", err)
	}
}
