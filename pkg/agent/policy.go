package agent

import (
	"fmt"
	"slices"
)

const (
	// AnnotationInject set to "false" on a pod keeps meshless away from it: its traffic is not
	// captured and it gets no identity.
	AnnotationInject = "meshless.io/inject"
	// AnnotationStatus is where the daemon publishes how it serves a pod: StatusEnrolled, or
	// "skipped: <reason>".
	AnnotationStatus = "meshless.io/status"
	// StatusEnrolled is AnnotationStatus's value for a pod whose traffic goes through meshless.
	StatusEnrolled = "enrolled"
)

// skipReason says why a pod of namespace ns with these annotations is not to be enrolled, or
// returns "" when it is.
func skipReason(excluded []string, ns string, annotations map[string]string) string {
	if slices.Contains(excluded, ns) {
		return fmt.Sprintf("namespace %s is excluded", ns)
	}
	if v, ok := annotations[AnnotationInject]; ok && v == "false" {
		return fmt.Sprintf("annotation %s is %q", AnnotationInject, v)
	}
	return ""
}
