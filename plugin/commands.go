package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/meshless/meshless/pkg/capture"
	"github.com/meshless/meshless/pkg/enroll"
)

// cmdAdd enrolls the pod and captures its traffic. The daemon decides whether the pod is served
// (it may skip it: an excluded namespace, the meshless.io/inject: "false" annotation) and in which
// iptables backend its rules go. When the daemon has published the node's backend beside its
// socket, the rules go in while the daemon enrolls the pod, and are taken out again if it skips
// the pod or the enrollment fails (unless they were in place before this ADD: a retried ADD of a
// pod that may be running keeps them); otherwise they go in after the enrollment. Either way the
// pod's containers start only after ADD succeeds, so nothing in the pod sends a packet before
// both steps are done, and ADD fails, leaving neither step in place, unless both succeed.
func cmdAdd(args *skel.CmdArgs) error {
	ctx := context.Background()
	at, err := prepare(args)
	if err != nil {
		return err
	}
	conf, pod, id, client := at.conf, at.pod, at.id, at.client
	log := conf.logger("ADD").With("namespace", pod.Namespace, "pod", pod.Name, "container", pod.ContainerID, "netns", pod.Netns)
	if id.Fallback {
		log.Warn("CNI_ARGS has no K8S_POD_NAMESPACE/K8S_POD_NAME (not run by Kubernetes?); enrolling the pod under a name made from its container ID")
	}
	var early func() installed
	if b := capture.Backend(enroll.BackendHint(conf.SocketPath)); b == capture.Legacy || b == capture.NFT {
		early = at.install(b, log)
	}
	e, err := client.Enroll(ctx, pod)
	var done *installed
	if early != nil {
		r := early()
		done = &r
	}
	if err != nil {
		err = daemonError(err)
		switch {
		case done == nil:
		case !done.fresh:
			// Rules that were there before this ADD (a retried ADD of a pod that may be
			// running) stay: without the daemon they refuse the pod's traffic, never pass it.
			log.Warn("leaving the capture rules that were in place before this ADD")
		default:
			if uerr := done.undo(); uerr != nil {
				log.Error("removing the capture rules after the failed enrollment failed", "reason", uerr)
			}
		}
		return err
	}
	if e.Skipped != "" {
		if done != nil {
			if err := done.undo(); err != nil {
				return types.NewError(types.ErrInternal,
					fmt.Sprintf("meshlessd skipped the pod, but removing its capture rules failed: %v", err), "")
			}
		}
		log.Info("pod skipped by meshlessd; its traffic is left alone", "reason", e.Skipped)
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	}
	if done != nil && string(done.cc.Backend) != e.Backend {
		// The published backend is not the one the daemon uses (it was re-detected since).
		log.Warn("meshlessd published another iptables backend than it enrolls with; installing the rules again", "backend", e.Backend, "published_backend", string(done.cc.Backend))
		if err := done.undo(); err != nil {
			err = fmt.Errorf("remove the capture rules installed with the published iptables backend %s: %w", done.cc.Backend, err)
			return withdraw(ctx, client, pod, log, err)
		}
		done = nil
	}
	if done == nil {
		b, err := at.backend(e)
		if err != nil {
			return withdraw(ctx, client, pod, log, err)
		}
		r := at.install(b, log)()
		done = &r
	}
	if done.err != nil {
		return withdraw(ctx, client, pod, log, done.err)
	}
	log.Info("pod enrolled", "spiffe_id", e.SPIFFEID, "ips", pod.IPs, "infra_container", id.InfraContainerID)
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

// installed is the outcome of installing a pod's capture.
type installed struct {
	netns string
	cc    capture.Config
	fresh bool // nothing of the capture was in the netns before
	err   error
}

// undo removes what the install put in place, whether it succeeded or not.
func (in installed) undo() error {
	if in.cc.Backend == "" {
		return nil // the configuration was refused: nothing was touched
	}
	return capture.Remove(in.netns, in.cc)
}

// install starts installing the pod's capture in backend b, and returns once the restore
// programs run (see capture.StartOnNode), so that the enrollment, which is asked for next, does
// not slow down their start. ADD waits for the outcome with wait, either after the enrollment
// or, when it had to learn the backend from it, at once.
func (at *attachment) install(b capture.Backend, log *slog.Logger) (wait func() installed) {
	cc, err := podCapture(at.conf, b, at.pod.IPs)
	if err != nil {
		return func() installed { return installed{netns: at.pod.Netns, err: err} }
	}
	log.Debug("installing capture rules", "backend", cc.Backend, "ips", at.pod.IPs)
	in := capture.StartOnNode(at.pod.Netns, cc)
	return func() installed {
		fresh, err := in.Finish()
		return installed{netns: at.pod.Netns, cc: cc, fresh: fresh, err: err}
	}
}

// withdraw asks the daemon to forget the pod whose capture failed, and returns the CNI error.
func withdraw(ctx context.Context, client *enroll.Client, pod enroll.Pod, log *slog.Logger, err error) error {
	if rerr := client.Remove(ctx, pod.ContainerID); rerr != nil {
		log.Error("withdrawing the enrollment failed", "reason", rerr)
		err = fmt.Errorf("%w (withdrawing the enrollment also failed: %v)", err, rerr)
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}

// cmdDel tells the daemon to forget the pod. It succeeds whenever the pod is or will be
// forgotten: the daemon also drops pods whose netns is gone, so an unreachable daemon is no
// reason to block the runtime. The capture rules are left in place: they die with the netns,
// and removing them while a container still runs would let it send plaintext.
func cmdDel(args *skel.CmdArgs) error {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	log := conf.logger("DEL").With("container", args.ContainerID)
	err = enroll.NewClient(conf.SocketPath).Remove(context.Background(), args.ContainerID)
	switch {
	case err == nil, errors.Is(err, enroll.ErrNotFound):
		log.Debug("pod removed from meshlessd")
		return nil
	case errors.Is(err, enroll.ErrUnreachable):
		log.Warn("meshlessd unreachable; it forgets the pod itself once the pod's netns is gone", "reason", err)
		return nil
	}
	return daemonError(err)
}

// cmdCheck verifies that the daemon serves the pod with the addresses prevResult gives it and that
// the capture rules are complete; a pod the daemon skipped has nothing to verify.
func cmdCheck(args *skel.CmdArgs) error {
	ctx := context.Background()
	at, err := prepare(args)
	if err != nil {
		return err
	}
	conf, pod, client := at.conf, at.pod, at.client
	e, err := client.Get(ctx, pod.ContainerID)
	switch {
	case errors.Is(err, enroll.ErrNotFound):
		return types.NewError(types.ErrInternal,
			fmt.Sprintf("pod %s/%s (container %s) is not enrolled with meshlessd at %s, so its connections are refused; re-create the pod",
				pod.Namespace, pod.Name, pod.ContainerID, conf.SocketPath), "")
	case err != nil:
		return daemonError(err)
	case e.Skipped != "":
		return nil
	}
	if !sameAddrs(e.Pod.IPs, pod.IPs) {
		return types.NewError(types.ErrInternal,
			fmt.Sprintf("pod %s/%s (container %s) is enrolled with IPs %v but prevResult gives it %v; re-create the pod",
				pod.Namespace, pod.Name, pod.ContainerID, e.Pod.IPs, pod.IPs), "")
	}
	b, err := at.backend(e)
	if err != nil {
		return err
	}
	cc, err := captureConfig(conf, b, pod.IPs)
	if err != nil {
		return err
	}
	if err := capture.Check(pod.Netns, cc); err != nil {
		return types.NewError(types.ErrInternal,
			fmt.Sprintf("capture rules missing in netns %s: %v; re-create the pod", pod.Netns, err), "")
	}
	return nil
}

// cmdGC tells the daemon which attachments are still valid; it forgets every other pod.
func cmdGC(args *skel.CmdArgs) error {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	// A missing list is not an empty one: reading it as "nothing is valid" would cut every pod off.
	if conf.ValidAttachments == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, `GC needs "cni.dev/valid-attachments" in the configuration (the runtime passes it)`, "")
	}
	keep := make([]string, 0, len(conf.ValidAttachments))
	for _, a := range conf.ValidAttachments {
		if !slices.Contains(keep, a.ContainerID) {
			keep = append(keep, a.ContainerID)
		}
	}
	removed, err := enroll.NewClient(conf.SocketPath).GC(context.Background(), keep)
	if err != nil {
		return daemonError(err)
	}
	if len(removed) > 0 {
		conf.logger("GC").Info("meshlessd forgot stale pods", "removed", removed, "kept", len(keep))
	}
	return nil
}

// cmdStatus reports whether pods can be added: only when meshlessd is reachable and ready.
func cmdStatus(args *skel.CmdArgs) error {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	client := enroll.NewClient(conf.SocketPath)
	st, err := client.Status(context.Background())
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	if !st.Ready {
		return types.NewError(types.ErrPluginNotAvailable,
			fmt.Sprintf("meshlessd at %s is running but not ready (see its logs and /readyz on this node)", client.Socket()), "")
	}
	return nil
}

// attachment is what ADD and CHECK both start from: the pod as prevResult and CNI_ARGS describe
// it, and the daemon serving the node.
type attachment struct {
	conf   *Config
	pod    enroll.Pod
	id     podIdentity
	client *enroll.Client
}

// prepare parses the configuration and the pod.
func prepare(args *skel.CmdArgs) (*attachment, error) {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return nil, err
	}
	prev, err := conf.prevResult()
	if err != nil {
		return nil, err
	}
	pod, id, err := podFromArgs(args, conf, prev)
	if err != nil {
		return nil, err
	}
	return &attachment{conf: conf, pod: pod, id: id, client: enroll.NewClient(conf.SocketPath)}, nil
}

// backend is the iptables backend the daemon reports for the node.
func (at *attachment) backend(e enroll.Enrollment) (capture.Backend, error) {
	b := capture.Backend(e.Backend)
	if b != capture.Legacy && b != capture.NFT {
		return "", types.NewError(types.ErrInternal,
			fmt.Sprintf("meshlessd at %s reports iptables backend %q, want %q or %q (are meshless-cni and meshlessd the same version?)",
				at.client.Socket(), e.Backend, capture.Legacy, capture.NFT), "")
	}
	return b, nil
}

// podFromArgs assembles the pod the runtime is wiring and validates it before anything is touched.
func podFromArgs(args *skel.CmdArgs, conf *Config, prev *current.Result) (enroll.Pod, podIdentity, error) {
	ips, err := podIPs(prev)
	if err != nil {
		return enroll.Pod{}, podIdentity{}, err
	}
	id, err := identity(args)
	if err != nil {
		return enroll.Pod{}, podIdentity{}, err
	}
	pod := enroll.Pod{
		ContainerID: args.ContainerID,
		IfName:      args.IfName,
		Netns:       args.Netns,
		Namespace:   id.Namespace,
		Name:        id.Name,
		UID:         id.UID,
		IPs:         ips,
		Annotations: conf.RuntimeConfig.PodAnnotations,
	}
	if err := pod.Validate(); err != nil {
		return enroll.Pod{}, podIdentity{}, types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("the runtime's arguments describe a pod meshless cannot serve: %v", err), "")
	}
	return pod, id, nil
}

// captureConfig is the capture of a pod with the given addresses. The node's addresses are
// read here, in the host netns where the plugin runs.
func captureConfig(conf *Config, backend capture.Backend, ips []netip.Addr) (capture.Config, error) {
	cc, err := podCapture(conf, backend, ips)
	if err != nil {
		return cc, err
	}
	if cc.NodeIPs, err = capture.NodeAddrs(ips); err != nil {
		return capture.Config{}, types.NewError(types.ErrInternal, err.Error(), "")
	}
	return cc, nil
}

// podCapture is the capture of a pod with the given addresses, less the node's addresses, which
// capture.StartOnNode reads while it starts the restore programs.
func podCapture(conf *Config, backend capture.Backend, ips []netip.Addr) (capture.Config, error) {
	cc := capture.Config{
		Backend:              backend,
		PodIPs:               ips,
		ExcludeInboundPorts:  conf.inboundPorts,
		ExcludeOutboundPorts: conf.outboundPorts,
		ExcludeOutboundCIDRs: conf.outboundCIDRs,
	}
	if err := cc.Validate(); err != nil {
		return capture.Config{}, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("capture configuration: %v", err), "")
	}
	return cc, nil
}

// sameAddrs reports whether a and b hold the same addresses, in any order.
func sameAddrs(a, b []netip.Addr) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, netip.Addr.Compare)
	slices.SortFunc(b, netip.Addr.Compare)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}
