package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/meshless/meshless/pkg/adopt"
	"github.com/meshless/meshless/pkg/agent"
	"github.com/meshless/meshless/pkg/capture"
	"github.com/meshless/meshless/pkg/enroll"
	"github.com/meshless/meshless/pkg/enrollhttp"
	"github.com/meshless/meshless/pkg/kube"
	meshtls "github.com/meshless/meshless/pkg/tls"
	"github.com/meshless/meshless/pkg/tunnel"
)

type runFlags struct {
	node         string
	trustDomain  string
	caDir        string
	stateDir     string
	socket       string
	mode         string
	meshCIDRs    prefixList
	strictEgress bool
	workloads    string
	healthAddr   string
	logLevel     string
	svidTTL      time.Duration
	excludedNS   []string
	healthEvery  time.Duration
	adopt        adoptFlags
	uninstall    uninstallFlags
	tls          tlsFlags
	kube         kubeFlags
	identity     identityFlags
}

// prefixList is a repeatable CIDR flag.
type prefixList []netip.Prefix

func (p *prefixList) String() string {
	s := make([]string, len(*p))
	for i, v := range *p {
		s[i] = v.String()
	}
	return strings.Join(s, ",")
}

func (p *prefixList) Set(v string) error {
	for _, part := range strings.Split(v, ",") {
		pfx, err := netip.ParsePrefix(strings.TrimSpace(part))
		if err != nil {
			return err
		}
		*p = append(*p, pfx.Masked())
	}
	return nil
}

func parseRunFlags(args []string) (*runFlags, error) {
	f := &runFlags{}
	host, _ := os.Hostname()
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.StringVar(&f.node, "node-name", envOr("NODE_NAME", host), "name of this node (default $NODE_NAME or the host name)")
	fs.StringVar(&f.trustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain of the cluster")
	fs.StringVar(&f.caDir, "ca-dir", "/etc/meshless/ca", "directory holding ca.crt and ca.key (meshlessd ca init)")
	fs.StringVar(&f.stateDir, "state-dir", "/var/lib/meshless", "directory for enrolled pods' records and the iptables backend decision")
	fs.StringVar(&f.socket, "socket", enroll.DefaultSocket, "unix socket the CNI plugin enrolls pods on")
	fs.StringVar(&f.mode, "mode", string(tunnel.Strict), "inbound plaintext from outside the mesh: strict (refuse) or permissive (forward)")
	fs.Var(&f.meshCIDRs, "mesh-cidr", "destination CIDR that answers meshless mTLS (pod and service CIDRs); repeatable")
	fs.BoolVar(&f.strictEgress, "strict-egress", false, "refuse outbound connections to destinations outside the mesh CIDRs")
	fs.StringVar(&f.workloads, "workloads", "", `JSON file mapping "namespace/name" to a service account (outside Kubernetes)`)
	fs.StringVar(&f.healthAddr, "health-addr", "127.0.0.1:15021", "address of /healthz and /readyz (empty: off)")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.DurationVar(&f.svidTTL, "svid-ttl", 24*time.Hour, "lifetime of minted SVIDs; they are renewed at half-life")
	excluded := fs.String("excluded-namespaces", "kube-system", "comma-separated namespaces whose pods are never enrolled")
	fs.DurationVar(&f.healthEvery, "health-interval", time.Minute, "how often to log the one-line health summary (0: never)")
	f.adopt.register(fs)
	f.uninstall.register(fs, "release every pod (remove its capture rules, forget it) instead of leaving it to the next daemon")
	f.tls.register(fs)
	f.kube.register(fs)
	f.identity.register(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if f.node == "" {
		return nil, errors.New("--node-name is required (no host name found)")
	}
	if len(f.meshCIDRs) == 0 {
		return nil, errors.New("at least one --mesh-cidr is required: without it no destination gets mTLS")
	}
	f.excludedNS = splitList(*excluded)
	for _, ns := range f.excludedNS {
		if err := enroll.ValidateNamespace(ns); err != nil {
			return nil, fmt.Errorf("--excluded-namespaces: %w", err)
		}
	}
	if err := f.uninstall.validate(); err != nil {
		return nil, err
	}
	if err := f.adopt.validate(); err != nil {
		return nil, err
	}
	if f.healthEvery < 0 {
		return nil, fmt.Errorf("--health-interval %s: must not be negative", f.healthEvery)
	}
	if f.svidTTL < 2*time.Second {
		return nil, fmt.Errorf("--svid-ttl %s: too short to renew at half-life", f.svidTTL)
	}
	if err := f.tls.validate(); err != nil {
		return nil, err
	}
	if err := f.kube.validate(f.workloads); err != nil {
		return nil, err
	}
	if err := f.identity.validate(); err != nil {
		return nil, err
	}
	return f, nil
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func newLogger(w io.Writer, level string) (*slog.Logger, error) {
	h, err := newLogHandler(w, level)
	if err != nil {
		return nil, err
	}
	return slog.New(h), nil
}

// newLogHandler is the daemon's JSON log: one object per line, for `kubectl logs` and log shippers.
func newLogHandler(w io.Writer, level string) (slog.Handler, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	return slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l}), nil
}

func runCmd(args []string, stdout io.Writer) error {
	f, err := parseRunFlags(args)
	if err != nil {
		return err
	}
	h, err := newLogHandler(stdout, f.logLevel)
	if err != nil {
		return err
	}
	counts := newCountingHandler(h)
	log := slog.New(counts)
	if err := f.tls.checkFIPS(); err != nil {
		return err
	}
	td, err := spiffeid.TrustDomainFromString(f.trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain: %w", err)
	}
	mode, err := tunnel.ParseMode(f.mode)
	if err != nil {
		return fmt.Errorf("--mode: %w", err)
	}
	directory, kv, err := podDirectory(f, log)
	if err != nil {
		return err
	}
	source, err := newIdentitySource(f, td, log)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(f.stateDir, 0o700); err != nil {
		return fmt.Errorf("--state-dir: %w", err)
	}
	backend, err := capture.LoadOrDetectBackend(f.stateDir)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	configs := meshtls.NewConfigs(source, tlsconfig.AuthorizeMemberOf(td), meshtls.PostQuantum(f.tls.pq))
	source.OnBundleChange(configs.Reset)
	proxy, err := tunnel.New(tunnel.Config{
		TLS:          configs,
		Mesh:         f.meshCIDRs,
		Mode:         mode,
		StrictEgress: f.strictEgress,
		Log:          log,
	})
	if err != nil {
		return err
	}
	ag, err := agent.New(agent.Config{
		Node:               f.node,
		TrustDomain:        td,
		Mode:               mode,
		Backend:            backend,
		StateDir:           f.stateDir,
		Directory:          directory,
		ExcludedNamespaces: f.excludedNS,
		Reporter:           kv.reporter(),
		Identities:         source,
		TLS:                configs,
		Proxy:              proxy,
		Log:                log,
	})
	if err != nil {
		return err
	}
	defer ag.Close()

	errc := make(chan error, 4)
	go func() { errc <- source.Run(ctx) }()
	kv.run(ctx)
	if ca, ok := source.(*meshtls.CASource); ok && f.tls.caReloadInterval > 0 {
		go func() { errc <- ca.WatchCADir(ctx, f.caDir, f.tls.caReloadInterval) }()
	}

	if f.healthAddr != "" {
		hl, err := net.Listen("tcp", f.healthAddr)
		if err != nil {
			return fmt.Errorf("--health-addr: %w", err)
		}
		hs := &http.Server{Handler: healthHandler(ag, proxy, kv.pods), ReadHeaderTimeout: 5 * time.Second}
		go func() { errc <- serveUntil(ctx, hs, hl) }()
	}

	restored := ag.Restore()
	go ag.Reconcile(ctx, 5*time.Second)
	if kv.pods != nil && f.adopt.interval > 0 {
		go adoptRunning(ctx, f, ag, kv.pods, log)
	}

	sl, err := enroll.Listen(f.socket)
	if err != nil {
		return err
	}
	// Only a speed-up for the plugin (it then installs a pod's rules while this daemon enrolls
	// the pod): without it, pods are still added, one step after the other.
	if err := enroll.PublishBackend(f.socket, string(backend)); err != nil {
		log.Warn("the plugin will wait for each enrollment before installing the pod's rules", "reason", err)
	}
	api := &http.Server{Handler: enrollhttp.Handler(ag), ReadHeaderTimeout: 5 * time.Second}
	go func() { errc <- serveUntil(ctx, api, sl) }()
	// After the API serves: the plugin that repairs a pod enrolls it again.
	go ag.RefuseIPv6(func(p enroll.Pod) error { return adopt.Recapture(ctx, f.adopt.confDir, f.adopt.binDir, p) })

	log.Info("meshlessd ready", append([]any{
		"node", f.node, "trust_domain", td.Name(), "mode", string(mode), "strict_egress", f.strictEgress,
		"mesh_cidrs", f.meshCIDRs.String(), "excluded_namespaces", strings.Join(f.excludedNS, ","),
		"iptables_backend", string(backend), "socket", f.socket, "identity_source", f.identity.source,
		"health_addr", f.healthAddr, "health_interval", f.healthEvery.String(), "svid_ttl", f.svidTTL.String(),
		"pods_reattached", restored, "bulk_buffers_max", tunnel.BulkBuffers().Max},
		f.tls.logAttrs()...)...)
	if f.healthEvery > 0 {
		hr := &healthReporter{agent: ag, stats: proxy.Stats(), svids: source, counts: counts, bulk: tunnel.BulkBuffers, log: slog.New(h)}
		go hr.run(ctx, f.healthEvery)
	}

	select {
	case <-ctx.Done():
		if f.uninstall.onDelete && kv.client != nil && f.uninstall.removal(kv.client, log) {
			released, err := ag.Uninstall()
			log.Info("meshless is being removed: pods released, their traffic is no longer captured", "pods_released", released)
			return err
		}
		log.Info("meshlessd stopping; enrolled pods keep their records and refuse traffic until it is back")
		return nil
	case err := <-errc:
		return err
	}
}

// serveUntil serves until ctx ends, then shuts the server down.
func serveUntil(ctx context.Context, s *http.Server, l net.Listener) error {
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = s.Shutdown(shutdownCtx)
	}()
	if err := s.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func healthHandler(ag *agent.Agent, proxy *tunnel.Proxy, pods *kube.Pods) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ag.Ready() {
			http.Error(w, "restoring enrolled pods", http.StatusServiceUnavailable)
			return
		}
		// Until the first list of the node's pods has arrived, every enrollment would wait for its pod.
		if pods != nil && !pods.Synced() {
			http.Error(w, "listing this node's pods from the Kubernetes API", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		writeMetrics(w, ag.Status(r.Context()).Pods, proxy.Stats(), tunnel.BulkBuffers())
	})
	return mux
}

// writeMetrics writes the daemon's metrics in the Prometheus text format.
func writeMetrics(w io.Writer, pods int, s *tunnel.Stats, bulk tunnel.BulkBufferStats) {
	fmt.Fprintf(w, "# HELP meshless_pods_enrolled Pods enrolled on this node.\n# TYPE meshless_pods_enrolled gauge\nmeshless_pods_enrolled %d\n", pods)
	fmt.Fprintf(w, "# HELP meshless_connections_open Connections being proxied.\n# TYPE meshless_connections_open gauge\nmeshless_connections_open %d\n", s.Open.Load())
	fmt.Fprintf(w, "# HELP meshless_connections_total Connections proxied, ended.\n# TYPE meshless_connections_total counter\nmeshless_connections_total %d\n", s.Total.Load())
	fmt.Fprintf(w, "# HELP meshless_connections_failed_total Connections refused or failed.\n# TYPE meshless_connections_failed_total counter\nmeshless_connections_failed_total %d\n", s.Failed.Load())
	fmt.Fprintf(w, "# HELP meshless_connections_plaintext_total Connections carried in plaintext (egress outside the mesh, permissive inbound).\n# TYPE meshless_connections_plaintext_total counter\nmeshless_connections_plaintext_total %d\n", s.Plaintext.Load())
	fmt.Fprintf(w, "# HELP meshless_tls_handshakes_total mTLS handshakes completed, as the client (outbound) and as the server (inbound).\n# TYPE meshless_tls_handshakes_total counter\n")
	fmt.Fprintf(w, "meshless_tls_handshakes_total{direction=\"outbound\"} %d\nmeshless_tls_handshakes_total{direction=\"inbound\"} %d\n", s.Outbound.Total.Load(), s.Inbound.Total.Load())
	fmt.Fprintf(w, "# HELP meshless_tls_handshakes_resumed_total mTLS handshakes completed that resumed a session, so that no certificate was sent, signed or verified.\n# TYPE meshless_tls_handshakes_resumed_total counter\n")
	fmt.Fprintf(w, "meshless_tls_handshakes_resumed_total{direction=\"outbound\"} %d\nmeshless_tls_handshakes_resumed_total{direction=\"inbound\"} %d\n", s.Outbound.Resumed.Load(), s.Inbound.Resumed.Load())
	fmt.Fprintf(w, "# HELP meshless_relay_bulk_buffers_lent Large relay buffers lent to streaming connections now.\n# TYPE meshless_relay_bulk_buffers_lent gauge\nmeshless_relay_bulk_buffers_lent %d\n", bulk.Lent)
	fmt.Fprintf(w, "# HELP meshless_relay_bulk_buffers_max Large relay buffers that the memory budget lets be lent at once.\n# TYPE meshless_relay_bulk_buffers_max gauge\nmeshless_relay_bulk_buffers_max %d\n", bulk.Max)
	fmt.Fprintf(w, "# HELP meshless_relay_bulk_buffers_denied_total Times a streaming connection got a one-record buffer because the large buffers' memory budget was spent.\n# TYPE meshless_relay_bulk_buffers_denied_total counter\nmeshless_relay_bulk_buffers_denied_total %d\n", bulk.Denied)
}
