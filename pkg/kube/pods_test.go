package kube_test

// Unit tests with client-go's fake clientset, for what a real API server cannot show: a pod with
// no service account name (admission always fills it in), a watch that never synced, and client
// construction errors. The behaviour against a real API server is in apiserver_test.go.

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"

	"github.com/meshless/meshless/pkg/enroll"
	"github.com/meshless/meshless/pkg/kube"
)

func TestNewNeedsClientAndNode(t *testing.T) {
	if _, err := kube.New(kube.Config{Node: "n1"}); err == nil {
		t.Error("New without a client: no error")
	}
	if _, err := kube.New(kube.Config{ListWatch: fakePods()}); err == nil {
		t.Error("New without a node name: no error")
	}
}

// fakePods lists and watches pods from client-go's fake clientset holding objs, converted to
// kube.Pod through their JSON as the API server's answers are.
func fakePods(objs ...runtime.Object) cache.ListerWatcher {
	c := fake.NewClientset(objs...)
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			list, err := c.CoreV1().Pods(metav1.NamespaceAll).List(ctx, o)
			if err != nil {
				return nil, err
			}
			var out kube.PodList
			return &out, viaJSON(list, &out)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			w, err := c.CoreV1().Pods(metav1.NamespaceAll).Watch(ctx, o)
			if err != nil {
				return nil, err
			}
			return watch.Filter(w, func(e watch.Event) (watch.Event, bool) {
				if pod, ok := e.Object.(*corev1.Pod); ok {
					var out kube.Pod
					if err := viaJSON(pod, &out); err != nil {
						panic(err)
					}
					e.Object = &out
				}
				return e, true
			}), nil
		},
	}
}

func viaJSON(from, to any) error {
	raw, err := json.Marshal(from)
	if err != nil {
		return err
	}
	return json.Unmarshal(raw, to)
}

func TestEmptyServiceAccountNameIsDefault(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web", UID: "u1"},
		Spec:       corev1.PodSpec{NodeName: "n1"},
	}
	pods, err := kube.New(kube.Config{ListWatch: fakePods(pod), Node: "n1", Wait: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	startWatch(t, pods)
	sa, _, err := pods.Describe(context.Background(), enroll.Pod{Namespace: "shop", Name: "web", UID: "u1"})
	if err != nil || sa != "default" {
		t.Fatalf("Describe = (%q, %v), want default", sa, err)
	}
}

func TestUnsyncedWatchTimesOutAndSaysSo(t *testing.T) {
	pods, err := kube.New(kube.Config{ListWatch: fakePods(), Node: "n1", Wait: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	// Never run: the API server is unreachable, say.
	_, _, err = pods.Describe(context.Background(), enroll.Pod{Namespace: "shop", Name: "web", UID: "u1"})
	if !errors.Is(err, kube.ErrPodNotFound) {
		t.Fatalf("error %v, want ErrPodNotFound", err)
	}
	for _, want := range []string{"shop/web", "uid u1", "node n1", "not synced"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestCallerCancellationIsNotATimeout(t *testing.T) {
	pods, err := kube.New(kube.Config{ListWatch: fakePods(), Node: "n1", Wait: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, _, err = pods.Describe(ctx, enroll.Pod{Namespace: "shop", Name: "web"})
	if !errors.Is(err, context.Canceled) || errors.Is(err, kube.ErrPodNotFound) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
}

func TestNewClientErrors(t *testing.T) {
	// Outside a pod, with no kubeconfig, there is nothing to connect with.
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	if _, err := kube.NewClient(""); err == nil || !strings.Contains(err.Error(), "in-cluster") {
		t.Errorf("NewClient(\"\") outside a cluster: error %v, want one about the in-cluster configuration", err)
	}
	missing := filepath.Join(t.TempDir(), "nope.kubeconfig")
	if _, err := kube.NewClient(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("NewClient(%s): error %v, want one naming the file", missing, err)
	}
}

func TestPodDeepCopySharesNothing(t *testing.T) {
	now := metav1.Now()
	orig := &kube.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Annotations: map[string]string{"a": "1"}, DeletionTimestamp: &now},
		Status:     kube.PodStatus{Phase: kube.PodRunning, PodIPs: []kube.PodIP{{IP: "10.0.0.1"}}},
	}
	cp := orig.DeepCopyObject().(*kube.Pod)
	cp.Annotations["a"] = "2"
	cp.Status.PodIPs[0].IP = "10.0.0.2"
	*cp.DeletionTimestamp = metav1.Time{}
	if orig.Annotations["a"] != "1" || orig.Status.PodIPs[0].IP != "10.0.0.1" || orig.DeletionTimestamp.IsZero() {
		t.Errorf("changing the copy changed the original: %+v", orig)
	}
	list := &kube.PodList{Items: []kube.Pod{*orig}}
	lcp := list.DeepCopyObject().(*kube.PodList)
	lcp.Items[0].Status.PodIPs[0].IP = "10.0.0.3"
	if orig.Status.PodIPs[0].IP != "10.0.0.1" {
		t.Error("changing a copied list changed the original pod")
	}
}
