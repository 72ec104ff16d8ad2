package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"github.com/meshless/meshless/pkg/agent"
	"github.com/meshless/meshless/pkg/kube"
	meshtls "github.com/meshless/meshless/pkg/tls"
)

// kubeFlags are the `meshlessd run` flags about the Kubernetes API, where enrolling pods'
// service accounts come from in a cluster.
type kubeFlags struct {
	kubeconfig string
	podWait    time.Duration
}

func (k *kubeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&k.kubeconfig, "kubeconfig", "",
		"kubeconfig of the Kubernetes API that pods' service accounts come from; without it (and without --workloads) "+
			"a daemon running in a pod uses the in-cluster configuration")
	fs.DurationVar(&k.podWait, "pod-wait", kube.DefaultWait,
		"how long an enrollment waits for its pod to appear in the Kubernetes API before the CNI ADD fails")
}

func (k *kubeFlags) validate(workloads string) error {
	if k.kubeconfig != "" && workloads != "" {
		return errors.New("--kubeconfig and --workloads exclude each other: service accounts come from the API or from the file")
	}
	if k.podWait <= 0 {
		return fmt.Errorf("--pod-wait %s: must be positive", k.podWait)
	}
	return nil
}

// kubeView is the daemon's view of the Kubernetes API: the watch of this node's pods and the
// writer of their status annotation. Both are nil outside Kubernetes.
type kubeView struct {
	client rest.Interface
	pods   *kube.Pods
	status *kube.StatusWriter
}

// reporter is where the agent reports pods' status: nowhere outside Kubernetes.
func (k kubeView) reporter() agent.StatusReporter {
	if k.status == nil {
		return nil
	}
	return k.status
}

// run starts the watch and the writer, until ctx ends.
func (k kubeView) run(ctx context.Context) {
	if k.pods != nil {
		go k.pods.Run(ctx)
	}
	if k.status != nil {
		go k.status.Run(ctx)
	}
}

// podDirectory returns where enrolling pods' service accounts and annotations come from: the
// Kubernetes API with --kubeconfig, or in a pod when --workloads is not given; the --workloads
// file otherwise.
func podDirectory(f *runFlags, log *slog.Logger) (agent.Directory, kubeView, error) {
	if f.kube.kubeconfig == "" && (f.workloads != "" || !kube.InCluster()) {
		workloads, err := meshtls.LoadWorkloads(f.workloads)
		if err != nil {
			return nil, kubeView{}, err
		}
		return agent.WorkloadsFile{Workloads: workloads}, kubeView{}, nil
	}
	// client-go reports through klog (a watch that fails, access that RBAC denies): into the
	// daemon's own JSON log, not a second format on stderr.
	klog.SetSlogLogger(log.With("component", "client-go"))
	client, err := kube.NewClient(f.kube.kubeconfig)
	if err != nil {
		return nil, kubeView{}, err
	}
	pods, err := kube.New(kube.Config{Client: client, Node: f.node, Wait: f.kube.podWait, Log: log})
	if err != nil {
		return nil, kubeView{}, err
	}
	from := f.kube.kubeconfig
	if from == "" {
		from = "in-cluster"
	}
	log.Info("pods' service accounts and annotations from the Kubernetes API", "node", f.node, "kubeconfig", from, "pod_wait", f.kube.podWait.String())
	return pods, kubeView{client: client, pods: pods, status: kube.NewStatusWriter(client, agent.AnnotationStatus, log)}, nil
}
