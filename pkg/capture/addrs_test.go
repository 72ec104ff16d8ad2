package capture

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
)

// TestNodeAddrs lists a node's addresses for an IPv4-only and for a dual-stack pod: global
// unicast ones only, IPv6 ones only for the dual-stack pod.
func TestNodeAddrs(t *testing.T) {
	needRoot(t)
	netns, path := newNetns(t)
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "eth0", "type", "veth", "peer", "name", "peer0"},
		{"addr", "add", "10.77.9.1/24", "dev", "eth0"},
		{"addr", "add", "169.254.1.1/32", "dev", "eth0"},
		{"addr", "add", "fd77:9::1/64", "dev", "eth0", "nodad"},
		{"addr", "add", "fe80::99/64", "dev", "eth0", "nodad"},
		{"link", "set", "eth0", "up"},
	} {
		run(t, "ip", append([]string{"-n", netns}, args...)...)
	}
	for _, tc := range []struct {
		podIPs []netip.Addr
		want   []netip.Addr
	}{
		{[]netip.Addr{netip.MustParseAddr("10.77.9.2")}, []netip.Addr{netip.MustParseAddr("10.77.9.1")}},
		{[]netip.Addr{netip.MustParseAddr("::ffff:10.77.9.2")}, []netip.Addr{netip.MustParseAddr("10.77.9.1")}},
		{[]netip.Addr{netip.MustParseAddr("10.77.9.2"), netip.MustParseAddr("fd77:9::2")},
			[]netip.Addr{netip.MustParseAddr("10.77.9.1"), netip.MustParseAddr("fd77:9::1")}},
	} {
		var got []netip.Addr
		err := ns.WithNetNSPath(path, func(ns.NetNS) error {
			var err error
			got, err = NodeAddrs(tc.podIPs)
			return err
		})
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("NodeAddrs(%v) = %v, %v; want %v", tc.podIPs, got, err, tc.want)
		}
	}
}

// TestStartOnNode installs a pod's capture with the node's addresses read by StartOnNode, in a
// new netns (the restore program starts before they are known) and again in the same netns:
// the rules are those of the node's addresses, installed once.
func TestStartOnNode(t *testing.T) {
	needRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			netns, path := newNetns(t)
			c := podConfig(b, true)
			c.NodeIPs = nil
			for i := range 2 {
				fresh, err := StartOnNode(path, c).Finish()
				if err != nil {
					t.Fatalf("StartOnNode #%d: %v", i+1, err)
				}
				if fresh != (i == 0) {
					t.Errorf("StartOnNode #%d: fresh = %v, want %v", i+1, fresh, i == 0)
				}
			}
			want := c
			var err error
			if want.NodeIPs, err = NodeAddrs(c.PodIPs); err != nil {
				t.Fatal(err)
			}
			if len(want.NodeIPs) == 0 {
				t.Skip("this machine has no global unicast address to see in the rules")
			}
			if err := Check(path, want); err != nil {
				t.Errorf("Check with the node's addresses: %v", err)
			}
			for _, family := range []int{4, 6} {
				assertInstalledOnce(t, save(t, netns, b, family), want, family)
			}
		})
	}
}
