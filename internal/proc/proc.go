// Package proc runs the long-lived servers of the test harnesses (etcd and kube-apiserver in
// conformance/kubeapi; containerd, the kubelet and the rest of the control plane in e2e/k8s):
// each in its own process group, killed if the harness dies, its output in a log file.
package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// Process is a server the harness started; its output goes to a log file.
type Process struct {
	Name string
	Log  string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // its exit status, once done is closed
}

// Start runs bin with args, its output in a new file at logPath.
func Start(name, logPath, bin string, args ...string) (*Process, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, and killed if the test binary dies without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &Process{Name: name, Log: logPath, cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the thread that forked exits, not the process; Go ends threads
		// that other goroutines locked (the netns helpers do), so fork from a thread of our own
		// that lives until the child has exited.
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	return p, nil
}

// Exited returns an error describing the process's exit if it has exited, nil if it runs.
func (p *Process) Exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited (%v); its log ends with:\n%s", p.Name, p.err, p.Tail(40))
	default:
		return nil
	}
}

// AddrInUse reports whether the process exited because a port it was given was taken meanwhile.
func (p *Process) AddrInUse() bool {
	select {
	case <-p.done:
	default:
		return false
	}
	data, _ := os.ReadFile(p.Log)
	return bytes.Contains(data, []byte("address already in use"))
}

// Stop ends the process: SIGTERM, then SIGKILL to its group after grace.
func (p *Process) Stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// Tail returns the last n lines of the process's log.
func (p *Process) Tail(n int) string {
	data, err := os.ReadFile(p.Log)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// WaitFor calls ready until it reports true, the process exits, or timeout passes. Start-up
// readiness has no event to wait on, so this polls.
func (p *Process) WaitFor(timeout time.Duration, ready func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		ok, err := ready()
		if ok {
			return nil
		}
		last = err
		if err := p.Exited(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			if last == nil {
				last = errors.New("not ready")
			}
			return fmt.Errorf("%s not ready after %s: %w; its log ends with:\n%s", p.Name, timeout, last, p.Tail(40))
		}
		select {
		case <-p.done:
		case <-time.After(100 * time.Millisecond):
		}
	}
}
