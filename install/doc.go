// Package install holds meshless's Kubernetes manifests: a kustomize base (kubectl apply -k
// install/). Its test decodes every object strictly into its k8s.io/api type and checks the
// DaemonSet's settings; `make manifests` also renders the base with kubectl kustomize.
package install
