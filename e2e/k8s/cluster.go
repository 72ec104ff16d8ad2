package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshless/meshless/conformance"
	"github.com/meshless/meshless/conformance/kubeapi"
	"github.com/meshless/meshless/internal/proc"
)

// startDaemon runs argv in the current (cluster) network namespace and the host's mount
// namespace. It dies with this program and is stopped at cleanup.
func startDaemon(env *conformance.CleanupStack, dir, name string, argv ...string) (*proc.Process, error) {
	d, err := proc.Start(name, filepath.Join(dir, name+".log"), argv[0], argv[1:]...)
	if err != nil {
		return nil, err
	}
	env.Cleanup(func() { d.Stop(15 * time.Second) })
	return d, nil
}

// poll calls cond every interval until it reports true, ctx ends, timeout passes, or one of the
// watched daemons exits. Start-up and rollout have no event to wait on from here.
func poll(ctx context.Context, what string, timeout time.Duration, watched []*proc.Process, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		ok, err := cond()
		if ok {
			return nil
		}
		if err != nil {
			last = err
		}
		for _, d := range watched {
			if err := d.Exited(); err != nil {
				return fmt.Errorf("waiting for %s: %w", what, err)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not after %s (last: %v)", what, timeout, last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// run runs a command and returns its stdout; a failure carries stderr.
func run(ctx context.Context, env []string, argv ...string) (string, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// cluster is the running one-node cluster.
type cluster struct {
	o       options
	env     *conformance.CleanupStack
	dir     string
	api     *kubeapi.Server
	client  kubernetes.Interface
	sock    string // containerd's socket
	daemons []*proc.Process
}

// kubectl runs kubectl as the cluster's administrator, with stdin if given.
func (c *cluster) kubectl(ctx context.Context, stdin []byte, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", args...)
	// The discovery and HTTP caches go to the run dir, not $HOME/.kube/cache.
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.api.Kubeconfig, "KUBECACHEDIR="+filepath.Join(c.dir, "kubectl-cache"))
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func (c *cluster) bin(name string) string { return filepath.Join(c.o.kubeBin, name) }

// startContainerd runs containerd with its own root, state and socket in the run dir, the CRI
// plugin on the host's CNI dirs, and imports the images.
func (c *cluster) startContainerd(ctx context.Context) error {
	dir := filepath.Join(c.dir, "containerd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	c.sock = filepath.Join(dir, "containerd.sock")
	// restrict_oom_score_adj: this machine lacks CAP_SYS_RESOURCE, and runc fails to raise a
	// container's oom_score_adj above its parent's without it.
	config := fmt.Sprintf(`version = 2
root = %q
state = %q

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = %q

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/opt/cni/bin"
  conf_dir = "/etc/cni/net.d"
  max_conf_num = 1
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.sock, c.sock+".ttrpc",
		filepath.Join(dir, "opt"), pauseImageRef, filepath.Join(dir, "runc"))
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		return err
	}
	d, err := startDaemon(c.env, c.dir, "containerd", "containerd", "--config", cfgPath)
	if err != nil {
		return err
	}
	c.daemons = append(c.daemons, d)
	if err := poll(ctx, "containerd", time.Minute, []*proc.Process{d}, func() (bool, error) {
		_, err := run(ctx, nil, "ctr", "--address", c.sock, "version")
		return err == nil, err
	}); err != nil {
		return err
	}
	for _, img := range []string{c.o.pauseImage, c.o.workloadImage, c.o.meshlessImage} {
		if _, err := run(ctx, nil, "ctr", "--address", c.sock, "-n", "k8s.io", "images", "import", img); err != nil {
			return fmt.Errorf("importing %s: %w", img, err)
		}
	}
	return nil
}

// startControlPlane runs etcd and kube-apiserver (conformance/kubeapi), then the controller
// manager and the scheduler. The API server listens on every address of the node's namespace
// and advertises the node address, so that the kubernetes Service (which meshlessd uses from
// its pod) leads to it.
func (c *cluster) startControlPlane(ctx context.Context) error {
	api, err := kubeapi.Start(ctx, c.env, kubeapi.Config{
		BinDir: c.o.kubeBin,
		Dir:    filepath.Join(c.dir, "kubeapi"),
		ExtraArgs: []string{
			"--bind-address", "0.0.0.0",
			"--advertise-address", nodeIP,
			"--endpoint-reconciler-type", "lease",
		},
	})
	if err != nil {
		return err
	}
	c.api, c.client = api, api.Client
	kcm, err := startDaemon(c.env, c.dir, "kube-controller-manager", c.bin("kube-controller-manager"),
		"--kubeconfig", api.Kubeconfig,
		"--leader-elect=false",
		"--bind-address", "127.0.0.1",
		"--cert-dir", filepath.Join(c.dir, "kube-controller-manager"),
		"--service-account-private-key-file", filepath.Join(api.Dir, "service-account.key"),
		"--root-ca-file", filepath.Join(api.Dir, "ca.crt"),
		"--use-service-account-credentials=false",
	)
	if err != nil {
		return err
	}
	sched, err := startDaemon(c.env, c.dir, "kube-scheduler", c.bin("kube-scheduler"),
		"--kubeconfig", api.Kubeconfig,
		"--leader-elect=false",
		"--bind-address", "127.0.0.1",
		"--cert-dir", filepath.Join(c.dir, "kube-scheduler"),
	)
	if err != nil {
		return err
	}
	c.daemons = append(c.daemons, kcm, sched)
	return nil
}

// startNode runs the kubelet and kube-proxy and waits until the node is Ready and the default
// service account exists.
func (c *cluster) startNode(ctx context.Context) error {
	kdir := filepath.Join(c.dir, "kubelet")
	if err := os.MkdirAll(filepath.Join(kdir, "pod-logs"), 0o755); err != nil {
		return err
	}
	// Local images only: image GC never runs (100 %), and eviction never fires on a full CI disk.
	kubeletConfig := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: %q
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://%s
podLogsDir: %q
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
  x509:
    clientCAFile: %q
authorization:
  mode: AlwaysAllow
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
clusterDomain: cluster.local
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
serializeImagePulls: false
`, c.o.cgroup, c.sock, filepath.Join(kdir, "pod-logs"), filepath.Join(c.api.Dir, "ca.crt"))
	cfgPath := filepath.Join(kdir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(kubeletConfig), 0o600); err != nil {
		return err
	}
	kubelet, err := startDaemon(c.env, c.dir, "kubelet", c.bin("kubelet"),
		"--config", cfgPath,
		"--kubeconfig", c.api.Kubeconfig,
		"--root-dir", filepath.Join(kdir, "root"),
		"--cert-dir", filepath.Join(kdir, "pki"),
		"--hostname-override", nodeName,
		"--node-ip", nodeIP,
	)
	if err != nil {
		return err
	}
	proxyConfig := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: %q
mode: iptables
clusterCIDR: %q
hostnameOverride: %q
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
`, c.api.Kubeconfig, podCIDR, nodeName)
	proxyPath := filepath.Join(c.dir, "kube-proxy.yaml")
	if err := os.WriteFile(proxyPath, []byte(proxyConfig), 0o600); err != nil {
		return err
	}
	proxy, err := startDaemon(c.env, c.dir, "kube-proxy", c.bin("kube-proxy"), "--config", proxyPath)
	if err != nil {
		return err
	}
	c.daemons = append(c.daemons, kubelet, proxy)
	if err := poll(ctx, "node "+nodeName+" Ready", 2*time.Minute, c.daemons, func() (bool, error) {
		n, err := c.client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				return cond.Status == corev1.ConditionTrue, errors.New(cond.Message)
			}
		}
		return false, nil
	}); err != nil {
		return err
	}
	return poll(ctx, "the default service account", time.Minute, c.daemons, func() (bool, error) {
		_, err := c.client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil, err
	})
}
