package main

import (
	"fmt"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

// fallbackNamespace is the namespace of pods whose runtime passes no Kubernetes arguments.
const fallbackNamespace = "default"

// fallbackNameLen is how many characters of the container ID name such a pod, as a short
// container ID does in `crictl ps` or `docker ps`.
const fallbackNameLen = 12

// cniArgs are the keys meshless-cni reads from CNI_ARGS; the names are the keys.
type cniArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
}

// podIdentity names the pod being wired.
type podIdentity struct {
	Namespace        string
	Name             string
	UID              string
	InfraContainerID string
	// Fallback is set when CNI_ARGS had no Kubernetes arguments and the name was made up.
	Fallback bool
}

// identity reads the pod's identity from CNI_ARGS, falling back (see the package comment) when
// no Kubernetes argument is present at all.
func identity(args *skel.CmdArgs) (podIdentity, error) {
	a := cniArgs{}
	// CNI_ARGS is shared by every plugin of the chain: keys meant for others are expected.
	a.IgnoreUnknown = true
	if err := types.LoadArgs(args.Args, &a); err != nil {
		return podIdentity{}, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("cannot parse CNI_ARGS: %v", err), "")
	}
	id := podIdentity{
		Namespace:        string(a.K8S_POD_NAMESPACE),
		Name:             string(a.K8S_POD_NAME),
		UID:              string(a.K8S_POD_UID),
		InfraContainerID: string(a.K8S_POD_INFRA_CONTAINER_ID),
	}
	switch {
	case id.Namespace != "" && id.Name != "":
		return id, nil
	case id.Namespace != "" || id.Name != "":
		return podIdentity{}, types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("CNI_ARGS has K8S_POD_NAMESPACE=%q and K8S_POD_NAME=%q: the runtime must pass both or neither", id.Namespace, id.Name), "")
	}
	id.Namespace = fallbackNamespace
	id.Name = fallbackName(args.ContainerID)
	id.Fallback = true
	return id, nil
}

// fallbackName makes a DNS-1123 label from the start of a container ID.
func fallbackName(containerID string) string {
	s := strings.ToLower(containerID)
	if len(s) > fallbackNameLen {
		s = s[:fallbackNameLen]
	}
	// Container IDs may hold '_' and '.', which a label may not.
	s = strings.Map(func(r rune) rune {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			return r
		}
		return '-'
	}, s)
	s = strings.Trim(s, "-")
	if s == "" {
		return "pod"
	}
	return s
}
