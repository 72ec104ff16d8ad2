package kube

import (
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Pod is a core/v1 Pod as far as meshless reads it: the API server's JSON decodes into it, and
// the other fields are dropped on the way. It stands in for k8s.io/api/core/v1, whose types and
// their generated code (every core/v1 kind, with protobuf and deep-copy methods) are initialised
// in every daemon at start-up: about a megabyte of resident memory for fields meshless never
// reads. The watch's cache holds these smaller pods too.
type Pod struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              PodSpec   `json:"spec,omitempty"`
	Status            PodStatus `json:"status,omitempty"`
}

// PodSpec is the part of core/v1 PodSpec that meshless reads.
type PodSpec struct {
	NodeName           string `json:"nodeName,omitempty"`
	ServiceAccountName string `json:"serviceAccountName,omitempty"`
	HostNetwork        bool   `json:"hostNetwork,omitempty"`
}

// PodStatus is the part of core/v1 PodStatus that meshless reads.
type PodStatus struct {
	Phase  PodPhase `json:"phase,omitempty"`
	PodIPs []PodIP  `json:"podIPs,omitempty"`
}

// PodPhase is a pod's lifecycle phase (core/v1 PodPhase).
type PodPhase string

// PodRunning is the phase of a pod bound to a node whose containers have started.
const PodRunning PodPhase = "Running"

// PodIP is one of a pod's addresses (core/v1 PodIP).
type PodIP struct {
	IP string `json:"ip,omitempty"`
}

// PodList is a list of pods, as the API server answers a list (core/v1 PodList).
type PodList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Pod `json:"items"`
}

// podGroupVersion is core/v1, where pods are.
var podGroupVersion = schema.GroupVersion{Version: "v1"}

// addPodTypes registers Pod and PodList, and the meta/v1 types of a REST client (Status,
// WatchEvent, list options), in scheme under core/v1.
func addPodTypes(scheme *runtime.Scheme) {
	scheme.AddKnownTypes(podGroupVersion, &Pod{}, &PodList{})
	metav1.AddToGroupVersion(scheme, podGroupVersion)
}

// DeepCopyInto copies p into out, sharing nothing.
func (p *Pod) DeepCopyInto(out *Pod) {
	*out = *p
	p.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	out.Status.PodIPs = slices.Clone(p.Status.PodIPs)
}

// DeepCopyObject returns a copy of p that shares nothing with it (it implements runtime.Object).
func (p *Pod) DeepCopyObject() runtime.Object {
	if p == nil {
		return nil
	}
	out := new(Pod)
	p.DeepCopyInto(out)
	return out
}

// DeepCopyInto copies l into out, sharing nothing.
func (l *PodList) DeepCopyInto(out *PodList) {
	*out = *l
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	if l.Items != nil {
		out.Items = make([]Pod, len(l.Items))
		for i := range l.Items {
			l.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
}

// DeepCopyObject returns a copy of l that shares nothing with it (it implements runtime.Object).
func (l *PodList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	out := new(PodList)
	l.DeepCopyInto(out)
	return out
}
