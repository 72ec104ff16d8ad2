package kube_test

// Tests against a real kube-apiserver and etcd (conformance/kubeapi): pods are created through the
// API with spec.nodeName set, as the scheduler would, and the daemon's watch runs with the rights
// the DaemonSet gets (get, list and watch pods), not as an administrator.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshless/meshless/conformance/kubeapi"
	"github.com/meshless/meshless/pkg/enroll"
	"github.com/meshless/meshless/pkg/kube"
)

// resolveWait bounds the waits that must succeed: generous, so that a loaded machine never fails
// them; a pod that resolves does so as soon as the watch delivers it.
const resolveWait = 30 * time.Second

// absentWait bounds the waits that must fail: the pod is never delivered, however long we wait.
const absentWait = 2 * time.Second

// mainEnv runs the API server's cleanups when the test binary ends.
type mainEnv struct {
	cleanups []func()
	failed   bool
}

func (e *mainEnv) Cleanup(f func())                { e.cleanups = append(e.cleanups, f) }
func (e *mainEnv) Logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
func (e *mainEnv) Failed() bool                    { return e.failed }

// run runs the cleanups newest first, as testing does.
func (e *mainEnv) run() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
}

var (
	env       = &mainEnv{}
	apiOnce   sync.Once
	apiServer *kubeapi.Server
	// daemonClient has the daemon's rights only.
	daemonClient rest.Interface
	// daemonKubeconfig is its kubeconfig, as meshlessd --kubeconfig reads it.
	daemonKubeconfig string
	apiErr           error
)

func TestMain(m *testing.M) {
	code := m.Run()
	env.failed = code != 0
	env.run()
	os.Exit(code)
}

// server starts the API server on first use and gives the daemon's user its rights.
func server(t *testing.T) *kubeapi.Server {
	t.Helper()
	apiOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		apiServer, apiErr = kubeapi.Start(ctx, env, kubeapi.Config{})
		if apiErr != nil {
			return
		}
		daemonKubeconfig, apiErr = apiServer.WriteKubeconfig("meshlessd.kubeconfig", "meshlessd")
		if apiErr != nil {
			return
		}
		if apiErr = grantPodReader(ctx, apiServer.Client, "meshlessd"); apiErr != nil {
			return
		}
		daemonClient, apiErr = kube.NewClient(daemonKubeconfig)
	})
	if apiErr != nil {
		t.Fatal(apiErr)
	}
	return apiServer
}

// grantPodReader gives user what meshlessd needs from the API, as install/rbac.yaml does: get,
// list and watch pods, patch them (their meshless.io/status annotation), and get namespaces and
// daemonsets (to tell an uninstall from a restart).
func grantPodReader(ctx context.Context, c kubernetes.Interface, user string) error {
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "meshless-pod-reader"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch", "patch"}},
			{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"get"}},
			{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"}, Verbs: []string{"get"}},
		},
	}
	if _, err := c.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating cluster role: %w", err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "meshless-pod-reader"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: user}},
	}
	if _, err := c.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating cluster role binding: %w", err)
	}
	return nil
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// unique returns prefix plus a random suffix: every test has its own namespace and node names.
func unique(prefix string) string {
	return prefix + "-" + strings.ToLower(rand.Text()[:8])
}

// newNamespace creates a namespace with the given service accounts.
func newNamespace(t *testing.T, ctx context.Context, accounts ...string) string {
	t.Helper()
	c := server(t).Client
	ns := unique("ns")
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// There is no controller manager to create service accounts; the ServiceAccount admission
	// plugin refuses pods whose account does not exist.
	for _, sa := range accounts {
		if _, err := c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return ns
}

// createPod creates a pod bound to node, as the scheduler would, and returns it as stored.
func createPod(t *testing.T, ctx context.Context, ns, name, node, sa string) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{
			NodeName:           node,
			ServiceAccountName: sa,
			Containers:         []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}},
		},
	}
	created, err := server(t).Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s/%s: %v", ns, name, err)
	}
	return created
}

// watchNode starts the daemon's watch of node's pods and waits until it has synced.
func watchNode(t *testing.T, ctx context.Context, node string, wait time.Duration) *kube.Pods {
	t.Helper()
	server(t)
	pods, err := kube.New(kube.Config{Client: daemonClient, Node: node, Wait: wait})
	if err != nil {
		t.Fatal(err)
	}
	startWatch(t, pods)
	return pods
}

func startWatch(t *testing.T, pods *kube.Pods) {
	t.Helper()
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		pods.Run(runCtx)
		close(done)
	}()
	t.Cleanup(func() {
		stop()
		<-done
	})
	deadline := time.Now().Add(resolveWait)
	for !pods.Synced() {
		if time.Now().After(deadline) {
			t.Fatalf("pod watch not synced after %s", resolveWait)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func enrolling(p *corev1.Pod) enroll.Pod {
	return enroll.Pod{Namespace: p.Namespace, Name: p.Name, UID: string(p.UID)}
}

func TestServiceAccountsOfTwoAccounts(t *testing.T) {
	ctx := testCtx(t)
	ns := newNamespace(t, ctx, "buyer", "seller")
	node := unique("node")
	client := createPod(t, ctx, ns, "client", node, "buyer")
	srv := createPod(t, ctx, ns, "server", node, "seller")
	pods := watchNode(t, ctx, node, resolveWait)

	for _, tc := range []struct {
		pod  enroll.Pod
		want string
	}{
		{enrolling(client), "buyer"},
		{enrolling(srv), "seller"},
		// A runtime that passes no K8S_POD_UID: namespace and name decide.
		{enroll.Pod{Namespace: ns, Name: "server"}, "seller"},
	} {
		got, _, err := pods.Describe(ctx, tc.pod)
		if err != nil {
			t.Fatalf("%s/%s: %v", tc.pod.Namespace, tc.pod.Name, err)
		}
		if got != tc.want {
			t.Errorf("%s/%s: service account %q, want %q", tc.pod.Namespace, tc.pod.Name, got, tc.want)
		}
	}
}

// The runtime may call CNI ADD before the watch has delivered the pod: enrollment waits for it.
func TestPodAppearingAfterEnrollmentStarted(t *testing.T) {
	ctx := testCtx(t)
	ns := newNamespace(t, ctx, "late")
	node := unique("node")
	server(t)
	pods, err := kube.New(kube.Config{Client: daemonClient, Node: node, Wait: resolveWait})
	if err != nil {
		t.Fatal(err)
	}
	waiting := make(chan struct{})
	var once sync.Once
	kube.SetWaiting(pods, func(enroll.Pod) { once.Do(func() { close(waiting) }) })
	startWatch(t, pods)

	// The UID is the API server's to choose, so this enrollment names the pod without one.
	type answer struct {
		sa  string
		err error
	}
	got := make(chan answer, 1)
	go func() {
		sa, _, err := pods.Describe(ctx, enroll.Pod{Namespace: ns, Name: "web"})
		got <- answer{sa, err}
	}()
	select {
	case <-waiting:
	case a := <-got:
		t.Fatalf("Describe answered (%q, %v) before the pod existed", a.sa, a.err)
	}
	createPod(t, ctx, ns, "web", node, "late")
	a := <-got
	if a.err != nil || a.sa != "late" {
		t.Fatalf("Describe = (%q, %v), want late", a.sa, a.err)
	}
}

// A pod deleted and created again under the same name (a StatefulSet's) is another pod: the
// enrollment of one never takes the other's service account.
func TestRecreatedPodIsMatchedByUID(t *testing.T) {
	ctx := testCtx(t)
	ns := newNamespace(t, ctx, "old-sa", "new-sa")
	node := unique("node")
	pods := watchNode(t, ctx, node, resolveWait)
	old := createPod(t, ctx, ns, "db-0", node, "old-sa")
	if sa, _, err := pods.Describe(ctx, enrolling(old)); err != nil || sa != "old-sa" {
		t.Fatalf("first pod: Describe = (%q, %v), want old-sa", sa, err)
	}
	grace := int64(0)
	if err := server(t).Client.CoreV1().Pods(ns).Delete(ctx, "db-0", metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Fatal(err)
	}
	recreated := createPod(t, ctx, ns, "db-0", node, "new-sa")
	if recreated.UID == old.UID {
		t.Fatal("the API server gave the recreated pod the same UID")
	}
	// The watch may still show the old pod when this is asked: the answer waits for the new one.
	if sa, _, err := pods.Describe(ctx, enrolling(recreated)); err != nil || sa != "new-sa" {
		t.Fatalf("recreated pod: Describe = (%q, %v), want new-sa", sa, err)
	}
	// Now the watch shows only the new pod: the old UID is never answered with its account.
	pods2 := watchNode(t, ctx, node, absentWait)
	_, _, err := pods2.Describe(ctx, enrolling(old))
	if !errors.Is(err, kube.ErrPodNotFound) {
		t.Fatalf("old pod's UID: error %v, want ErrPodNotFound", err)
	}
	if !strings.Contains(err.Error(), string(recreated.UID)) {
		t.Errorf("error %q does not name the UID the API shows (%s)", err, recreated.UID)
	}
}

// The watch holds only this node's pods: a pod bound to another node is never resolved here,
// even though the API serves it and the watch delivers later pods.
func TestPodOnAnotherNodeIsIgnored(t *testing.T) {
	ctx := testCtx(t)
	ns := newNamespace(t, ctx, "mine", "theirs")
	here, there := unique("node"), unique("node")
	hereWatch := watchNode(t, ctx, here, absentWait)
	elsewhere := createPod(t, ctx, ns, "elsewhere", there, "theirs")
	local := createPod(t, ctx, ns, "local", here, "mine")

	// A fresh wait for the local pod: it is created after the other node's pod, so once it
	// resolves the watch has had every chance to deliver the other one too.
	localWatch := watchNode(t, ctx, here, resolveWait)
	if sa, _, err := localWatch.Describe(ctx, enrolling(local)); err != nil || sa != "mine" {
		t.Fatalf("local pod: Describe = (%q, %v), want mine", sa, err)
	}
	if sa, _, err := hereWatch.Describe(ctx, enrolling(local)); err != nil || sa != "mine" {
		t.Fatalf("local pod (first watch): Describe = (%q, %v), want mine", sa, err)
	}
	_, _, err := hereWatch.Describe(ctx, enrolling(elsewhere))
	if !errors.Is(err, kube.ErrPodNotFound) {
		t.Fatalf("pod on node %s: error %v, want ErrPodNotFound", there, err)
	}
	if !strings.Contains(err.Error(), "not on node "+here) {
		t.Errorf("error %q does not say which node was watched", err)
	}
	// The pod is real: the watch of its own node resolves it.
	if sa, _, err := watchNode(t, ctx, there, resolveWait).Describe(ctx, enrolling(elsewhere)); err != nil || sa != "theirs" {
		t.Fatalf("pod on its own node: Describe = (%q, %v), want theirs", sa, err)
	}
}
