// Package kubeapi runs a real Kubernetes control plane for tests: etcd and kube-apiserver on
// loopback, with their own CA, serving certificate, service account signing key and data
// directory, and admin access through a client certificate (kubeconfig and client-go client).
// kube-apiserver comes from scripts/k8s-binaries.sh (`make kube-binaries`), etcd from Debian's
// etcd-server package (scripts/deps.sh).
//
// Nothing but the API is there: no scheduler, no controllers, no kubelet. Pods are created with
// spec.nodeName set, and the service accounts they name must be created by hand.
package kubeapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/meshless/meshless/internal/proc"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// BinDirEnv names the directory holding kube-apiserver (and the other Kubernetes binaries), as
// scripts/k8s-binaries.sh prints it; the Makefile sets it for the tests.
const BinDirEnv = "MESHLESS_KUBERNETES_BIN"

// ServiceCIDR is the cluster's Service address range; its first address is the kubernetes
// Service's ClusterIP, which the serving certificate names.
const ServiceCIDR = "10.96.0.0/16"

// Start-up budgets: etcd answers in well under a second, kube-apiserver in about 5 s; both get
// room for a loaded CI machine.
const (
	etcdStartTimeout      = 30 * time.Second
	apiserverStartTimeout = 90 * time.Second
	// startAttempts retries a start whose ephemeral port was taken between choosing and binding.
	startAttempts = 3
	// stopGrace is how long a process has to exit after SIGTERM before it is killed.
	stopGrace = 10 * time.Second
)

// Env is what Start needs from its caller: *testing.T and *testing.B satisfy it, and so does
// conformance.CleanupStack for programs.
type Env interface {
	Cleanup(func())
	Logf(format string, args ...any)
	Failed() bool
}

// Config describes the control plane. The zero value is usable.
type Config struct {
	// BinDir holds kube-apiserver; empty means $MESHLESS_KUBERNETES_BIN.
	BinDir string
	// Etcd is the etcd binary; empty means etcd from PATH.
	Etcd string
	// Dir holds data, certificates, kubeconfigs and logs; empty means a new temporary directory
	// removed at cleanup.
	Dir string
	// ExtraArgs are appended to kube-apiserver's flags (a later flag wins).
	ExtraArgs []string
}

// Server is a running etcd + kube-apiserver.
type Server struct {
	// URL is the API server's address, https://127.0.0.1:PORT.
	URL string
	// Dir holds everything the server wrote (logs: etcd.log, kube-apiserver.log).
	Dir string
	// Kubeconfig is the path of a kubeconfig for an administrator (group system:masters).
	Kubeconfig string
	// Client is an administrator's client.
	Client kubernetes.Interface

	ca *authority
}

// Start runs etcd and kube-apiserver, waits until the API server is ready, and registers their
// stop with env.
func Start(ctx context.Context, env Env, cfg Config) (*Server, error) {
	apiserver, etcd, err := binaries(cfg)
	if err != nil {
		return nil, err
	}
	dir := cfg.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "meshless-kubeapi-")
		if err != nil {
			return nil, fmt.Errorf("kubeapi: %w", err)
		}
		dir = d
		env.Cleanup(func() {
			if err := os.RemoveAll(d); err != nil {
				env.Logf("kubeapi cleanup: %v", err)
			}
		})
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("kubeapi: %w", err)
	}
	s := &Server{Dir: dir}
	if err := s.writePKI(); err != nil {
		return nil, fmt.Errorf("kubeapi: certificates: %w", err)
	}
	for attempt := 1; ; attempt++ {
		err := s.start(ctx, env, apiserver, etcd, cfg.ExtraArgs)
		if err == nil {
			break
		}
		if !errors.Is(err, errPortTaken) || attempt == startAttempts {
			return nil, fmt.Errorf("kubeapi: %w", err)
		}
		env.Logf("kubeapi: %v; retrying with other ports", err)
	}
	kubeconfig, err := s.WriteKubeconfig("admin.kubeconfig", "kubeapi-admin", "system:masters")
	if err != nil {
		return nil, err
	}
	s.Kubeconfig = kubeconfig
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeapi: admin kubeconfig: %w", err)
	}
	if s.Client, err = kubernetes.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("kubeapi: admin client: %w", err)
	}
	return s, nil
}

func binaries(cfg Config) (apiserver, etcd string, err error) {
	binDir := cfg.BinDir
	if binDir == "" {
		binDir = os.Getenv(BinDirEnv)
	}
	if binDir == "" {
		return "", "", fmt.Errorf("kubeapi: no kube-apiserver: set %s to the directory that scripts/k8s-binaries.sh prints (`make kube-binaries` builds it)", BinDirEnv)
	}
	apiserver = filepath.Join(binDir, "kube-apiserver")
	if _, err := os.Stat(apiserver); err != nil {
		return "", "", fmt.Errorf("kubeapi: %w (build it with scripts/k8s-binaries.sh)", err)
	}
	etcd = cfg.Etcd
	if etcd == "" {
		etcd = "etcd"
	}
	if etcd, err = exec.LookPath(etcd); err != nil {
		return "", "", fmt.Errorf("kubeapi: etcd (Debian package etcd-server, scripts/deps.sh installs it): %w", err)
	}
	return apiserver, etcd, nil
}

func (s *Server) path(name string) string { return filepath.Join(s.Dir, name) }

func (s *Server) writePKI() error {
	ca, err := newAuthority()
	if err != nil {
		return err
	}
	s.ca = ca
	_, svc, err := net.ParseCIDR(ServiceCIDR)
	if err != nil {
		return err
	}
	serviceIP := append(net.IP(nil), svc.IP.To4()...)
	serviceIP[3]++
	serving, servingKey, err := ca.servingCert(serviceIP)
	if err != nil {
		return err
	}
	saKey, saPub, err := serviceAccountKey()
	if err != nil {
		return err
	}
	return writeFiles(map[string][]byte{
		s.path("ca.crt"):              ca.certPEM,
		s.path("apiserver.crt"):       serving,
		s.path("apiserver.key"):       servingKey,
		s.path("service-account.key"): saKey,
		s.path("service-account.pub"): saPub,
	})
}

var errPortTaken = errors.New("a chosen port was taken before the server bound it")

// start runs etcd and then kube-apiserver on fresh ports, in fresh data directories.
func (s *Server) start(ctx context.Context, env Env, apiserverBin, etcdBin string, extra []string) error {
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	clientURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	dataDir, err := os.MkdirTemp(s.Dir, "etcd-data-")
	if err != nil {
		return err
	}
	etcd, err := proc.Start("etcd", s.path("etcd.log"), etcdBin,
		"--name", "kubeapi",
		"--data-dir", dataDir,
		"--listen-client-urls", clientURL,
		"--advertise-client-urls", clientURL,
		"--listen-peer-urls", peerURL,
		"--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "kubeapi="+peerURL,
		"--logger", "zap",
		"--log-outputs", "stderr",
	)
	if err != nil {
		return err
	}
	etcdHealthy := func() (bool, error) {
		return httpOK(ctx, http.DefaultClient, clientURL+"/health")
	}
	if err := etcd.WaitFor(etcdStartTimeout, etcdHealthy); err != nil {
		etcd.Stop(stopGrace)
		if etcd.AddrInUse() {
			return fmt.Errorf("etcd: %w", errPortTaken)
		}
		return err
	}
	env.Cleanup(func() { s.stopProcess(env, etcd) })

	s.URL = "https://127.0.0.1:" + strconv.Itoa(ports[2])
	args := []string{
		"--etcd-servers", clientURL,
		"--bind-address", "127.0.0.1",
		"--advertise-address", "127.0.0.1",
		"--secure-port", strconv.Itoa(ports[2]),
		"--tls-cert-file", s.path("apiserver.crt"),
		"--tls-private-key-file", s.path("apiserver.key"),
		"--client-ca-file", s.path("ca.crt"),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", s.path("service-account.pub"),
		"--service-account-signing-key-file", s.path("service-account.key"),
		"--service-cluster-ip-range", ServiceCIDR,
		"--authorization-mode", "Node,RBAC",
		"--allow-privileged",
		// Loopback only: no endpoint for the kubernetes Service to reconcile, and nodes are
		// reached by address, never by a name no DNS resolves.
		"--endpoint-reconciler-type", "none",
		"--kubelet-preferred-address-types", "InternalIP",
		"--profiling=false",
	}
	apiserver, err := proc.Start("kube-apiserver", s.path("kube-apiserver.log"), apiserverBin, append(args, extra...)...)
	if err != nil {
		return err
	}
	client, err := s.httpClient()
	if err != nil {
		apiserver.Stop(stopGrace)
		return err
	}
	if err := apiserver.WaitFor(apiserverStartTimeout, func() (bool, error) {
		return httpOK(ctx, client, s.URL+"/readyz")
	}); err != nil {
		apiserver.Stop(stopGrace)
		if apiserver.AddrInUse() {
			return fmt.Errorf("kube-apiserver: %w", errPortTaken)
		}
		return err
	}
	env.Cleanup(func() { s.stopProcess(env, apiserver) })
	env.Logf("kubeapi: kube-apiserver ready at %s (etcd %s), files in %s", s.URL, clientURL, s.Dir)
	return nil
}

// stopProcess stops p at cleanup and, when the test failed, shows the end of its log.
func (s *Server) stopProcess(env Env, p *proc.Process) {
	if env.Failed() {
		env.Logf("kubeapi: %s log (%s) ends with:\n%s", p.Name, p.Log, p.Tail(30))
	}
	p.Stop(stopGrace)
}

// httpClient authenticates as an administrator; it serves the readiness probe.
func (s *Server) httpClient() (*http.Client, error) {
	certPEM, keyPEM, err := s.ca.clientCert("kubeapi-admin", []string{"system:masters"})
	if err != nil {
		return nil, err
	}
	rc := &rest.Config{
		Host: s.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData: s.ca.certPEM, CertData: certPEM, KeyData: keyPEM,
		},
		Timeout: 5 * time.Second,
	}
	return rest.HTTPClientFor(rc)
}

func httpOK(ctx context.Context, client *http.Client, url string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return false, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return true, nil
}

// freePorts returns n distinct loopback TCP ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		// Held until all are chosen, so the n ports differ.
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// WriteKubeconfig writes, under name in the server's directory, a kubeconfig that authenticates
// as user in groups with a new client certificate, and returns its path. What the user may do is
// up to RBAC: bind it to a role, or put it in system:masters.
func (s *Server) WriteKubeconfig(name, user string, groups ...string) (string, error) {
	certPEM, keyPEM, err := s.ca.clientCert(user, groups)
	if err != nil {
		return "", fmt.Errorf("kubeapi: client certificate for %s: %w", user, err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kubeapi"] = &clientcmdapi.Cluster{Server: s.URL, CertificateAuthorityData: s.ca.certPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: certPEM, ClientKeyData: keyPEM}
	cfg.Contexts["kubeapi"] = &clientcmdapi.Context{Cluster: "kubeapi", AuthInfo: user}
	cfg.CurrentContext = "kubeapi"
	path := s.path(name)
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return "", fmt.Errorf("kubeapi: writing kubeconfig: %w", err)
	}
	return path, nil
}
