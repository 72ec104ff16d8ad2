package kube

import (
	"context"
	"encoding/json"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
)

// Uninstalling tells, when a meshless pod is asked to stop, whether meshless is being removed
// (`kubectl delete -k install/`: its DaemonSet or its namespace is gone or being deleted) rather
// than restarted (a rolling update, a node drain). Only removal should unchain the plugin and
// release the pods: during a restart their traffic must stay captured and refused until the new
// daemon is back. client is a core/v1 REST client, as NewClient returns.
func Uninstalling(ctx context.Context, client rest.Interface, namespace, daemonSet string) (bool, error) {
	// Only the metadata of the namespace and of the DaemonSet is read, off the server's JSON.
	var ns objectMeta
	raw, err := client.Get().Resource("namespaces").Name(namespace).DoRaw(ctx)
	if err == nil {
		err = json.Unmarshal(raw, &ns)
	}
	switch {
	case apierrors.IsNotFound(err):
		return true, nil
	case apierrors.IsUnauthorized(err) || apierrors.IsForbidden(err):
		// `kubectl delete -k` also deletes our ServiceAccount (its tokens stop working) and our
		// ClusterRole, often before our pods are stopped: losing them means removal. Were it a
		// mistake, the next daemon adopts the released pods again.
		return true, nil
	case err != nil:
		return false, fmt.Errorf("namespace %s: %w", namespace, err)
	case ns.Metadata.DeletionTimestamp != nil:
		return true, nil
	}
	// DaemonSets are in apps/v1, outside the core/v1 client's scheme.
	raw, err = client.Get().AbsPath("/apis/apps/v1/namespaces", namespace, "daemonsets", daemonSet).DoRaw(ctx)
	switch {
	case apierrors.IsNotFound(err), apierrors.IsUnauthorized(err), apierrors.IsForbidden(err):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("daemonset %s/%s: %w", namespace, daemonSet, err)
	}
	var ds objectMeta
	if err := json.Unmarshal(raw, &ds); err != nil {
		return false, fmt.Errorf("daemonset %s/%s: %w", namespace, daemonSet, err)
	}
	return ds.Metadata.DeletionTimestamp != nil, nil
}

// objectMeta is any API object, as far as its metadata.
type objectMeta struct {
	Metadata metav1.ObjectMeta `json:"metadata"`
}
