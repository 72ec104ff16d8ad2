package conformance_test

// Issue 4, item 1 end to end: meshlessd with --kubeconfig takes each pod's service account from a
// real kube-apiserver (conformance/kubeapi), the SPIFFE IDs on the wire carry it, and pods the API
// does not show on the node (another UID, another node) are refused enrollment.

import (
	"context"
	"io"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshless/meshless/conformance"
	"github.com/meshless/meshless/conformance/kubeapi"
)

const kubeNS = "kshop"

func TestKubernetesServiceAccounts(t *testing.T) {
	needRoot(t)
	ctx := testCtx(t)
	api, c, kubeconfig := kubeCluster(t, ctx, "mlkn-", "mlkp-")
	const nodeName = "kube-node-1"
	// The harness always passes the (empty) workloads file; the later empty --workloads unsets it,
	// since it and --kubeconfig exclude each other.
	node, err := c.AddNode(ctx, conformance.NodeConfig{
		Name:       nodeName,
		DaemonArgs: []string{"--workloads=", "--kubeconfig", kubeconfig},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := node.WaitLog(ctx, "msg", "kubernetes pods synced", "node", nodeName); err != nil {
		t.Fatal(err)
	}

	createNamespace(t, ctx, api, kubeNS, "buyer", "seller", "elsewhere")
	buyer := createAPIPod(t, ctx, api, kubeNS, "client", nodeName, "buyer")
	seller := createAPIPod(t, ctx, api, kubeNS, "server", nodeName, "seller")
	other := createAPIPod(t, ctx, api, kubeNS, "visitor", "kube-node-2", "elsewhere")

	// The runtime's CNI ADD carries the pod's namespace, name and UID, as containerd's does.
	cliPod, err := node.AddPod(ctx, conformance.PodConfig{Namespace: kubeNS, Name: "client", UID: string(buyer.UID)})
	if err != nil {
		t.Fatal(err)
	}
	srvPod, err := node.AddPod(ctx, conformance.PodConfig{Namespace: kubeNS, Name: "server", UID: string(seller.UID)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srvPod.StartServer(ctx, corePort); err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(srvPod.IPv4(), corePort)

	t.Run("spiffe_ids_carry_the_api_service_accounts", func(t *testing.T) {
		exchange(t, cliPod, target, conformance.ModeEcho, conformance.ClientOptions{Bytes: 10})
		ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
		defer cancel()
		td := c.Config.TrustDomain
		if _, err := node.WaitLog(ctx, "msg", "connection", "direction", "inbound",
			"peer_id", conformance.SPIFFEID(td, kubeNS, "buyer"), "src", hasHost(cliPod.IPv4().String())); err != nil {
			t.Errorf("inbound side: %v", err)
		}
		if _, err := node.WaitLog(ctx, "msg", "connection", "direction", "outbound",
			"peer_id", conformance.SPIFFEID(td, kubeNS, "seller"), "dst", target.String()); err != nil {
			t.Errorf("outbound side: %v", err)
		}
	})

	// Pods the API does not show on this node fail their CNI ADD with the daemon's reason, after
	// the daemon's --pod-wait: never enrolled under a guessed identity.
	for _, tc := range []struct {
		name string
		pod  conformance.PodConfig
		want string
	}{
		{"stale_uid_refused", conformance.PodConfig{Namespace: kubeNS, Name: "client", UID: "0d9f3c5e-0000-4000-8000-000000000000"},
			"the API shows a pod of that name with uid " + string(buyer.UID)},
		{"pod_on_another_node_refused", conformance.PodConfig{Namespace: kubeNS, Name: "visitor", UID: string(other.UID)},
			"not on node " + nodeName},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := node.AddPod(testCtx(t), tc.pod)
			if err == nil {
				t.Fatalf("pod %s/%s (uid %s) was enrolled: %s", tc.pod.Namespace, tc.pod.Name, tc.pod.UID, p.SPIFFEID())
			}
			t.Logf("CNI ADD refused: %v", err)
			for _, want := range []string{"not found in the Kubernetes API", tc.want} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("CNI ADD error %q does not say %q", err, want)
				}
			}
		})
	}
}

// createNamespace creates a namespace with service accounts (no controller manager creates them).
func createNamespace(t *testing.T, ctx context.Context, api *kubeapi.Server, ns string, accounts ...string) {
	t.Helper()
	if _, err := api.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, sa := range accounts {
		if _, err := api.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// createAPIPod creates a pod bound to node, as the scheduler would.
func createAPIPod(t *testing.T, ctx context.Context, api *kubeapi.Server, ns, name, node, sa string) *corev1.Pod {
	t.Helper()
	p, err := api.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// kubeCluster starts a kube-apiserver and a cluster whose namespaces start with the given
// prefixes, and returns them with a kubeconfig that has meshlessd's permissions.
func kubeCluster(t *testing.T, ctx context.Context, nodePrefix, podPrefix string) (*kubeapi.Server, *conformance.Cluster, string) {
	t.Helper()
	api, err := kubeapi.Start(ctx, t, kubeapi.Config{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := conformance.NewCluster(t, conformance.ClusterConfig{
		Bins: binaries(t), NodePrefix: nodePrefix, PodPrefix: podPrefix,
	})
	if err != nil {
		t.Fatal(err)
	}
	return api, c, daemonKubeconfig(t, ctx, api, c)
}

// daemonKubeconfig gives meshlessd its user (allowed what install/rbac.yaml allows on pods: read
// them and patch their status annotation) and returns its
// kubeconfig. meshlessd runs in the node's network namespace, which cannot reach the API server on
// the test host's loopback: the API server is reached as on a control-plane host of the underlay,
// through a relay that listens on an external host and forwards to the real API server.
func daemonKubeconfig(t *testing.T, ctx context.Context, api *kubeapi.Server, c *conformance.Cluster) string {
	t.Helper()
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "meshlessd"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch", "patch"}}},
	}
	if _, err := api.Client.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "meshlessd"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "meshlessd"},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: "meshlessd"}},
	}
	if _, err := api.Client.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	path, err := api.WriteKubeconfig("meshlessd.kubeconfig", "meshlessd")
	if err != nil {
		t.Fatal(err)
	}

	controlPlane, err := c.AddExternal(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := conformance.ListenIn(controlPlane.NetnsPath(), "tcp", netip.AddrPortFrom(controlPlane.Addr, 6443).String())
	if err != nil {
		t.Fatal(err)
	}
	target, err := url.Parse(api.URL)
	if err != nil {
		t.Fatal(err)
	}
	relay(t, ln, target.Host)

	cfg, err := clientcmd.LoadFromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, cluster := range cfg.Clusters {
		cluster.Server = "https://" + ln.Addr().String()
		// The serving certificate names loopback, not the relay's address.
		cluster.TLSServerName = "localhost"
	}
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// relay accepts connections on ln, connects each to target (dialled from the test's own network
// namespace) and copies both ways, until cleanup.
func relay(t *testing.T, ln net.Listener, target string) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				out, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer out.Close()
				go func() {
					_, _ = io.Copy(out, in)
					_ = out.(*net.TCPConn).CloseWrite()
				}()
				_, _ = io.Copy(in, out)
			}()
		}
	}()
}
