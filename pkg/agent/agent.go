// Package agent is the node daemon's core: it enrolls pods for the CNI plugin
// (it implements enroll.Service), gives each one an identity and a data path,
// keeps their records on disk so that a restarted daemon re-attaches to every
// pod without a CNI call, and forgets pods whose network namespace is gone.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshless/meshless/pkg/capture"
	"github.com/meshless/meshless/pkg/enroll"
	meshtls "github.com/meshless/meshless/pkg/tls"
	"github.com/meshless/meshless/pkg/tunnel"
)

// IdentitySource holds SVIDs for the identities that enrolled pods use.
type IdentitySource interface {
	// Acquire makes an SVID for the workload's ID available (reference counted).
	Acquire(w meshtls.Workload) error
	// Release drops one reference taken by Acquire.
	Release(id spiffeid.ID)
}

// Directory tells what the cluster knows about an enrolling pod: its service account and its
// annotations. The service account, given once at enrollment, fixes the pod's identity for the
// pod's whole life.
type Directory interface {
	// Describe returns the pod's service account and annotations; annotations are nil when the
	// directory does not know them.
	Describe(ctx context.Context, pod enroll.Pod) (serviceAccount string, annotations map[string]string, err error)
}

// StatusReporter publishes whether a pod is served, where operators look (the pod's
// meshless.io/status annotation in Kubernetes). It must not block.
type StatusReporter interface {
	Report(pod enroll.Pod, status string)
}

// WorkloadsFile resolves service accounts from a --workloads mapping, outside Kubernetes.
type WorkloadsFile struct{ Workloads meshtls.Workloads }

// Describe returns the mapped service account, "default" when the pod is not mapped, and no
// annotations.
func (w WorkloadsFile) Describe(_ context.Context, p enroll.Pod) (string, map[string]string, error) {
	return w.Workloads.ServiceAccount(p.Namespace, p.Name), nil, nil
}

// Config is what the agent is built from.
type Config struct {
	Node        string
	TrustDomain spiffeid.TrustDomain
	Mode        tunnel.Mode
	Backend     capture.Backend
	StateDir    string
	Directory   Directory
	// ExcludedNamespaces are namespaces whose pods are never enrolled (kube-system, say).
	ExcludedNamespaces []string
	// Reporter, when set, hears whether each pod enrolled (by the plugin or by adoption) is served.
	Reporter   StatusReporter
	Identities IdentitySource
	TLS        *meshtls.Configs
	Proxy      *tunnel.Proxy
	Log        *slog.Logger
}

// Agent enrolls, serves and forgets the pods of one node.
type Agent struct {
	cfg   Config
	store *store
	ready atomic.Bool

	mu   sync.Mutex
	pods map[string]*pod
	// pending holds restored records whose data path could not be opened yet
	// (for example while the previous daemon still holds the listeners during
	// an upgrade); Reconcile retries them.
	pending map[string]record
}

// pod is a pod the agent was asked to enroll: served (with an identity and a tunnel), or skipped
// (rec.Enrollment.Skipped says why; no identity, no tunnel), so that CHECK, DEL and restarts
// treat both alike.
type pod struct {
	rec    record
	id     spiffeid.ID
	tunnel *tunnel.PodTunnel
}

func (pd *pod) served() bool { return pd.tunnel != nil }

// New returns an agent with no pods; call Restore to bring back the pods that
// were enrolled before a restart.
func New(cfg Config) (*Agent, error) {
	st, err := newStore(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Agent{cfg: cfg, store: st, pods: make(map[string]*pod), pending: make(map[string]record)}, nil
}

// Enroll gives the pod its identity and opens its data path, or records it as skipped when
// policy excludes it (its namespace, its meshless.io/inject annotation). Enrolling the same
// container in the same netns again returns the existing enrollment; the same container ID in a
// new netns replaces the old enrollment.
func (a *Agent) Enroll(ctx context.Context, p enroll.Pod) (enroll.Enrollment, error) {
	if err := p.Validate(); err != nil {
		return enroll.Enrollment{}, err
	}
	nsID, err := statNetns(p.Netns)
	if err != nil {
		return enroll.Enrollment{}, fmt.Errorf("enroll pod %s/%s: %w: %w", p.Namespace, p.Name, enroll.ErrInvalid, err)
	}
	rec := record{Enrollment: enroll.Enrollment{Pod: p, EnrolledAt: time.Now().UTC()}, Netns: nsID}
	rec.Enrollment.Skipped = skipReason(a.cfg.ExcludedNamespaces, p.Namespace, p.Annotations)
	if rec.Enrollment.Skipped == "" {
		// Resolved before taking the lock: in Kubernetes this may wait for the API to show the pod.
		sa, annotations, err := a.cfg.Directory.Describe(ctx, p)
		if err != nil {
			return enroll.Enrollment{}, fmt.Errorf("enroll pod %s/%s: %w", p.Namespace, p.Name, err)
		}
		rec.ServiceAccount = sa
		if p.Annotations == nil {
			rec.Enrollment.Skipped = skipReason(nil, p.Namespace, annotations)
		}
	}
	e, err := a.enroll(rec)
	if err != nil {
		return enroll.Enrollment{}, err
	}
	a.report(e)
	e.Backend = string(a.cfg.Backend)
	return e, nil
}

func (a *Agent) enroll(rec record) (enroll.Enrollment, error) {
	p := rec.Enrollment.Pod
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.pending, p.ContainerID)
	if old, ok := a.pods[p.ContainerID]; ok {
		if old.rec.Netns == rec.Netns && slices.Equal(old.rec.Enrollment.Pod.IPs, p.IPs) && old.rec.Enrollment.Skipped == rec.Enrollment.Skipped {
			return old.rec.Enrollment, nil
		}
		a.detachLocked(old, "re-enrolled with a new network namespace, new addresses or a new decision")
	}
	// One network namespace is one pod: an enrollment of it under another container ID (a
	// sandbox the daemon adopted, now seen by the runtime's own CNI ADD) replaces the old one.
	for _, other := range a.pods {
		if other.rec.Netns == rec.Netns {
			a.detachLocked(other, "its network namespace was enrolled again as container "+p.ContainerID)
		}
	}
	pd := &pod{rec: rec}
	if rec.Enrollment.Skipped == "" {
		var err error
		if pd, err = a.attachLocked(rec); err != nil {
			return enroll.Enrollment{}, err
		}
	} else {
		a.pods[p.ContainerID] = pd
	}
	if err := a.store.save(pd.rec); err != nil {
		a.detachLocked(pd, "state not saved")
		return enroll.Enrollment{}, fmt.Errorf("enroll pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	if !pd.served() {
		a.cfg.Log.Info("pod skipped", "pod", p.Name, "namespace", p.Namespace, "container_id", p.ContainerID, "reason", rec.Enrollment.Skipped)
		return pd.rec.Enrollment, nil
	}
	a.cfg.Log.Info("pod enrolled", "pod", p.Name, "namespace", p.Namespace, "container_id", p.ContainerID,
		"spiffe_id", pd.id.String(), "ips", p.IPs, "netns", p.Netns)
	return pd.rec.Enrollment, nil
}

// report tells the status reporter, if any, how the pod is served.
func (a *Agent) report(e enroll.Enrollment) {
	if a.cfg.Reporter == nil {
		return
	}
	status := StatusEnrolled
	if e.Skipped != "" {
		status = "skipped: " + e.Skipped
	}
	a.cfg.Reporter.Report(e.Pod, status)
}

// attachLocked takes the identity the record names and opens the pod's listeners.
func (a *Agent) attachLocked(rec record) (*pod, error) {
	p := rec.Enrollment.Pod
	id, err := meshtls.WorkloadID(a.cfg.TrustDomain, p.Namespace, rec.ServiceAccount)
	if err != nil {
		return nil, fmt.Errorf("enroll pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	w := meshtls.Workload{ID: id, Namespace: p.Namespace, ServiceAccount: rec.ServiceAccount, PodName: p.Name, PodUID: p.UID}
	if err := a.cfg.Identities.Acquire(w); err != nil {
		return nil, fmt.Errorf("enroll pod %s/%s: identity %s: %w", p.Namespace, p.Name, id, err)
	}
	t, err := a.cfg.Proxy.Attach(tunnel.Pod{
		Namespace: p.Namespace,
		Name:      p.Name,
		Netns:     p.Netns,
		IPs:       p.IPs,
		ID:        id,
	})
	if err != nil {
		a.cfg.Identities.Release(id)
		return nil, fmt.Errorf("enroll pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	rec.Enrollment.SPIFFEID = id.String()
	pd := &pod{rec: rec, id: id, tunnel: t}
	a.pods[p.ContainerID] = pd
	return pd, nil
}

// detachLocked closes the pod's data path and forgets it, on disk too.
func (a *Agent) detachLocked(pd *pod, reason string) {
	p := pd.rec.Enrollment.Pod
	delete(a.pods, p.ContainerID)
	if pd.served() {
		pd.tunnel.Close()
		a.cfg.Identities.Release(pd.id)
		if !a.identityInUseLocked(pd.id) {
			a.cfg.TLS.Forget(pd.id)
		}
	}
	if err := a.store.remove(p.ContainerID); err != nil {
		a.cfg.Log.Error("pod state not removed", "pod", p.Name, "namespace", p.Namespace, "reason", err)
	}
	a.cfg.Log.Info("pod removed", "pod", p.Name, "namespace", p.Namespace, "container_id", p.ContainerID, "reason", reason)
}

func (a *Agent) identityInUseLocked(id spiffeid.ID) bool {
	for _, pd := range a.pods {
		if pd.id == id {
			return true
		}
	}
	return false
}

// Remove closes the pod's listeners and connections and forgets it.
func (a *Agent) Remove(_ context.Context, containerID string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if pd, ok := a.pods[containerID]; ok {
		a.detachLocked(pd, "CNI DEL")
	}
	return a.dropPendingLocked(containerID)
}

func (a *Agent) dropPendingLocked(containerID string) error {
	if _, ok := a.pending[containerID]; !ok {
		return nil
	}
	delete(a.pending, containerID)
	return a.store.remove(containerID)
}

// Get returns the pod's enrollment.
func (a *Agent) Get(_ context.Context, containerID string) (enroll.Enrollment, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	pd, ok := a.pods[containerID]
	if !ok {
		return enroll.Enrollment{}, fmt.Errorf("container %s: %w", containerID, enroll.ErrNotFound)
	}
	e := pd.rec.Enrollment
	e.Backend = string(a.cfg.Backend)
	return e, nil
}

// GC forgets every pod that the runtime no longer lists.
func (a *Agent) GC(_ context.Context, keep []string) ([]string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var (
		removed []string
		errs    []error
	)
	for id, pd := range a.pods {
		if !slices.Contains(keep, id) {
			a.detachLocked(pd, "CNI GC")
			removed = append(removed, id)
		}
	}
	for id := range a.pending {
		if !slices.Contains(keep, id) {
			errs = append(errs, a.dropPendingLocked(id))
			removed = append(removed, id)
		}
	}
	slices.Sort(removed)
	return removed, errors.Join(errs...)
}

// Status describes the agent for the plugin and for operators.
func (a *Agent) Status(context.Context) enroll.Status {
	a.mu.Lock()
	served, skipped := 0, 0
	for _, pd := range a.pods {
		if pd.served() {
			served++
		} else {
			skipped++
		}
	}
	pending := len(a.pending)
	a.mu.Unlock()
	return enroll.Status{
		Node:        a.cfg.Node,
		Backend:     string(a.cfg.Backend),
		Ready:       a.ready.Load(),
		Pods:        served,
		Skipped:     skipped,
		Pending:     pending,
		TrustDomain: a.cfg.TrustDomain.Name(),
		Mode:        string(a.cfg.Mode),
	}
}

// Ready reports whether Restore has finished.
func (a *Agent) Ready() bool { return a.ready.Load() }

// Restore re-attaches every pod enrolled before a restart whose network
// namespace still exists, and drops the records of the others. It returns the
// number of pods re-attached.
func (a *Agent) Restore() int {
	records, errs := a.store.load()
	for _, err := range errs {
		a.cfg.Log.Error("pod state unreadable; skipped", "reason", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	restored := 0
	for _, rec := range records {
		if a.restoreLocked(rec) {
			restored++
		}
	}
	a.ready.Store(true)
	return restored
}

// restoreLocked re-attaches one recorded pod, drops the record of a pod that
// is gone, and keeps the record pending when attaching fails.
func (a *Agent) restoreLocked(rec record) bool {
	p := rec.Enrollment.Pod
	delete(a.pending, p.ContainerID)
	if err := a.stillThere(rec); err != nil {
		a.cfg.Log.Info("pod gone while the daemon was down", "pod", p.Name, "namespace", p.Namespace, "reason", err)
		if err := a.store.remove(p.ContainerID); err != nil {
			a.cfg.Log.Error("pod state not removed", "pod", p.Name, "namespace", p.Namespace, "reason", err)
		}
		return false
	}
	if rec.Enrollment.Skipped != "" {
		a.pods[p.ContainerID] = &pod{rec: rec}
		return false
	}
	pd, err := a.attachLocked(rec)
	if err != nil {
		a.pending[p.ContainerID] = rec
		a.cfg.Log.Error("pod not re-attached; will retry", "pod", p.Name, "namespace", p.Namespace, "reason", err)
		return false
	}
	a.cfg.Log.Info("pod re-attached", "pod", p.Name, "namespace", p.Namespace, "spiffe_id", pd.id.String())
	return true
}

func (a *Agent) stillThere(rec record) error {
	id, err := statNetns(rec.Enrollment.Pod.Netns)
	if err != nil {
		return err
	}
	if id != rec.Netns {
		return errors.New("netns path now names another namespace")
	}
	return nil
}

// RefuseIPv6 gives the IPv6 refusal to each served pod whose IPv6 link-local address is a way
// around its capture (capture.LacksIPv6Refusal): a pod without an IPv6 address that an earlier
// meshless-cni captured, before pods got the IPv6 chains that refuse such traffic. The chains
// repeat the capture's exclusions, which are known only to the plugin's configuration, so
// recapture runs the plugin again for the pod (adopt.Recapture); a pod it cannot repair is
// named in a warning, to be recreated. It runs one ip6tables-save in each pod's netns, so the
// daemon calls it once, in the background, once it serves enrollments (recapture enrolls the pod
// again); a last line says how many pods it checked, found and repaired.
func (a *Agent) RefuseIPv6(recapture func(enroll.Pod) error) {
	a.mu.Lock()
	var pods []enroll.Pod
	for _, pd := range a.pods {
		if pd.served() {
			pods = append(pods, pd.rec.Enrollment.Pod)
		}
	}
	a.mu.Unlock()
	found, repaired := 0, 0
	for _, p := range pods {
		lacks, err := capture.LacksIPv6Refusal(p.Netns, a.cfg.Backend, p.IPs)
		if errors.Is(err, exec.ErrNotFound) {
			// An image without iptables (see the Dockerfile's static target): no pod can be checked.
			a.cfg.Log.Warn("IPv6 refusal not checked", "reason", err)
			return
		}
		if err != nil {
			a.cfg.Log.Warn("IPv6 refusal not checked", "pod", p.Name, "namespace", p.Namespace, "reason", err)
			continue
		}
		if !lacks {
			continue
		}
		found++
		if err := a.recaptureIPv6(p, recapture); err != nil {
			a.cfg.Log.Warn("pod's IPv6 link-local address is not captured: recreate the pod", "pod", p.Name, "namespace", p.Namespace,
				"reason", fmt.Errorf("captured by a meshless-cni older than the IPv6 refusal, and running meshless-cni again did not help: %w", err))
			continue
		}
		repaired++
		a.cfg.Log.Info("pod's IPv6 link-local address refused now", "pod", p.Name, "namespace", p.Namespace,
			"reason", "captured by a meshless-cni older than the IPv6 refusal")
	}
	a.cfg.Log.Info("IPv6 refusal checked", "pods", len(pods), "unrefused", found, "repaired", repaired)
}

// recaptureIPv6 runs recapture for a pod that lacks the IPv6 refusal, and checks that the pod has
// it afterwards: a meshless-cni in the CNI bin dir older than this daemon succeeds without it.
func (a *Agent) recaptureIPv6(p enroll.Pod, recapture func(enroll.Pod) error) error {
	if err := recapture(p); err != nil {
		return err
	}
	lacks, err := capture.LacksIPv6Refusal(p.Netns, a.cfg.Backend, p.IPs)
	if err == nil && lacks {
		err = errors.New("meshless-cni ADD succeeded, but the pod still has no IPv6 refusal (is the plugin in the CNI bin dir older than meshlessd?)")
	}
	return err
}

// Reconcile forgets, every interval until ctx ends, the pods whose network
// namespace has gone without a CNI DEL reaching us (the daemon was down or
// unreachable when the runtime tore the pod down), and retries the restored
// pods that could not be re-attached yet.
func (a *Agent) Reconcile(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		a.mu.Lock()
		for _, pd := range a.pods {
			if err := a.stillThere(pd.rec); err != nil {
				a.detachLocked(pd, "netns gone: "+err.Error())
			}
		}
		for _, rec := range a.pending {
			a.restoreLocked(rec)
		}
		a.mu.Unlock()
	}
}

// Close detaches every pod's data path but keeps their records, so that the
// next daemon re-attaches them. Until then their traffic is refused.
func (a *Agent) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ready.Store(false)
	for _, pd := range a.pods {
		if pd.served() {
			pd.tunnel.Close()
		}
	}
	clear(a.pods)
	a.store.close()
}

// Identities returns the identities of the pods served, each once.
func (a *Agent) Identities() []spiffeid.ID {
	a.mu.Lock()
	defer a.mu.Unlock()
	var ids []spiffeid.ID
	for _, pd := range a.pods {
		if pd.served() && !slices.Contains(ids, pd.id) {
			ids = append(ids, pd.id)
		}
	}
	return ids
}

// Known reports whether a pod with this Kubernetes UID is enrolled or skipped here.
func (a *Agent) Known(uid string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, pd := range a.pods {
		if pd.rec.Enrollment.Pod.UID == uid {
			return true
		}
	}
	for _, rec := range a.pending {
		if rec.Enrollment.Pod.UID == uid {
			return true
		}
	}
	return false
}

// Uninstall takes meshless out of every pod, for the removal of meshless from the node: it
// removes the pods' capture rules, closes their data paths and forgets their records, so that
// the pods go on talking in plaintext rather than being cut off by rules nobody serves. It
// returns how many pods it released; a pod whose rules cannot be removed keeps its record (and
// fails closed), and its error is returned.
func (a *Agent) Uninstall() (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	released := 0
	var errs []error
	for _, pd := range a.pods {
		p := pd.rec.Enrollment.Pod
		if pd.served() {
			if err := capture.Remove(p.Netns, capture.Config{Backend: a.cfg.Backend, PodIPs: p.IPs}); err != nil {
				errs = append(errs, fmt.Errorf("pod %s/%s: %w", p.Namespace, p.Name, err))
				continue
			}
			released++
		}
		a.detachLocked(pd, "meshless uninstalled")
	}
	return released, errors.Join(errs...)
}
