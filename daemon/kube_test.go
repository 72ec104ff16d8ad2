package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"

	"github.com/meshless/meshless/pkg/agent"
	"github.com/meshless/meshless/pkg/kube"
)

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

func TestPodDirectorySource(t *testing.T) {
	workloads := filepath.Join(t.TempDir(), "workloads.json")
	if err := os.WriteFile(workloads, []byte(`{"shop/web": "seller"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		inCluster bool
		args      []string
		want      string // "file", "kubernetes", or an error substring
	}{
		{"nothing: workloads file", false, nil, "file"},
		{"workloads file", false, []string{"--workloads", workloads}, "file"},
		{"kubeconfig", false, []string{"--kubeconfig", kubeconfig}, "kubernetes"},
		{"in a pod without --workloads: in-cluster", true, nil, "in-cluster"},
		{"in a pod with --workloads: the file", true, []string{"--workloads", workloads}, "file"},
		{"kubeconfig beats in-cluster", true, []string{"--kubeconfig", kubeconfig}, "kubernetes"},
		{"both flags", false, []string{"--kubeconfig", kubeconfig, "--workloads", workloads}, "exclude each other"},
		{"missing kubeconfig", false, []string{"--kubeconfig", kubeconfig + ".missing"}, "kubeconfig.missing"},
		{"zero pod wait", false, []string{"--kubeconfig", kubeconfig, "--pod-wait", "0s"}, "--pod-wait"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.inCluster {
				// A pod's environment without its service account token: in-cluster is chosen, and
				// fails with the reason.
				t.Setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
				t.Setenv("KUBERNETES_SERVICE_PORT", "1")
			} else {
				t.Setenv("KUBERNETES_SERVICE_HOST", "")
			}
			got, err := accountsFrom(append([]string{"--node-name", "n1", "--mesh-cidr", "10.244.0.0/16"}, tc.args...))
			switch tc.want {
			case "file", "kubernetes":
				if err != nil || got != tc.want {
					t.Fatalf("got (%q, %v), want %s", got, err, tc.want)
				}
			default:
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("got (%q, %v), want an error about %q", got, err, tc.want)
				}
			}
		})
	}
}

// accountsFrom says where `meshlessd run args` takes service accounts from.
func accountsFrom(args []string) (string, error) {
	f, err := parseRunFlags(args)
	if err != nil {
		return "", err
	}
	dir, kv, err := podDirectory(f, discard)
	if err != nil {
		return "", err
	}
	switch a := dir.(type) {
	case agent.WorkloadsFile:
		if kv.reporter() != nil {
			return "", errors.New("a status reporter outside Kubernetes")
		}
		return "file", nil
	case *kube.Pods:
		if a != kv.pods {
			return "", errors.New("the watch to run is not the one that answers")
		}
		if kv.reporter() == nil {
			return "", errors.New("no status reporter in Kubernetes")
		}
		return "kubernetes", nil
	}
	return fmt.Sprintf("%T", dir), nil
}

// fakePods lists and watches pods from client-go's fake clientset, empty.
func fakePods() cache.ListerWatcher {
	c := fake.NewClientset()
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return c.CoreV1().Pods(metav1.NamespaceAll).List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return c.CoreV1().Pods(metav1.NamespaceAll).Watch(ctx, o)
		},
	}
}

func TestNotReadyUntilPodsSynced(t *testing.T) {
	ag, err := agent.New(agent.Config{StateDir: t.TempDir(), Log: discard})
	if err != nil {
		t.Fatal(err)
	}
	ag.Restore()
	pods, err := kube.New(kube.Config{ListWatch: fakePods(), Node: "n1", Log: discard})
	if err != nil {
		t.Fatal(err)
	}
	h := healthHandler(ag, nil, pods)
	readyz := func() (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := readyz(); code != http.StatusServiceUnavailable || !strings.Contains(body, "Kubernetes API") {
		t.Fatalf("before the pod list: /readyz = %d %q, want 503 naming the Kubernetes API", code, body)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go pods.Run(ctx)
	for !pods.Synced() {
		time.Sleep(10 * time.Millisecond)
	}
	if code, body := readyz(); code != http.StatusOK {
		t.Fatalf("after the pod list: /readyz = %d %q, want 200", code, body)
	}
}
