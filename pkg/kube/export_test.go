package kube

import "github.com/meshless/meshless/pkg/enroll"

// SetWaiting makes ServiceAccountOf call f whenever it starts waiting for a pod. Set it before
// the first call.
func SetWaiting(p *Pods, f func(enroll.Pod)) { p.waiting = f }
