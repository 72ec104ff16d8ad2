package kube

import "github.com/meshless/meshless/pkg/enroll"

// SetWaiting makes Describe call f whenever it starts waiting for a pod. Set it before
// the first call.
func SetWaiting(p *Pods, f func(enroll.Pod)) { p.waiting = f }

// Pending returns how many statuses w still has to write.
func Pending(w *StatusWriter) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.pending)
}
