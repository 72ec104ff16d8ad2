package conformance

import (
	"fmt"
	"os"
	"sync"
)

// Env is what the harness needs from its caller: a place to register teardown, a log, and whether
// things went wrong (to decide how much to report at teardown). *testing.T and *testing.B satisfy
// it; programs use a CleanupStack.
type Env interface {
	Cleanup(func())
	Logf(format string, args ...any)
	Failed() bool
}

// CleanupStack is an Env for programs such as the demo: Cleanup pushes a function, Run pops and
// runs them all, newest first. The zero value logs to stderr.
type CleanupStack struct {
	// Log receives Logf output; nil means stderr.
	Log func(format string, args ...any)

	mu     sync.Mutex
	fns    []func()
	failed bool
}

// Cleanup registers f to run when Run is called.
func (s *CleanupStack) Cleanup(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fns = append(s.fns, f)
}

// Logf logs a line about the harness's work.
func (s *CleanupStack) Logf(format string, args ...any) {
	if s.Log != nil {
		s.Log(format, args...)
		return
	}
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

// Fail marks the run as failed, so that teardown reports the daemons' logs.
func (s *CleanupStack) Fail() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failed = true
}

// Failed reports whether Fail was called.
func (s *CleanupStack) Failed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failed
}

// Run runs every registered function, newest first, including functions registered while it runs.
func (s *CleanupStack) Run() {
	for {
		s.mu.Lock()
		if len(s.fns) == 0 {
			s.mu.Unlock()
			return
		}
		f := s.fns[len(s.fns)-1]
		s.fns = s.fns[:len(s.fns)-1]
		s.mu.Unlock()
		f()
	}
}
