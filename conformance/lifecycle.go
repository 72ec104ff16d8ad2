package conformance

import (
	"context"
	"fmt"
	"os"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
)

// GC runs CNI GC for the node's mesh network as a runtime does (libcni GCNetworkList), with the
// attachments of the pods it still runs: libcni first DELs every cached attachment of the network
// that valid does not list, then sends GC with valid to every plugin of the list. Plain pods share
// the network's name, so a plain pod that must survive has to be listed too.
func (n *Node) GC(ctx context.Context, valid ...*Pod) error {
	return n.gc(ctx, n.cni, valid)
}

// GCAfterCacheLoss runs the same GC as a runtime that has lost its libcni cache (its state was
// wiped, or it was reinstalled): it knows no attachment, so nothing is DELed and only the plugins'
// own GC cleans up. The pods it does not list keep their interfaces, so a test sees what
// meshless-cni's GC alone does to them.
func (n *Node) GCAfterCacheLoss(ctx context.Context, valid ...*Pod) error {
	dir, err := os.MkdirTemp(n.Dir, "lost-cni-cache-")
	if err != nil {
		return fmt.Errorf("creating an empty libcni cache: %w", err)
	}
	defer os.RemoveAll(dir)
	cni := libcni.NewCNIConfigWithCacheDir([]string{n.Cluster.Config.Bins.Dir}, dir, &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: n.cniLog}})
	return n.gc(ctx, cni, valid)
}

func (n *Node) gc(ctx context.Context, cni *libcni.CNIConfig, valid []*Pod) error {
	list, err := libcni.ConfListFromBytes(n.mesh)
	if err != nil {
		return fmt.Errorf("parsing conflist: %w", err)
	}
	// Never nil: plugins read a missing list as "the runtime did not say", an empty one as "none".
	args := &libcni.GCArgs{ValidAttachments: make([]types.GCAttachment, 0, len(valid))}
	for _, p := range valid {
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: p.ContainerID, IfName: p.rt.IfName})
	}
	if err := n.Do(func() error { return cni.GCNetworkList(ctx, list, args) }); err != nil {
		return fmt.Errorf("CNI GC on %s: %w", n.Name, err)
	}
	return nil
}

// Status runs CNI STATUS for the node's mesh network (libcni GetStatusNetworkList), as a runtime
// does to decide whether the node's network is ready for pods.
func (n *Node) Status(ctx context.Context) error {
	list, err := libcni.ConfListFromBytes(n.mesh)
	if err != nil {
		return fmt.Errorf("parsing conflist: %w", err)
	}
	if err := n.Do(func() error { return n.cni.GetStatusNetworkList(ctx, list) }); err != nil {
		return fmt.Errorf("CNI STATUS on %s: %w", n.Name, err)
	}
	return nil
}
