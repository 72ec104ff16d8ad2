package meshtls

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultServiceAccount is the service account of a pod that no mapping names, as in Kubernetes.
const DefaultServiceAccount = "default"

// Workloads maps "namespace/name" of a pod to its service account. It stands in for the Kubernetes
// API outside a cluster (demo, tests). The nil Workloads maps every pod to the default account.
type Workloads map[string]string

// LoadWorkloads reads a JSON object {"namespace/name": "serviceaccount", ...} from path. An empty
// path (no --workloads flag) gives the empty mapping.
func LoadWorkloads(path string) (Workloads, error) {
	if path == "" {
		return nil, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("workloads file: %w", err)
	}
	var w Workloads
	if err := json.Unmarshal(data, &w); err != nil {
		return nil, fmt.Errorf(`workloads file %s: want a JSON object {"namespace/name": "serviceaccount", ...}: %w`, path, err)
	}
	// Sorted so that a file with several mistakes always reports the same one first.
	for _, key := range slices.Sorted(maps.Keys(w)) {
		if err := validateWorkload(key, w[key]); err != nil {
			return nil, fmt.Errorf("workloads file %s: %w", path, err)
		}
	}
	return w, nil
}

func validateWorkload(key, sa string) error {
	ns, name, ok := strings.Cut(key, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return fmt.Errorf("key %q: want namespace/name", key)
	}
	// Both end up in a SPIFFE ID path, so they must be valid path segments.
	if err := spiffeid.ValidatePathSegment(ns); err != nil {
		return fmt.Errorf("key %q: namespace: %w", key, err)
	}
	if err := spiffeid.ValidatePathSegment(sa); err != nil {
		return fmt.Errorf("key %q: service account %q: %w", key, sa, err)
	}
	return nil
}

// ServiceAccount returns the service account of pod namespace/name, DefaultServiceAccount when
// unmapped.
func (w Workloads) ServiceAccount(namespace, name string) string {
	if sa, ok := w[namespace+"/"+name]; ok {
		return sa
	}
	return DefaultServiceAccount
}
