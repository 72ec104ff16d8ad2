package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"

	"github.com/meshless/meshless/pkg/enroll"
)

// statusRetryMax bounds the wait between attempts to write one pod's status.
const statusRetryMax = time.Minute

// StatusWriter writes one annotation (meshless.io/status) on this node's pods in the background:
// Report never waits for the API server, so enrollment never depends on it. The latest value
// reported for a pod wins; a write that fails is retried with backoff, except when the pod is gone
// or has been replaced (another UID): then there is nothing left to annotate.
type StatusWriter struct {
	client rest.Interface
	key    string
	log    *slog.Logger

	mu      sync.Mutex
	pending map[statusKey]*statusWrite
	kick    chan struct{}
}

type statusKey struct{ namespace, name string }

type statusWrite struct {
	uid, value string
	attempts   int
	notBefore  time.Time
}

// NewStatusWriter returns a writer of annotation key through client (a core/v1 REST client, as
// NewClient returns); Run does the writing.
func NewStatusWriter(client rest.Interface, key string, log *slog.Logger) *StatusWriter {
	if log == nil {
		log = slog.Default()
	}
	return &StatusWriter{client: client, key: key, log: log, pending: make(map[statusKey]*statusWrite), kick: make(chan struct{}, 1)}
}

// Report queues the pod's status (it implements agent.StatusReporter).
func (w *StatusWriter) Report(p enroll.Pod, status string) {
	w.mu.Lock()
	w.pending[statusKey{p.Namespace, p.Name}] = &statusWrite{uid: p.UID, value: status}
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Run writes queued statuses until ctx ends.
func (w *StatusWriter) Run(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := w.writeDue(ctx)
		timer.Reset(next)
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
		case <-timer.C:
		}
	}
}

// writeDue writes every status whose time has come and returns how long until the next one is due.
func (w *StatusWriter) writeDue(ctx context.Context) time.Duration {
	now := time.Now()
	next := time.Hour
	w.mu.Lock()
	due := make(map[statusKey]statusWrite)
	for k, sw := range w.pending {
		if wait := sw.notBefore.Sub(now); wait > 0 {
			next = min(next, wait)
			continue
		}
		due[k] = *sw
	}
	w.mu.Unlock()

	for k, sw := range due {
		err := w.write(ctx, k, sw)
		w.mu.Lock()
		// A newer Report for the pod replaced sw while it was written: keep that one queued.
		if cur := w.pending[k]; cur != nil && cur.value == sw.value && cur.uid == sw.uid {
			switch {
			case err == nil:
				delete(w.pending, k)
			case apierrors.IsNotFound(err) || apierrors.IsConflict(err) || apierrors.IsInvalid(err):
				// A replaced pod fails the UID precondition as Invalid ("metadata.uid: field is
				// immutable"): retrying cannot help any of these.
				w.log.Info("pod status not written: the pod is gone or was replaced", "pod", k.name, "namespace", k.namespace, "reason", err)
				delete(w.pending, k)
			default:
				cur.attempts++
				backoff := min(time.Second<<min(cur.attempts, 6), statusRetryMax)
				cur.notBefore = time.Now().Add(backoff)
				next = min(next, backoff)
				w.log.Warn("pod status not written; will retry", "pod", k.name, "namespace", k.namespace, "reason", err, "retry_in", backoff.String())
			}
		}
		w.mu.Unlock()
	}
	return next
}

// write sets the annotation with a JSON merge patch. The pod's UID, when known, goes into the
// patch as a precondition: the API server refuses it for a newer pod of the same name.
func (w *StatusWriter) write(ctx context.Context, k statusKey, sw statusWrite) error {
	meta := map[string]any{"annotations": map[string]string{w.key: sw.value}}
	if sw.uid != "" {
		meta["uid"] = sw.uid
	}
	body, err := json.Marshal(map[string]any{"metadata": meta})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err = w.client.Patch(types.MergePatchType).Namespace(k.namespace).Resource("pods").Name(k.name).Body(body).Do(ctx).Error()
	if err != nil {
		return fmt.Errorf("annotate pod %s/%s %s=%q: %w", k.namespace, k.name, w.key, sw.value, err)
	}
	return nil
}
