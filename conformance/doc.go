// Package conformance stands up simulated Kubernetes nodes and pods in network namespaces and
// drives meshless through them exactly as a container runtime would, so that end-to-end tests and
// the demo need no cluster.
//
// A Cluster holds the shared pieces: the built binaries (BuildBinaries), a working directory and
// one CA. A Node is a network namespace whose bridge is created by the real `bridge` plugin, with
// its own pod CIDR (IPv4, optionally IPv6), CNI conflists, libcni cache, and a `meshlessd run`
// process living inside it. A Pod is a network namespace wired through libcni by the node's
// conflist ([bridge + host-local, meshless-cni], or without meshless-cni for a non-mesh workload),
// with the CNI plugins executed from inside the node's namespace so that the node is their host.
//
// Around them: Exec and Start run programs (meshless-testapp, curl, ...) in pods and nodes;
// StartCapture records packets with tcpdump and ReadTrace reassembles the TCP streams so a test
// can prove that only TLS records crossed the wire; ReadLog finds records in meshlessd's JSON log.
//
// Everything created is registered with an Env (a *testing.T, or a CleanupStack in programs) and
// torn down in reverse order, also when a test fails. Nearly everything needs root.
package conformance
