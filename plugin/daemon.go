package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshless/meshless/pkg/capture"
	"github.com/meshless/meshless/pkg/enroll"
)

// daemonError turns a failed call to meshlessd into a CNI error: an unreachable daemon is a
// condition the runtime should retry (code 11), anything else is an internal error.
func daemonError(err error) error {
	if errors.Is(err, enroll.ErrUnreachable) {
		return types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}

// readyBackend asks meshlessd whether it can serve pods, and which iptables backend the node
// uses so that the pod's rules live in the same one.
func readyBackend(ctx context.Context, c *enroll.Client) (capture.Backend, error) {
	st, err := c.Status(ctx)
	if err != nil {
		return "", daemonError(err)
	}
	if !st.Ready {
		return "", types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("meshlessd at %s is running but not ready to enroll pods (see its logs and /readyz on this node); the runtime will retry", c.Socket()), "")
	}
	b := capture.Backend(st.Backend)
	if b != capture.Legacy && b != capture.NFT {
		return "", types.NewError(types.ErrInternal,
			fmt.Sprintf("meshlessd at %s reports iptables backend %q, want %q or %q (are meshless-cni and meshlessd the same version?)", c.Socket(), st.Backend, capture.Legacy, capture.NFT), "")
	}
	return b, nil
}
