package kube_test

import (
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshless/meshless/pkg/kube"
)

func TestUninstallingTellsRemovalFromRestart(t *testing.T) {
	ctx := testCtx(t)
	c := server(t).Client
	ns := newNamespace(t, ctx)
	labels := map[string]string{"app": "meshless"}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "meshless", Namespace: ns},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "meshlessd", Image: "meshless/meshlessd:dev"}}},
			},
		},
	}
	if _, err := c.AppsV1().DaemonSets(ns).Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	check := func(what, ns string, want bool) {
		t.Helper()
		got, err := kube.Uninstalling(ctx, daemonClient, ns, "meshless")
		if err != nil || got != want {
			t.Errorf("%s: Uninstalling = (%v, %v), want %v", what, got, err, want)
		}
	}
	check("DaemonSet and namespace in place (a restart)", ns, false)
	if err := c.AppsV1().DaemonSets(ns).Delete(ctx, "meshless", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	check("DaemonSet deleted", ns, true)
	check("namespace gone", "no-such-namespace", true)

	// Without a controller manager the namespace stays terminating: its deletion has begun.
	other := newNamespace(t, ctx)
	ds.Namespace = other
	if _, err := c.AppsV1().DaemonSets(other).Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.CoreV1().Namespaces().Delete(ctx, other, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	check("namespace being deleted", other, true)

	// A client whose rights are gone (our ClusterRole deleted) or whose token is (our
	// ServiceAccount deleted) is being removed too.
	kc, err := server(t).WriteKubeconfig("nobody.kubeconfig", "nobody")
	if err != nil {
		t.Fatal(err)
	}
	nobody, err := kube.NewClient(kc)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := kube.Uninstalling(ctx, nobody, ns, "meshless"); err != nil || !got {
		t.Errorf("client without rights: Uninstalling = (%v, %v), want true", got, err)
	}
}
