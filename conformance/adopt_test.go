package conformance_test

// Issue 5, item 4: pods that run before meshless-cni is chained (installed after them, or a node
// that rebooted and started them before the DaemonSet) are found through the Kubernetes API and
// their IPs, and enrolled as the plugin would have enrolled them.

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"

	"github.com/meshless/meshless/conformance"
)

func TestAdoptRunningPods(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	api, c, kubeconfig := kubeCluster(t, ctx, "mlan-", "mlap-")
	const (
		nodeName = "adopt-node"
		ns       = "legacy"
		marker   = "MESHLESS-ADOPTED-9d41"
	)
	// The host's CNI conf dir, empty at first: the chain is not there yet (a fresh install, or a
	// node that rebooted before the DaemonSet chained the plugin again).
	confDir := t.TempDir()
	node, err := c.AddNode(ctx, conformance.NodeConfig{
		Name: nodeName,
		// A pod range no other test uses: pods are found by their IP in the host's netns dir.
		PodCIDR: netip.MustParsePrefix("10.244.213.0/24"),
		DaemonArgs: []string{"--workloads=", "--kubeconfig", kubeconfig, "--adopt-interval", "1s",
			"--cni-conf-dir", confDir, "--cni-bin-dir", c.Config.Bins.Dir, "--netns-dir", conformance.NetnsDir},
	})
	if err != nil {
		t.Fatal(err)
	}
	createNamespace(t, ctx, api, ns, "old-client", "server")
	// running marks the pod running with its IPs, as the kubelet reports it.
	running := func(created *corev1.Pod, ips []netip.Addr) {
		t.Helper()
		// On the latest version, again if the daemon annotates the pod (its status report runs
		// in the background, after the enrollment) between the read and the update.
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			p, err := api.Client.CoreV1().Pods(ns).Get(ctx, created.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			p.Status.Phase = corev1.PodRunning
			for _, ip := range ips {
				p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip.String()})
			}
			p.Status.PodIP = p.Status.PodIPs[0].IP
			_, err = api.Client.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	// The old pod was wired without meshless-cni.
	old, err := node.AddPlainPod(ctx, conformance.PodConfig{Namespace: ns, Name: "old"})
	if err != nil {
		t.Fatal(err)
	}
	running(createAPIPod(t, ctx, api, ns, "old", nodeName, "old-client"), old.IPs())
	if _, err := node.WaitLog(ctx, "msg", "pods running without meshless wait for the CNI chain"); err != nil {
		t.Fatal(err)
	}

	// The chain arrives; the old pod is adopted, and a new pod is enrolled by the plugin.
	mesh, err := node.ConfList(true, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(confDir, "10-meshless.conflist"), mesh, 0o644); err != nil {
		t.Fatal(err)
	}
	waitCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := node.WaitLog(waitCtx, "msg", "running pod adopted", "pod", "old", "namespace", ns); err != nil {
		t.Fatal(err)
	}
	srvAPI := createAPIPod(t, ctx, api, ns, "server", nodeName, "server")
	server, err := node.AddPod(ctx, conformance.PodConfig{Namespace: ns, Name: "server", UID: string(srvAPI.UID)})
	if err != nil {
		t.Fatal(err)
	}
	running(srvAPI, server.IPs())
	if _, err := server.StartServer(ctx, corePort); err != nil {
		t.Fatal(err)
	}

	wire, err := node.StartCapture(ctx, "adopt-wire", "tcp")
	if err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(server.IPv4(), corePort)
	exchange(t, old, target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 16 << 10, Marker: marker})
	td := c.Config.TrustDomain
	waitConnRecords(t, node, 1, "direction", "inbound", "dst", target.String(), "mtls", "true", "result", "ok",
		"peer_id", conformance.SPIFFEID(td, ns, "old-client"))
	waitConnRecords(t, node, 1, "direction", "outbound", "dst", target.String(), "mtls", "true", "result", "ok",
		"peer_id", conformance.SPIFFEID(td, ns, "server"))
	tr, err := wire.StopAndRead()
	if err != nil {
		t.Fatal(err)
	}
	requireTLSOnly(t, tr, old.IPv4(), server.IPv4(), corePort, marker)

	// Both pods carry their status, whichever way they were enrolled.
	for _, name := range []string{"old", "server"} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			p, err := api.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if v := p.Annotations["meshless.io/status"]; v == "enrolled" {
				break
			} else if time.Now().After(deadline) {
				t.Fatalf("pod %s/%s: meshless.io/status = %q, want enrolled", ns, name, v)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}
