package kube_test

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshless/meshless/pkg/enroll"
	"github.com/meshless/meshless/pkg/kube"
)

const statusKey = "meshless.io/status"

// startStatusWriter runs a status writer with the daemon's rights until the test ends.
func startStatusWriter(t *testing.T) *kube.StatusWriter {
	t.Helper()
	server(t)
	w := kube.NewStatusWriter(daemonClient, statusKey, nil)
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		w.Run(ctx)
		close(done)
	}()
	t.Cleanup(func() {
		stop()
		<-done
	})
	return w
}

// annotationEventually waits until the pod's status annotation is want.
func annotationEventually(t *testing.T, ctx context.Context, ns, name, want string) {
	t.Helper()
	deadline := time.Now().Add(resolveWait)
	for {
		p, err := server(t).Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		got, ok := p.Annotations[statusKey]
		if ok && got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s/%s: %s = %q (set: %v), want %q", ns, name, statusKey, got, ok, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestStatusWriterAnnotatesPods(t *testing.T) {
	ctx := testCtx(t)
	ns := newNamespace(t, ctx, "app")
	node := unique("node")
	pod := createPod(t, ctx, ns, "web", node, "app")
	w := startStatusWriter(t)

	w.Report(enrolling(pod), "enrolled")
	annotationEventually(t, ctx, ns, "web", "enrolled")

	// The latest report wins, and the pod's other annotations stay.
	p, err := server(t).Client.CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Annotations["team"] = "payments"
	if _, err := server(t).Client.CoreV1().Pods(ns).Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	w.Report(enrolling(pod), "skipped: annotation meshless.io/inject is \"false\"")
	annotationEventually(t, ctx, ns, "web", "skipped: annotation meshless.io/inject is \"false\"")
	p, err = server(t).Client.CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Annotations["team"] != "payments" {
		t.Errorf("annotations after the status write: %v; the other annotation is lost", p.Annotations)
	}
}

// A pod that was replaced (same name, new UID) or deleted is not annotated, and the writer gives up
// on it instead of retrying forever.
func TestStatusWriterLeavesReplacedAndDeletedPods(t *testing.T) {
	ctx := testCtx(t)
	ns := newNamespace(t, ctx, "app")
	node := unique("node")
	current := createPod(t, ctx, ns, "web", node, "app")
	w := startStatusWriter(t)

	stale := enrolling(current)
	stale.UID = "00000000-0000-0000-0000-000000000001"
	w.Report(stale, "enrolled")
	w.Report(enroll.Pod{Namespace: ns, Name: "gone", UID: "00000000-0000-0000-0000-000000000002"}, "enrolled")

	deadline := time.Now().Add(resolveWait)
	for kube.Pending(w) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d status writes still pending after %s", kube.Pending(w), resolveWait)
		}
		time.Sleep(50 * time.Millisecond)
	}
	p, err := server(t).Client.CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := p.Annotations[statusKey]; ok {
		t.Errorf("the current pod got %s = %q from a report about its predecessor", statusKey, v)
	}
}
