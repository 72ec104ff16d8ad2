// Package kube is the node daemon's view of its own node's pods in the Kubernetes API: an informer
// on the pods whose spec.nodeName is this node, from which enrolling pods take their service
// account and annotations (agent.Directory), and the writer of their meshless.io/status
// annotation.
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshless/meshless/pkg/enroll"
)

// DefaultWait bounds how long Describe waits for a pod to appear. It stays below the CNI
// plugin's 10 s enrollment request timeout, so that the plugin gets the daemon's own error (which
// says what is missing) rather than a time-out of its request.
const DefaultWait = 5 * time.Second

// ErrPodNotFound reports a pod that did not appear on this node in the API in time. The CNI ADD
// fails with it and the runtime retries the sandbox; a service account is never guessed.
var ErrPodNotFound = errors.New("pod not found in the Kubernetes API")

// errWaited is the cause of a Describe context that ran out of its own wait, as opposed to
// the caller's context ending.
var errWaited = errors.New("waited too long")

// InCluster reports whether the process runs in a Kubernetes pod, where the in-cluster
// configuration (the pod's service account token) applies.
func InCluster() bool {
	return os.Getenv("KUBERNETES_SERVICE_HOST") != ""
}

// NewClient connects to the API server described by the kubeconfig file at path or, when path is
// empty, by the in-cluster configuration. The client is a REST client of the core/v1 API only,
// decoding pods into Pod: not client-go's typed clientset, whose scheme registers every API group
// at start-up and costs the daemon tens of MiB of resident memory for types it never reads.
func NewClient(kubeconfig string) (rest.Interface, error) {
	var (
		rc  *rest.Config
		err error
	)
	if kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
		}
	} else {
		rc, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig and no usable in-cluster configuration: %w", err)
		}
	}
	rc.UserAgent = "meshlessd"
	client, err := coreV1Client(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return client, nil
}

// coreV1Client is a REST client of the core/v1 API at rc, with a scheme of its own that knows
// Pod, PodList and the meta/v1 types (Status, WatchEvent, list options) and nothing else. It
// speaks JSON, which decodes into Pod whatever fields the server adds.
func coreV1Client(rc *rest.Config) (*rest.RESTClient, error) {
	scheme := runtime.NewScheme()
	addPodTypes(scheme)
	cfg := rest.CopyConfig(rc)
	cfg.APIPath = "/api"
	cfg.GroupVersion = &podGroupVersion
	cfg.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if cfg.UserAgent == "" {
		cfg.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	return rest.RESTClientFor(cfg)
}

// Config is what Pods is built from.
type Config struct {
	// Client is a REST client of the core/v1 API, as NewClient returns.
	Client rest.Interface
	// ListWatch, when set, lists and watches the node's pods (as *Pod and *PodList) in place of
	// Client (which may then be nil): tests use it to serve pods from client-go's fake clientset.
	// It must itself keep to the pods of Node, as Client's list and watch do with a
	// spec.nodeName field selector.
	ListWatch cache.ListerWatcher
	// Node is this node's name: only pods with this spec.nodeName are watched.
	Node string
	// Wait bounds how long Describe waits for a pod to appear; 0 means DefaultWait.
	Wait time.Duration
	Log  *slog.Logger
}

// Pods watches the pods of one node. Run starts the watch; Describe and List answer from it.
type Pods struct {
	node     string
	wait     time.Duration
	log      *slog.Logger
	informer cache.SharedIndexInformer

	mu sync.Mutex
	// changed is closed, and replaced, whenever a pod is added or updated: waiters in
	// Describe look again then, instead of polling.
	changed chan struct{}
	// waiting, when set, is called each time Describe starts waiting for the pod: tests
	// use it to create the pod only once enrollment has looked for it.
	waiting func(enroll.Pod)
}

// New returns the watch of cfg.Node's pods, not yet started.
func New(cfg Config) (*Pods, error) {
	if cfg.Client == nil && cfg.ListWatch == nil {
		return nil, errors.New("kube: no client")
	}
	if cfg.Node == "" {
		return nil, errors.New("kube: no node name")
	}
	if cfg.Wait <= 0 {
		cfg.Wait = DefaultWait
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	lw := cfg.ListWatch
	if lw == nil {
		onNode := fields.OneTermEqualSelector("spec.nodeName", cfg.Node).String()
		lw = cache.NewFilteredListWatchFromClient(cfg.Client, "pods", metav1.NamespaceAll,
			func(o *metav1.ListOptions) { o.FieldSelector = onNode })
	}
	// No resync: the answer depends only on what the API says, and every change arrives by watch.
	informer := cache.NewSharedIndexInformer(lw, &Pod{}, 0, cache.Indexers{})
	// The server's field-ownership records are the bulk of a pod's metadata and never read.
	if err := informer.SetTransform(dropManagedFields); err != nil {
		return nil, fmt.Errorf("kube: pod informer: %w", err)
	}
	p := &Pods{node: cfg.Node, wait: cfg.Wait, log: cfg.Log, informer: informer, changed: make(chan struct{})}
	if _, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { p.notify() },
		UpdateFunc: func(any, any) { p.notify() },
	}); err != nil {
		return nil, fmt.Errorf("kube: pod informer: %w", err)
	}
	return p, nil
}

func dropManagedFields(obj any) (any, error) {
	if pod, ok := obj.(*Pod); ok {
		pod.ManagedFields = nil
	}
	return obj, nil
}

// Run watches the node's pods until ctx ends.
func (p *Pods) Run(ctx context.Context) {
	go p.informer.Run(ctx.Done())
	if cache.WaitForCacheSync(ctx.Done(), p.informer.HasSynced) {
		p.log.Info("kubernetes pods synced", "node", p.node, "pods", len(p.informer.GetStore().ListKeys()))
	}
	<-ctx.Done()
}

// List returns the node's pods as the watch last saw them. The pods are shared with the watch's
// cache: callers must not modify them.
func (p *Pods) List() []*Pod {
	objs := p.informer.GetStore().List()
	out := make([]*Pod, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*Pod))
	}
	return out
}

// Synced reports whether the first list of the node's pods has arrived; until then the daemon is
// not ready.
func (p *Pods) Synced() bool { return p.informer.HasSynced() }

func (p *Pods) notify() {
	p.mu.Lock()
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

func (p *Pods) changes() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.changed
}

// Describe returns the service account and the annotations of the pod that the API shows on this
// node with the enrolling pod's namespace, name and (when the CNI args carry it) UID. A pod the
// watch has not seen yet is waited for, at most the configured wait; a pod of the same name with
// another UID (an older pod of a StatefulSet, say) is never taken for it.
func (p *Pods) Describe(ctx context.Context, want enroll.Pod) (string, map[string]string, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, p.wait, errWaited)
	defer cancel()
	key := want.Namespace + "/" + want.Name
	var other string
	for {
		// Taken before looking: the informer updates its store before it calls the handlers,
		// so a pod stored after this look closes this channel.
		changed := p.changes()
		obj, ok, err := p.informer.GetStore().GetByKey(key)
		if err != nil {
			return "", nil, fmt.Errorf("pod %s in the informer cache: %w", key, err)
		}
		if ok {
			pod := obj.(*Pod)
			if want.UID == "" || string(pod.UID) == want.UID {
				annotations := pod.Annotations
				if annotations == nil {
					// The API's answer is authoritative: a pod without annotations has none.
					annotations = map[string]string{}
				}
				return serviceAccountName(pod), annotations, nil
			}
			other = string(pod.UID)
		}
		if p.waiting != nil {
			p.waiting(want)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return "", nil, p.notFound(want, other, context.Cause(ctx))
		}
	}
}

func (p *Pods) notFound(want enroll.Pod, otherUID string, cause error) error {
	what := fmt.Sprintf("pod %s/%s", want.Namespace, want.Name)
	if want.UID != "" {
		what += " uid " + want.UID
	}
	if !errors.Is(cause, errWaited) {
		return fmt.Errorf("waiting for %s in the Kubernetes API: %w", what, cause)
	}
	detail := ""
	switch {
	case !p.informer.HasSynced():
		detail = " (the pod list has not synced with the API server yet)"
	case otherUID != "":
		detail = fmt.Sprintf(" (the API shows a pod of that name with uid %s)", otherUID)
	}
	return fmt.Errorf("%w: %s not on node %s after %s%s", ErrPodNotFound, what, p.node, p.wait, detail)
}

// serviceAccountName is the pod's service account; an empty name means "default", as in
// Kubernetes (its admission fills it in, but an API server without that plugin leaves it empty).
func serviceAccountName(pod *Pod) string {
	if pod.Spec.ServiceAccountName == "" {
		return "default"
	}
	return pod.Spec.ServiceAccountName
}
