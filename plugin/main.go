// Command meshless-cni is the chained CNI plugin of meshless. It must come after the primary CNI
// (bridge, Calico, Flannel, ...) in a conflist. On ADD it takes the pod's addresses from
// prevResult, installs the redirection rules of pkg/capture in the pod's netns, using the
// iptables backend meshlessd reports for the node, and enrolls the pod with meshlessd over its
// unix socket; prevResult is returned unchanged. DEL tells the daemon to forget the pod; CHECK
// verifies rules and enrollment; GC and STATUS (CNI 1.1) are passed to the daemon.
//
// Configuration keys, besides the standard ones:
//
//	socketPath            meshlessd's enrollment socket (default /var/run/meshless/cni.sock)
//	excludeInboundPorts   destination ports of incoming TCP that reach the app without meshless
//	excludeOutboundPorts  destination ports of outgoing TCP that are not captured
//	excludeOutboundCIDRs  destinations of outgoing TCP that are not captured
//	logLevel              debug, info (default), warn or error
//
// The pod's namespace, name and UID come from K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID in
// CNI_ARGS. When a runtime passes none of them (plain libcni use, outside Kubernetes), the pod is
// enrolled as namespace "default" with a name made of the first 12 characters of the container
// ID, lower-cased; a warning on stderr says so. Logs go to stderr only: stdout carries the result.
package main

import (
	"runtime/debug"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"
)

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cmdAdd,
		Del:    cmdDel,
		Check:  cmdCheck,
		GC:     cmdGC,
		Status: cmdStatus,
	}, version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"), about())
}

// about is what the plugin prints when run without CNI_COMMAND.
func about() string {
	v := "(unknown version)"
	if bi, ok := debug.ReadBuildInfo(); ok {
		v = bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				v += " " + s.Value
			}
		}
	}
	return "meshless-cni " + v + ": chained CNI plugin that gives pods transparent mTLS through meshlessd"
}
