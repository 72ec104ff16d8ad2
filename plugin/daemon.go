package main

import (
	"errors"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshless/meshless/pkg/enroll"
)

// daemonError turns a failed call to meshlessd into a CNI error: an unreachable daemon, or one
// not ready yet, is a condition the runtime should retry (code 11), anything else is an internal
// error.
func daemonError(err error) error {
	if errors.Is(err, enroll.ErrUnreachable) || errors.Is(err, enroll.ErrNotReady) {
		return types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}
