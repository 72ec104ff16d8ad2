package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshless/meshless/conformance"
	"github.com/meshless/meshless/conformance/kubeapi"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	// serviceCIDR is the API server's Service range (conformance/kubeapi's).
	serviceCIDR       = kubeapi.ServiceCIDR
	meshlessNamespace = "meshless-system"
	trustDomain       = "cluster.local" // install/configmap.yaml's
	statusAnnotation  = "meshless.io/status"
	// healthWait bounds the wait for meshlessd's periodic health line (every minute by default),
	// counted from the DaemonSet's readiness.
	healthWait = 90 * time.Second
	// echoBytes is each exchange's payload: several TLS records, small enough for any capture.
	echoBytes = 65536
)

// runInner is the cluster half, in the cluster's network namespace.
func runInner(o options) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	env := &conformance.CleanupStack{Log: logf}
	r := &report{}
	c := &cluster{o: o, env: env, dir: o.dir}
	e := &e2e{c: c, r: r, marker: "mlk8s-marker-" + randomHex(6)}
	e.run(ctx)
	if c.api != nil {
		// Pods go before the node does, so that the runtime tears their networks down through
		// the CNI chain; what a failed run leaves, the outer half removes.
		_ = r.phase("workload deletion", func() error {
			dctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			_, err := c.kubectl(dctx, nil, "delete", "namespace", appNamespace, meshlessNamespace, "--ignore-not-found", "--timeout=100s")
			return err
		})
	}
	if r.failed() {
		env.Fail()
	}
	cleanupStart := time.Now()
	env.Run()
	r.phases = append(r.phases, phaseResult{name: "cluster stop", took: time.Since(cleanupStart)})
	r.write(os.Stdout)
	// The run dir goes with the teardown: what explains a run is kept.
	if err := keepArtifacts(o.dir, o.artifacts, r); err != nil {
		logf("keeping the logs: %v", err)
	} else {
		logf("report, logs and captures: %s", o.artifacts)
	}
	if r.failed() {
		return 1
	}
	return 0
}

// keepArtifacts replaces dst's contents with the report and the run's logs and captures.
func keepArtifacts(runDir, dst string, r *report) error {
	if err := os.RemoveAll(dst); err != nil {
		return err
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	var buf bytes.Buffer
	r.write(&buf)
	if err := os.WriteFile(filepath.Join(dst, "report.txt"), buf.Bytes(), 0o644); err != nil {
		return err
	}
	var errs []error
	for _, pattern := range []string{"*.log", "*.pcap", "kubeapi/*.log"} {
		matches, _ := filepath.Glob(filepath.Join(runDir, pattern))
		for _, m := range matches {
			data, err := os.ReadFile(m)
			if err == nil {
				err = os.WriteFile(filepath.Join(dst, filepath.Base(m)), data, 0o644)
			}
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// e2e is one run's state: the cluster, the report, and what the checks learn along the way.
type e2e struct {
	c      *cluster
	r      *report
	marker string

	origConflist []byte
	dsReady      time.Time
	frontend     corev1.Pod
	backend      corev1.Pod
	early        corev1.Pod
	plain        []corev1.Pod
	clusterIP    string
}

func (e *e2e) run(ctx context.Context) {
	c, r := e.c, e.r
	var err error
	if e.origConflist, err = os.ReadFile(filepath.Join("/etc/cni/net.d", conflistName)); err != nil {
		_ = r.phase("start", func() error { return err })
		return
	}
	for _, p := range []struct {
		name string
		f    func(context.Context) error
	}{
		{"containerd + images", c.startContainerd},
		{"control plane", c.startControlPlane},
		{"node", c.startNode},
		{"pod before install", e.deployEarly},
		{"meshless install", e.install},
		{"workloads", e.deploy},
	} {
		if err := r.phase(p.name, func() error { return p.f(ctx) }); err != nil {
			e.diagnose(ctx)
			return
		}
	}
	// The checks report their own failures; the phases fail only when the run is interrupted.
	if err := r.phase("checks", func() error { e.checks(ctx); return ctx.Err() }); err != nil {
		return
	}
	_ = r.phase("uninstall (delete -k)", func() error { e.uninstall(ctx); return ctx.Err() })
}

// diagnose puts what explains a failed phase into the report.
func (e *e2e) diagnose(ctx context.Context) {
	if e.c.api == nil {
		return
	}
	out, _ := e.c.kubectl(ctx, nil, "get", "pods", "-A", "-o", "wide")
	e.r.note("pods:\n%s", strings.TrimSpace(out))
	out, _ = e.c.kubectl(ctx, nil, "get", "events", "-A", "--sort-by=.lastTimestamp")
	e.r.note("events (last 30 lines):\n%s", lastLines(out, 30))
	out, _ = e.c.kubectl(ctx, nil, "logs", "-n", meshlessNamespace, "ds/meshless", "--all-containers", "--tail=40")
	if out != "" {
		e.r.note("meshless logs:\n%s", strings.TrimSpace(out))
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// install is the operator's procedure: the kustomize base, the cluster's CIDRs in the ConfigMap,
// the CA Secret, then wait for the DaemonSet. The Secret comes last: the DaemonSet's pod cannot
// start before it exists, so it starts with the ConfigMap as patched.
func (e *e2e) install(ctx context.Context) error {
	c := e.c
	if _, err := c.kubectl(ctx, nil, "apply", "-k", filepath.Join(c.o.repo, "install")); err != nil {
		return err
	}
	patch := fmt.Sprintf(`{"data":{"mesh-cidrs":"%s,%s"}}`, podCIDR, serviceCIDR)
	if _, err := c.kubectl(ctx, nil, "patch", "configmap", "-n", meshlessNamespace, "meshless-config", "--type=merge", "-p", patch); err != nil {
		return err
	}
	secret, err := run(ctx, nil, filepath.Join(c.o.repo, "bin", "meshlessd"), "ca", "init", "--kubernetes-secret")
	if err != nil {
		return err
	}
	if _, err := c.kubectl(ctx, []byte(secret), "apply", "-f", "-"); err != nil {
		return err
	}
	if _, err := c.kubectl(ctx, nil, "rollout", "status", "-n", meshlessNamespace, "ds/meshless", "--timeout=150s"); err != nil {
		return err
	}
	e.dsReady = time.Now()
	return nil
}

// deployEarly starts a pod before meshless is there, through the bridge plugin alone.
func (e *e2e) deployEarly(ctx context.Context) error {
	if _, err := e.c.kubectl(ctx, earlyManifest(), "apply", "-f", "-"); err != nil {
		return err
	}
	if _, err := e.c.kubectl(ctx, nil, "rollout", "status", "-n", appNamespace, "deploy/early", "--timeout=150s"); err != nil {
		return err
	}
	var err error
	e.early, err = e.onePod(ctx, "early")
	return err
}

func (e *e2e) deploy(ctx context.Context) error {
	c := e.c
	if _, err := c.kubectl(ctx, workloadsManifest(), "apply", "-f", "-"); err != nil {
		return err
	}
	for _, d := range []string{"backend", "frontend", "plain"} {
		if _, err := c.kubectl(ctx, nil, "rollout", "status", "-n", appNamespace, "deploy/"+d, "--timeout=150s"); err != nil {
			return err
		}
	}
	var err error
	if e.frontend, err = e.onePod(ctx, "frontend"); err != nil {
		return err
	}
	if e.backend, err = e.onePod(ctx, "backend"); err != nil {
		return err
	}
	if e.plain, err = e.pods(ctx, "plain"); err != nil {
		return err
	}
	if len(e.plain) != 2 {
		return fmt.Errorf("deployment plain: %d running pods, want 2", len(e.plain))
	}
	svc, err := c.client.CoreV1().Services(appNamespace).Get(ctx, "backend", metav1.GetOptions{})
	if err != nil {
		return err
	}
	e.clusterIP = svc.Spec.ClusterIP
	// The Deployment is available before kube-proxy has programmed the Service's new endpoint
	// (until then the ClusterIP rejects). A connection from the node, which goes through the
	// same nat rules, says when it has.
	svcAddr := net.JoinHostPort(e.clusterIP, strconv.Itoa(servicePort))
	return poll(ctx, "the Service "+svcAddr+" answering from the node", time.Minute, c.daemons, func() (bool, error) {
		conn, err := net.DialTimeout("tcp", svcAddr, 2*time.Second)
		if err != nil {
			return false, err
		}
		conn.Close()
		return true, nil
	})
}

// pods returns the running, not terminating pods of app.
func (e *e2e) pods(ctx context.Context, app string) ([]corev1.Pod, error) {
	list, err := e.c.client.CoreV1().Pods(appNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
	if err != nil {
		return nil, err
	}
	var out []corev1.Pod
	for _, p := range list.Items {
		if p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil && p.Status.PodIP != "" {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b corev1.Pod) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func (e *e2e) onePod(ctx context.Context, app string) (corev1.Pod, error) {
	ps, err := e.pods(ctx, app)
	if err != nil {
		return corev1.Pod{}, err
	}
	if len(ps) != 1 {
		return corev1.Pod{}, fmt.Errorf("app %s: %d running pods, want 1", app, len(ps))
	}
	return ps[0], nil
}

// exchangeResult is meshless-testapp's client verdict (conformance/internal/testproto.Result).
type exchangeResult struct {
	Target    string `json:"target"`
	Connected bool   `json:"connected"`
	Local     string `json:"local"`
	Sent      int64  `json:"sent"`
	Received  int64  `json:"received"`
	Match     bool   `json:"match"`
	Error     string `json:"error"`
}

func (x exchangeResult) String() string {
	if x.Error != "" {
		return fmt.Sprintf("%s: connected=%t error=%q", x.Target, x.Connected, x.Error)
	}
	return fmt.Sprintf("%s from %s: %d bytes echoed byte for byte=%t", x.Target, x.Local, x.Received, x.Match)
}

// exchange runs an echo of echoBytes carrying the marker from pod to target, inside the pod.
func (e *e2e) exchange(ctx context.Context, pod corev1.Pod, target string) exchangeResult {
	out, err := e.c.kubectl(ctx, nil, "exec", "-n", appNamespace, pod.Name, "-c", "main", "--",
		testapp, "client", "-connect", target, "-mode", "echo", "-bytes", fmt.Sprint(echoBytes),
		"-marker", e.marker, "-timeout", "20s")
	var res exchangeResult
	if jerr := json.Unmarshal([]byte(strings.TrimSpace(out)), &res); jerr != nil {
		res = exchangeResult{Target: target, Error: fmt.Sprintf("no verdict from the client: %v (%v)", jerr, err)}
	}
	return res
}

func (x exchangeResult) err() error {
	if x.Match && x.Error == "" {
		return nil
	}
	return errors.New("exchange failed: " + x.String())
}

// logLine is one JSON line of meshlessd's log.
type logLine struct {
	Time      time.Time `json:"time"`
	Msg       string    `json:"msg"`
	Direction string    `json:"direction"`
	Src       string    `json:"src"`
	Dst       string    `json:"dst"`
	MTLS      bool      `json:"mtls"`
	PeerID    string    `json:"peer_id"`
	Result    string    `json:"result"`
	raw       string
}

func (e *e2e) daemonLog(ctx context.Context) ([]logLine, error) {
	out, err := e.c.kubectl(ctx, nil, "logs", "-n", meshlessNamespace, "ds/meshless", "-c", "meshlessd")
	if err != nil {
		return nil, err
	}
	var lines []logLine
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) == nil {
			l.raw = sc.Text()
			lines = append(lines, l)
		}
	}
	return lines, sc.Err()
}

// logWait bounds the wait for a connection's log line: meshlessd writes it when the
// connection has closed on both sides, which can be a moment after the client returned.
const logWait = 15 * time.Second

// findLog waits for a successful mTLS "connection" line of meshlessd's log that match accepts.
func (e *e2e) findLog(ctx context.Context, what string, match func(logLine) bool) (logLine, error) {
	var found logLine
	err := poll(ctx, "meshlessd's log line for "+what, logWait, nil, func() (bool, error) {
		lines, err := e.daemonLog(ctx)
		for _, l := range lines {
			if l.Msg == "connection" && l.MTLS && l.Result == "ok" && match(l) {
				found = l
				return true, nil
			}
		}
		return false, err
	})
	return found, err
}

func spiffeID(p corev1.Pod) string {
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, p.Namespace, sa)
}

func hostOf(addr string) string {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return ""
	}
	return ap.Addr().String()
}

// checks runs checks a to f, and h.
func (e *e2e) checks(ctx context.Context) {
	c, r := e.c, e.r
	backendTarget := fmt.Sprintf("%s:%d", e.backend.Status.PodIP, appPort)
	serviceTarget := fmt.Sprintf("%s:%d", e.clusterIP, servicePort)
	plainTarget := fmt.Sprintf("%s:%d", e.plain[1].Status.PodIP, appPort)

	// Two captures: the bridge sees every packet between pods, but only after kube-proxy's DNAT
	// (br_netfilter runs it as the frame enters the bridge); the frontend's veth sees its
	// packets as the pod sent them, to the ClusterIP.
	var direct, viaService, plain, toEarly exchangeResult
	var trace, podTrace *conformance.Trace
	veth, err := e.hostVeth(ctx, e.frontend)
	if err == nil {
		var bridgeCap, vethCap *conformance.Capture
		if bridgeCap, err = conformance.StartCapture(ctx, c.env, c.dir, "wire-bridge", c.o.netns, bridgeName, "tcp"); err == nil {
			if vethCap, err = conformance.StartCapture(ctx, c.env, c.dir, "wire-frontend", c.o.netns, veth, "tcp"); err == nil {
				direct = e.exchange(ctx, e.frontend, backendTarget)
				viaService = e.exchange(ctx, e.frontend, serviceTarget)
				plain = e.exchange(ctx, e.plain[0], plainTarget)
				toEarly = e.exchangeWhenEnrolled(ctx, e.frontend, e.early)
				trace, err = bridgeCap.StopAndRead()
				if err == nil {
					podTrace, err = vethCap.StopAndRead()
				}
			}
		}
	}
	if err != nil {
		r.check("a-d", "traffic capture", func() (string, error) { return "", err })
		return
	}
	// Strict mode's other side, observed: plaintext from a pod outside meshless to an enrolled one.
	r.note("installed, strict: opted-out %s -> enrolled backend: %s", e.plain[0].Name, e.exchange(ctx, e.plain[0], backendTarget))

	frontendIP := netip.MustParseAddr(e.frontend.Status.PodIP)
	backendIP := netip.MustParseAddr(e.backend.Status.PodIP)
	clear := trace.FlowsWithClear([]byte(e.marker))

	r.check("a", "mTLS on the wire between the pods (tcpdump on "+bridgeName+")", func() (string, error) {
		if err := direct.err(); err != nil {
			return "", err
		}
		return tlsOnly(trace.Between(frontendIP, backendIP), clear, fmt.Sprintf("frontend %s <-> backend %s", frontendIP, backendIP))
	})

	r.check("b", "service accounts from the API in the SPIFFE IDs", func() (string, error) {
		wantBackend, wantFrontend := spiffeID(e.backend), spiffeID(e.frontend)
		out, err := e.findLog(ctx, "an outbound connection to "+backendTarget+" with peer_id "+wantBackend, func(l logLine) bool {
			return l.Direction == "outbound" && l.Dst == backendTarget && hostOf(l.Src) == frontendIP.String() && l.PeerID == wantBackend
		})
		if err != nil {
			return "", err
		}
		in, err := e.findLog(ctx, "an inbound connection from "+frontendIP.String()+" with peer_id "+wantFrontend, func(l logLine) bool {
			return l.Direction == "inbound" && hostOf(l.Src) == frontendIP.String() && l.PeerID == wantFrontend
		})
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("API: frontend pod runs as sa %q, backend as %q; meshlessd: %s | %s",
			e.frontend.Spec.ServiceAccountName, e.backend.Spec.ServiceAccountName, out.raw, in.raw), nil
	})

	r.check("c", "the Service's ClusterIP works through mTLS (kube-proxy DNAT)", func() (string, error) {
		if err := viaService.err(); err != nil {
			return "", err
		}
		wire, err := tlsOnly(podTrace.Between(frontendIP, netip.MustParseAddr(e.clusterIP)), podTrace.FlowsWithClear([]byte(e.marker)),
			fmt.Sprintf("on the frontend's veth %s, frontend <-> ClusterIP %s", veth, serviceTarget))
		if err != nil {
			return "", err
		}
		l, err := e.findLog(ctx, "an outbound connection to "+serviceTarget+" with peer_id "+spiffeID(e.backend), func(l logLine) bool {
			return l.Direction == "outbound" && l.Dst == serviceTarget && l.PeerID == spiffeID(e.backend)
		})
		if err != nil {
			return wire, err
		}
		return viaService.String() + "; " + wire + "; meshlessd: " + l.raw, nil
	})

	r.check("d", `meshless.io/inject: "false" pods stay plaintext; enrolled pods are annotated`, func() (string, error) {
		var ev []string
		for _, p := range []corev1.Pod{e.frontend, e.backend} {
			got := e.annotation(ctx, p)
			if got != "enrolled" {
				return "", fmt.Errorf("pod %s: %s=%q, want \"enrolled\"", p.Name, statusAnnotation, got)
			}
			ev = append(ev, fmt.Sprintf("%s: %s=%q", p.Name, statusAnnotation, got))
		}
		for _, p := range e.plain {
			got := e.annotation(ctx, p)
			if !strings.HasPrefix(got, "skipped") {
				return "", fmt.Errorf("pod %s (inject=false): %s=%q, want \"skipped: <reason>\"", p.Name, statusAnnotation, got)
			}
			ev = append(ev, fmt.Sprintf("%s: %s=%q", p.Name, statusAnnotation, got))
		}
		if err := plain.err(); err != nil {
			return "", err
		}
		a, b := netip.MustParseAddr(e.plain[0].Status.PodIP), netip.MustParseAddr(e.plain[1].Status.PodIP)
		var inClear []string
		for _, f := range clear {
			if f.Src.Addr() == a && f.Dst.Addr() == b {
				inClear = append(inClear, f.String())
			}
		}
		if len(inClear) == 0 {
			return "", fmt.Errorf("the marker never appeared in clear from %s to %s: the plaintext pods' traffic was changed", a, b)
		}
		return strings.Join(ev, "; ") + fmt.Sprintf("; %s -> %s: %s; marker in clear on the wire: %s", a, b, plain, strings.Join(inClear, ", ")), nil
	})

	r.check("e", "HTTP liveness/readiness probes pass in strict mode", func() (string, error) {
		mode, err := c.kubectl(ctx, nil, "get", "configmap", "-n", meshlessNamespace, "meshless-config", "-o", "jsonpath={.data.mode}")
		if err != nil {
			return "", err
		}
		if mode != "strict" {
			return "", fmt.Errorf("mode is %q", mode)
		}
		p, err := c.client.CoreV1().Pods(appNamespace).Get(ctx, e.backend.Name, metav1.GetOptions{})
		if err != nil {
			return "", err
		}
		return probeState(p)
	})

	r.check("f", "kubectl logs shows the start-up line and the periodic health line", func() (string, error) {
		var ready, health string
		err := poll(ctx, "the meshlessd health line", time.Until(e.dsReady.Add(healthWait)), nil, func() (bool, error) {
			lines, err := e.daemonLog(ctx)
			for _, l := range lines {
				switch l.Msg {
				case "meshlessd ready":
					ready = l.raw
				case "meshlessd health":
					health = l.raw
				}
			}
			return ready != "" && health != "", err
		})
		ev := fmt.Sprintf("ready: %s | health: %s", orNone(ready), orNone(health))
		if ready == "" {
			return ev, errors.New(`no "meshlessd ready" line`)
		}
		if err != nil {
			return ev, fmt.Errorf(`no "meshlessd health" line %s after the DaemonSet was ready: %w`, healthWait, err)
		}
		return ev, nil
	})

	r.check("h", "a pod that ran before meshless was installed is adopted: enrolled, mTLS, its own SPIFFE ID", func() (string, error) {
		if got := e.annotation(ctx, e.early); got != "enrolled" {
			return "", fmt.Errorf("pod %s: %s=%q, want \"enrolled\"", e.early.Name, statusAnnotation, got)
		}
		if err := toEarly.err(); err != nil {
			return "", err
		}
		earlyIP := netip.MustParseAddr(e.early.Status.PodIP)
		wire, err := tlsOnly(trace.Between(frontendIP, earlyIP), clear, fmt.Sprintf("frontend <-> early %s", earlyIP))
		if err != nil {
			return "", err
		}
		target := fmt.Sprintf("%s:%d", earlyIP, appPort)
		l, err := e.findLog(ctx, "an outbound connection to "+target+" with peer_id "+spiffeID(e.early), func(l logLine) bool {
			return l.Direction == "outbound" && l.Dst == target && l.PeerID == spiffeID(e.early)
		})
		if err != nil {
			return wire, err
		}
		return fmt.Sprintf("pod %s started %s, before the DaemonSet; %s=enrolled; %s; meshlessd: %s",
			e.early.Name, e.early.Status.StartTime.Format(time.RFC3339), statusAnnotation, wire, l.raw), nil
	})
}

// adoptWait bounds the wait for a pod that ran before the install to be enrolled: the daemon
// looks for such pods at start and then every 30s (--adopt-interval).
const adoptWait = 75 * time.Second

// exchangeWhenEnrolled waits until pod p is annotated enrolled, then runs an exchange from
// client to it. Before enrollment the exchange could pass in plaintext, which proves nothing.
func (e *e2e) exchangeWhenEnrolled(ctx context.Context, client, p corev1.Pod) exchangeResult {
	target := fmt.Sprintf("%s:%d", p.Status.PodIP, appPort)
	err := poll(ctx, "pod "+p.Name+" enrolled", adoptWait, nil, func() (bool, error) {
		return e.annotation(ctx, p) == "enrolled", nil
	})
	if err != nil {
		return exchangeResult{Target: target, Error: err.Error()}
	}
	return e.exchange(ctx, client, target)
}

// hostVeth returns the name of the node's end of the pod's eth0 (the bridge port).
func (e *e2e) hostVeth(ctx context.Context, p corev1.Pod) (string, error) {
	out, err := e.c.kubectl(ctx, nil, "exec", "-n", p.Namespace, p.Name, "-c", "main", "--", "/bin/busybox", "cat", "/sys/class/net/eth0/iflink")
	if err != nil {
		return "", err
	}
	idx, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		return "", fmt.Errorf("pod %s: eth0's iflink %q: %w", p.Name, out, err)
	}
	// This program runs in the node's network namespace: the index is one of its interfaces.
	ifc, err := net.InterfaceByIndex(idx)
	if err != nil {
		return "", fmt.Errorf("pod %s: the node's end of eth0 (index %d): %w", p.Name, idx, err)
	}
	return ifc.Name, nil

}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

func (e *e2e) annotation(ctx context.Context, p corev1.Pod) string {
	got, err := e.c.client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return got.Annotations[statusAnnotation]
}

// probeState passes when the pod is Ready with no restarts (its liveness probe never failed
// three times in a row).
func probeState(p *corev1.Pod) (string, error) {
	ready := false
	for _, cond := range p.Status.Conditions {
		if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
			ready = true
		}
	}
	var restarts int32
	for _, cs := range p.Status.ContainerStatuses {
		restarts += cs.RestartCount
	}
	ev := fmt.Sprintf("pod %s: Ready=%t, restarts=%d, probes httpGet :%d every 2s, running since %s",
		p.Name, ready, restarts, appPort, p.Status.StartTime.Format(time.RFC3339))
	if !ready || restarts > 0 {
		return ev, errors.New("probes failed: " + ev)
	}
	return ev, nil
}

// tlsOnly passes when the flows carry payload, every byte of it whole TLS records, and none of
// them shows the marker in clear.
func tlsOnly(flows []*conformance.Flow, clear []*conformance.Flow, what string) (string, error) {
	flows = conformance.WithPayload(flows)
	if len(flows) == 0 {
		return "", fmt.Errorf("%s: no flow with payload on the wire", what)
	}
	records, appData := 0, 0
	for _, f := range flows {
		if slices.Contains(clear, f) {
			return "", fmt.Errorf("%s: the marker is in clear in %s", what, f)
		}
		st, err := f.CheckTLS()
		if err != nil {
			return "", fmt.Errorf("%s: %w", what, err)
		}
		records += st.Records
		appData += st.Types[conformance.TLSApplicationData]
	}
	return fmt.Sprintf("%s: %d flows with payload, all TLS records (%d records, %d application data), marker never in clear",
		what, len(flows), records, appData), nil
}

// uninstall is check g: `kubectl delete -k install/` gives the node its conflist back byte for
// byte, and what becomes of the pods is measured.
func (e *e2e) uninstall(ctx context.Context) {
	c, r := e.c, e.r
	confPath := filepath.Join("/etc/cni/net.d", conflistName)
	chained, _ := os.ReadFile(confPath)
	wasChained := bytes.Contains(chained, []byte(`"meshless-cni"`))
	// meshlessd's log goes with its namespace: keep it with the run's logs.
	if out, err := c.kubectl(ctx, nil, "logs", "-n", meshlessNamespace, "ds/meshless", "--all-containers", "--prefix"); err == nil {
		_ = os.WriteFile(filepath.Join(c.dir, "meshlessd.log"), []byte(out), 0o644)
	}
	_, delErr := c.kubectl(ctx, nil, "delete", "-k", filepath.Join(c.o.repo, "install"), "--timeout=120s")

	r.check("g1", "kubectl delete -k install/ restores the original conflist byte for byte", func() (string, error) {
		if !wasChained {
			return "", fmt.Errorf("meshless-cni was not chained into %s while installed:\n%s", confPath, chained)
		}
		if delErr != nil {
			return "", delErr
		}
		after, err := os.ReadFile(confPath)
		if err != nil {
			return "", err
		}
		if !bytes.Equal(after, e.origConflist) {
			return "", fmt.Errorf("%s after delete:\n%s\nwant:\n%s", confPath, after, e.origConflist)
		}
		entries, _ := os.ReadDir("/etc/cni/net.d")
		var names []string
		for _, en := range entries {
			names = append(names, en.Name())
		}
		if _, err := os.Stat("/opt/cni/bin/meshless-cni"); !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("/opt/cni/bin/meshless-cni still there (%v)", err)
		}
		return fmt.Sprintf("while installed the conflist ended in meshless-cni; after delete %s equals the original (%d bytes), /etc/cni/net.d holds %v, /opt/cni/bin/meshless-cni is gone",
			conflistName, len(after), names), nil
	})

	// meshlessd releases the pods' capture when meshless itself is deleted (not on a restart):
	// the pods it enrolled go on in plaintext.
	backendTarget := fmt.Sprintf("%s:%d", e.backend.Status.PodIP, appPort)
	r.check("g2", "after delete, pods that were enrolled keep working, in plaintext (capture released)", func() (string, error) {
		capture, err := conformance.StartCapture(ctx, c.env, c.dir, "released", c.o.netns, bridgeName, "tcp")
		if err != nil {
			return "", err
		}
		var direct exchangeResult
		// The release runs as the daemon stops; give a slow node a few seconds past the delete.
		_ = poll(ctx, "an exchange between the formerly enrolled pods", 30*time.Second, nil, func() (bool, error) {
			direct = e.exchange(ctx, e.frontend, backendTarget)
			return direct.err() == nil, nil
		})
		viaService := e.exchange(ctx, e.frontend, fmt.Sprintf("%s:%d", e.clusterIP, servicePort))
		trace, err := capture.StopAndRead()
		if err != nil {
			return "", err
		}
		if err := direct.err(); err != nil {
			return "", fmt.Errorf("frontend -> backend: %w", err)
		}
		if err := viaService.err(); err != nil {
			return "", fmt.Errorf("frontend -> ClusterIP: %w", err)
		}
		frontendIP, backendIP := netip.MustParseAddr(e.frontend.Status.PodIP), netip.MustParseAddr(e.backend.Status.PodIP)
		var inClear []string
		for _, f := range trace.FlowsWithClear([]byte(e.marker)) {
			if f.Src.Addr() == frontendIP && f.Dst.Addr() == backendIP {
				inClear = append(inClear, f.String())
			}
		}
		if len(inClear) == 0 {
			return "", errors.New("frontend -> backend worked but the marker never appeared in clear: still captured?")
		}
		return fmt.Sprintf("frontend -> backend: %s; via ClusterIP: %s; marker in clear: %s", direct, viaService, strings.Join(inClear, ", ")), nil
	})
	r.note("after delete, enrolled frontend -> opted-out %s: %s", e.plain[1].Name, e.exchange(ctx, e.frontend, fmt.Sprintf("%s:%d", e.plain[1].Status.PodIP, appPort)))
	r.note("after delete, opted-out %s -> enrolled backend: %s", e.plain[0].Name, e.exchange(ctx, e.plain[0], backendTarget))
	time.Sleep(8 * time.Second) // four probe periods
	if p, err := c.client.CoreV1().Pods(appNamespace).Get(ctx, e.backend.Name, metav1.GetOptions{}); err == nil {
		ev, perr := probeState(p)
		r.note("after delete, enrolled backend's probes: %s (ok=%t)", ev, perr == nil)
	}

	r.check("g3", "after delete, pods outside meshless keep working and new pods work in plaintext", func() (string, error) {
		old := e.exchange(ctx, e.plain[0], fmt.Sprintf("%s:%d", e.plain[1].Status.PodIP, appPort))
		if err := old.err(); err != nil {
			return "", fmt.Errorf("existing plaintext pods: %w", err)
		}
		if _, err := c.kubectl(ctx, afterManifest(), "apply", "-f", "-"); err != nil {
			return "", err
		}
		if _, err := c.kubectl(ctx, nil, "rollout", "status", "-n", appNamespace, "deploy/after", "--timeout=120s"); err != nil {
			return "", err
		}
		after, err := e.onePod(ctx, "after")
		if err != nil {
			return "", err
		}
		if a := e.annotation(ctx, after); a != "" {
			return "", fmt.Errorf("new pod %s has %s=%q", after.Name, statusAnnotation, a)
		}
		capture, err := conformance.StartCapture(ctx, c.env, c.dir, "after", c.o.netns, bridgeName, "tcp")
		if err != nil {
			return "", err
		}
		x := e.exchange(ctx, e.plain[0], fmt.Sprintf("%s:%d", after.Status.PodIP, appPort))
		trace, err := capture.StopAndRead()
		if err != nil {
			return "", err
		}
		if err := x.err(); err != nil {
			return "", fmt.Errorf("to the new pod: %w", err)
		}
		afterIP := netip.MustParseAddr(after.Status.PodIP)
		for _, f := range trace.FlowsWithClear([]byte(e.marker)) {
			if f.Dst.Addr() == afterIP {
				return fmt.Sprintf("existing plain pods: %s; new pod %s (no %s annotation): %s, marker in clear: %s",
					old, after.Name, statusAnnotation, x, f), nil
			}
		}
		return "", fmt.Errorf("to the new pod %s: the marker never appeared in clear", after.Name)
	})
}
