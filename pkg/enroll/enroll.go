// Package enroll is the API between the CNI plugin (meshless-cni) and the node daemon (meshlessd):
// HTTP with JSON bodies over a root-only unix socket. The plugin asks the daemon to enroll
// each new pod, then installs its capture rules unless the daemon skipped the pod; the daemon
// implements Service and serves it with pkg/enrollhttp's Handler.
package enroll

import (
	"context"
	"errors"
	"net/netip"
	"time"
)

// DefaultSocket is where meshlessd serves the enrollment API on every node.
const DefaultSocket = "/var/run/meshless/cni.sock"

var (
	// ErrNotFound reports a container ID that is not enrolled.
	ErrNotFound = errors.New("pod not enrolled")
	// ErrInvalid reports a request the daemon cannot use; the handler answers it with HTTP 400.
	ErrInvalid = errors.New("invalid request")
	// ErrNotReady reports a daemon that cannot enroll pods yet (it is still re-attaching the pods
	// it served before a restart); the handler answers it with HTTP 503, and the runtime retries.
	ErrNotReady = errors.New("meshlessd not ready")
)

// Pod is what the plugin knows about a new pod when it enrolls it.
type Pod struct {
	ContainerID string       `json:"containerID"`
	IfName      string       `json:"ifName"`
	Netns       string       `json:"netns"`
	Namespace   string       `json:"namespace"`
	Name        string       `json:"name"`
	UID         string       `json:"uid,omitempty"`
	IPs         []netip.Addr `json:"ips"`
	// Annotations are the pod's annotations as the runtime passed them to the plugin (containerd's
	// io.kubernetes.cri.pod-annotations capability). nil means the runtime did not say, and the
	// daemon looks at the Kubernetes API instead; an empty map means the pod has none.
	Annotations map[string]string `json:"annotations"`
}

// Enrollment is the daemon's record of a pod it was asked to enroll.
type Enrollment struct {
	Pod Pod `json:"pod"`
	// SPIFFEID is the identity the pod's connections carry; empty when the pod is skipped.
	SPIFFEID string `json:"spiffeID,omitempty"`
	// Skipped, when set, says why the daemon does not serve the pod (an excluded namespace, the
	// meshless.io/inject: "false" annotation): the plugin then leaves the pod's traffic alone.
	Skipped    string    `json:"skipped,omitempty"`
	EnrolledAt time.Time `json:"enrolledAt"`
	// Backend is the node's iptables backend, in which the plugin installs the pod's rules (so
	// that ADD needs one call to the daemon, not two).
	Backend string `json:"backend,omitempty"`
}

// Status describes the daemon; the plugin reads Backend so that every pod's rules use the
// iptables backend that the node already uses.
type Status struct {
	Node    string `json:"node"`
	Backend string `json:"backend"`
	Ready   bool   `json:"ready"`
	// Pods counts the pods served; Skipped those that policy leaves alone; Pending those restored
	// from disk whose data path could not be re-opened yet.
	Pods        int    `json:"pods"`
	Skipped     int    `json:"skipped"`
	Pending     int    `json:"pending"`
	TrustDomain string `json:"trustDomain"`
	Mode        string `json:"mode"`
}

// Service is what the daemon implements; Handler serves it on the socket.
type Service interface {
	// Enroll starts serving a pod; enrolling a pod that is already enrolled is not an error.
	Enroll(ctx context.Context, p Pod) (Enrollment, error)
	// Remove forgets a pod; an unknown container ID is not an error.
	Remove(ctx context.Context, containerID string) error
	// Get returns the enrollment of a pod, or an error wrapping ErrNotFound.
	Get(ctx context.Context, containerID string) (Enrollment, error)
	// GC forgets every pod whose container ID is not in keep and returns the IDs it forgot.
	GC(ctx context.Context, keep []string) (removed []string, err error)
	// Status describes the daemon.
	Status(ctx context.Context) Status
}

// MaxBodyBytes bounds request bodies: a pod is well under 4 KiB, a GC keep list of a few
// thousand container IDs well under 1 MiB.
const MaxBodyBytes = 1 << 20

// GCRequest is the body of POST /v1/gc.
type GCRequest struct {
	// Keep lists the container IDs that are still valid; it must be present, and an empty list
	// forgets every pod.
	Keep []string `json:"keep"`
}

// GCResponse is the answer to POST /v1/gc.
type GCResponse struct {
	Removed []string `json:"removed"`
}

// ErrorBody is the body of every error answer.
type ErrorBody struct {
	Error string `json:"error"`
}
